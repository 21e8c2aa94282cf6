"""A tensor merged in row ranges gives the bytes of the tensor merged whole, for every
method (each example config in configs/), and any worker count gives the same bytes.

The models are vocab-heavy (40,000 x 64 embeddings: three reduction blocks each), so a
small --worker-memory splits the embedding and lm_head across work units and, for methods
with whole-tensor facts, runs the prepare stage.
"""

from __future__ import annotations

import filecmp
import glob
import os

import numpy as np
import pytest
import yaml

from raymerge.checkpoint import open_checkpoint
from raymerge.config import parse_spec
from raymerge.errors import ConfigError
from raymerge.methods import REGISTRY
from raymerge.plan import make_plan
from raymerge.runner import RunOptions, run_merge
from raymerge.synth import SynthOptions, synthesize

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml")))

def splitting_memory(spec, checkpoints) -> int:
    """A --worker-memory that holds one block of the vocab tensors but not all of one
    (methods differ in scratch per element)."""
    plan = make_plan(spec, checkpoints)
    tensor = next(t for t in plan.tensors if t.name == "lm_head.weight")
    return tensor.memory_per_row() * max(tensor.block_rows, tensor.rows // 2)


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("wide")
    options = SynthOptions(models=3, with_base=True, layers=4, hidden=64, intermediate=96,
                           vocab=40_000, shard_size=8_000_000, seed=11)  # fmt: skip
    return synthesize(str(out), options)


def config_for(path: str, models: dict[str, str], tmp_path) -> str:
    text = open(path).read().replace("demo-out/models/", os.path.dirname(models["base"]) + "/")
    body = yaml.safe_load(text)
    if "calibration" in body.get("parameters", {}):  # a data-aware method: token ids to read
        calibration = tmp_path / "calibration.npy"
        np.save(calibration, np.arange(4096) % 256)
        body["parameters"]["calibration"] = str(calibration)
    out = tmp_path / os.path.basename(path)
    out.write_text(yaml.safe_dump(body))
    return str(out)


def outputs(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith((".safetensors", ".parquet")))


def same_bytes(a, b) -> bool:
    names = outputs(a)
    return names == outputs(b) and all(
        filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False) for n in names
    )


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: os.path.basename(p)[:-5])
def test_split_tensors_give_the_unsplit_bytes(ray_local, wide_models, tmp_path, config):
    from raymerge.config import load_spec

    spec = load_spec(config_for(config, wide_models, tmp_path))
    method = REGISTRY[spec.method.name]
    checkpoints = [open_checkpoint(m.path) for m in spec.inputs]
    memory = splitting_memory(spec, checkpoints)
    if method.split_problem(2, "lm_head.weight") is not None:
        with pytest.raises(ConfigError, match="cannot split|needs whole rows"):
            make_plan(spec, checkpoints, memory)
        return
    plan = make_plan(spec, checkpoints, memory)
    assert len(plan.split_tensors()) >= 2, "the test must split the vocab tensors"

    def merge(out, memory, workers=2):
        run_merge(spec, str(out), RunOptions(progress=False, workers=workers,
                                             worker_memory=memory), log=lambda _: None)  # fmt: skip

    merge(tmp_path / "whole", 1 << 40)
    merge(tmp_path / "split", memory)
    assert same_bytes(tmp_path / "whole", tmp_path / "split")


@pytest.mark.ray
@pytest.mark.slow
def test_worker_count_does_not_change_split_bytes(ray_local, wide_models, tmp_path):
    body = yaml.safe_load(open(os.path.join(os.path.dirname(CONFIGS[0]), "ties.yaml")).read()
                          .replace("demo-out/models/", os.path.dirname(wide_models["base"]) + "/"))
    body["parameters"]["rescale"] = True
    spec = parse_spec(body, "c", str(tmp_path))
    memory = splitting_memory(spec, [open_checkpoint(m.path) for m in spec.inputs])
    for workers in (1, 3):
        summary = run_merge(spec, str(tmp_path / f"w{workers}"), RunOptions(
            progress=False, workers=workers, worker_memory=memory,
        ), log=lambda _: None)  # fmt: skip
        assert len(summary.plan.split_tensors()) == 2
    assert same_bytes(tmp_path / "w1", tmp_path / "w3")


def test_modes_that_need_no_facts_run_no_prepare_stage(wide_models, tmp_path):
    """nuslerp per row and model_stock filter_wise need no whole-tensor fact for matrices:
    their split matrices are merged without a prepare stage (and a read) first."""
    from raymerge import stages

    for name, parameters in (("nuslerp", {"nuslerp_flatten": False}),
                             ("model_stock", {"filter_wise": True})):  # fmt: skip
        path = os.path.join(os.path.dirname(CONFIGS[0]), f"{name}.yaml")
        body = yaml.safe_load(open(config_for(path, wide_models, tmp_path)))
        body.setdefault("parameters", {}).update(parameters)
        spec = parse_spec(body, "c", str(tmp_path))
        checkpoints = [open_checkpoint(m.path) for m in spec.inputs]
        plan = make_plan(spec, checkpoints, splitting_memory(spec, checkpoints))
        assert len(plan.split_tensors()) == 2
        assert stages.scopes(plan, REGISTRY[name]) == {}, name
