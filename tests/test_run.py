"""End-to-end merges on the session's local Ray: correct bytes, any worker count, resume."""

from __future__ import annotations

import filecmp
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from raymerge.checkpoint import open_checkpoint
from raymerge.config import parse_spec
from raymerge.errors import ConfigError, MergeFailed
from raymerge.index import verify
from raymerge.mapping import layer_of
from raymerge.methods import REGISTRY
from raymerge.methods.base import MergeInputs
from raymerge.plan import make_plan
from raymerge.runner import RunOptions, run_merge
from tests.conftest import ties_config

pytestmark = pytest.mark.ray


def load_model(path: str) -> dict[str, torch.Tensor]:
    ckpt = open_checkpoint(path)
    tensors = {}
    for file in ckpt.files:
        tensors.update(load_file(os.path.join(path, file)))
    return tensors


def reference_merge(spec) -> dict[str, torch.Tensor]:
    """The whole merge in memory, one tensor at a time, straight from the method."""
    sources = spec.slices[0].sources
    inputs = [load_model(spec.inputs[s.input].path) for s in sources]
    out = {}
    for name in inputs[0]:
        layer = layer_of(name)
        t = 0.0 if layer is None else layer / 2
        shared, per_input = spec.resolve(0, name, [name] * len(inputs), t)
        merged = spec.method.merge(
            MergeInputs(
                name, [m[name] for m in inputs], spec.slices[0].base, shared, per_input, spec.seed
            )
        )
        out[name] = merged.to(inputs[0][name].dtype)
    return out


def output_files(out) -> list[str]:
    return sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))


def merge(spec, out, **options):
    return run_merge(spec, str(out), RunOptions(progress=False, **options), log=lambda _: None)


@pytest.fixture
def spec(models, tmp_path):
    return parse_spec(
        ties_config(models), "c", str(tmp_path), {"shard_size": 50_000, "part_size": 8_000}
    )


def test_ties_output_loads_and_equals_reference(ray_local, spec, tmp_path):
    summary = merge(spec, tmp_path / "out", workers=2)
    out = tmp_path / "out"
    assert (out / "COMPLETE").exists() and (out / "model.safetensors.index.json").exists()
    assert summary.units_done == len(summary.plan.units) > 3
    merged = load_model(str(out))
    want = reference_merge(spec)
    assert merged.keys() == want.keys()
    for name in want:
        assert torch.equal(merged[name], want[name]), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(output_files(out))
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    assert verify(str(out)).problems == []


def test_worker_count_does_not_change_bytes(ray_local, spec, tmp_path):
    merge(spec, tmp_path / "one", workers=1)
    merge(spec, tmp_path / "three", workers=3)
    files = output_files(tmp_path / "one")
    assert files == output_files(tmp_path / "three") and len(files) > 1
    for name in files + ["model.safetensors.index.json", "tensors.parquet"]:
        assert filecmp.cmp(tmp_path / "one" / name, tmp_path / "three" / name, shallow=False), name


def test_verify_finds_a_flipped_byte(ray_local, spec, tmp_path):
    out = tmp_path / "out"
    merge(spec, out, workers=1)
    shard = out / output_files(out)[0]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = verify(str(out)).problems
    assert len(problems) == 1 and "checksum" in problems[0]


def test_occupied_output_needs_force(ray_local, spec, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        merge(spec, out)
    merge(spec, out, force=True)
    assert (out / "notes.txt").read_text() == "mine"  # --force only replaces raymerge's files
    with pytest.raises(ConfigError, match="already holds this merge"):
        merge(spec, out)


def test_retry_on_another_worker(ray_local, spec, tmp_path):
    key = "000003"
    env = {"RAYMERGE_FAULT": f"raise:{key}:{tmp_path}"}
    summary = merge(spec, tmp_path / "out", workers=2, runtime_env={"env_vars": env})
    assert summary.retries == 1 and (tmp_path / f"fault-{key}").exists()
    merge(spec, tmp_path / "clean", workers=1)
    for name in output_files(tmp_path / "clean"):
        assert filecmp.cmp(tmp_path / "out" / name, tmp_path / "clean" / name, shallow=False)


def test_failed_run_leaves_nothing_complete_and_resumes(ray_local, spec, tmp_path):
    out = tmp_path / "out"
    plan = make_plan(spec, [open_checkpoint(m.path) for m in spec.inputs])
    last = min(plan.units, key=lambda p: (p.nbytes, p.key))  # a lone worker does it last
    env = {"RAYMERGE_FAULT": f"exit:{last.key}:{tmp_path}"}
    with pytest.raises(MergeFailed, match="failed 1 times; last error: worker died"):
        merge(spec, out, workers=1, max_attempts=1, runtime_env={"env_vars": env})
    assert not (out / "COMPLETE").exists() and not (out / "model.safetensors.index.json").exists()
    assert not (out / "tensors.parquet").exists()
    summary = merge(spec, out, workers=2)
    assert summary.units_resumed > 0
    assert summary.units_done + summary.units_resumed == len(plan.units)
    merge(spec, tmp_path / "clean", workers=1)
    for name in output_files(tmp_path / "clean"):
        assert filecmp.cmp(out / name, tmp_path / "clean" / name, shallow=False)
    assert verify(str(out)).problems == []


def test_single_file_inputs_and_linear(ray_local, models, tmp_path):
    from safetensors.torch import save_file

    folders = []
    for role in ("model_1", "model_2"):
        folder = tmp_path / role
        folder.mkdir()
        save_file(load_model(models[role]), str(folder / "model.safetensors"), {"format": "pt"})
        folders.append(str(folder))
    body = {
        "merge_method": "linear",
        "models": [
            {"model": folders[0], "parameters": {"weight": 2.0}},
            {"model": folders[1], "parameters": {"weight": 1.0}},
        ],
        "dtype": "float32",
    }
    lin = parse_spec(body, "c", str(tmp_path))
    merge(lin, tmp_path / "out", workers=2)
    merged = load_model(str(tmp_path / "out"))
    a, b = load_model(models["model_1"]), load_model(models["model_2"])
    for name in a:
        want = (2 * a[name].float() + b[name].float()) / 3
        assert merged[name].dtype == torch.float32
        torch.testing.assert_close(merged[name], want, rtol=1e-6, atol=1e-7)
    assert REGISTRY["linear"] is lin.method


def test_resume_redoes_a_recorded_part_whose_bytes_are_gone(ray_local, spec, tmp_path):
    """Without fsync a machine crash can keep a part's record but lose its bytes."""
    out = tmp_path / "out"
    plan = make_plan(spec, [open_checkpoint(m.path) for m in spec.inputs])
    last = min(plan.units, key=lambda p: (p.nbytes, p.key))
    env = {"RAYMERGE_FAULT": f"exit:{last.key}:{tmp_path}"}
    with pytest.raises(MergeFailed):
        merge(spec, out, workers=1, max_attempts=1, runtime_env={"env_vars": env})
    records = sorted(os.listdir(out / "_raymerge" / "units"))
    # a recorded part in the failed part's shard, which stayed uncommitted
    victim = next(p for p in plan.units if p.shard == last.shard if f"{p.key}.json" in records)
    partial = out / (plan.shards[victim.shard].name + ".partial")
    with open(partial, "r+b") as f:
        f.seek(victim.end - 4)
        f.write(b"\0\0\0\0")
    summary = merge(spec, out, workers=2, fsync=True)
    assert summary.units_done + summary.units_resumed == len(plan.units)
    assert verify(str(out)).problems == []
    merge(spec, tmp_path / "clean", workers=1)
    for name in output_files(tmp_path / "clean"):
        assert filecmp.cmp(out / name, tmp_path / "clean" / name, shallow=False)
