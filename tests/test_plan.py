"""The plan fixes every byte's place from headers alone, independent of the worker count."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from raymerge.checkpoint import open_checkpoint
from raymerge.config import parse_spec
from raymerge.errors import ConfigError
from raymerge.mapping import layer_of, natural_key
from raymerge.plan import make_plan
from tests.conftest import ties_config


def plan_for(models, tmp_path, **overrides):
    spec = parse_spec(ties_config(models), "c", str(tmp_path), overrides)
    return spec, make_plan(spec, [open_checkpoint(m.path) for m in spec.inputs])


def test_parts_and_units_cover_each_shard_exactly(models, tmp_path):
    _, plan = plan_for(models, tmp_path, shard_size=40_000, part_size=9_000)
    assert len(plan.shards) > 1
    for index, shard in enumerate(plan.shards):
        parts = [p for p in plan.parts if p.shard == index]
        assert parts[0].start == 0 and parts[-1].end == shard.size
        for before, after in zip(parts, parts[1:]):
            assert before.end == after.start
        for part in parts[:-1]:
            assert part.nbytes >= 9_000
        assert [p.number for p in parts] == list(range(1, len(parts) + 1))
        for part in parts:  # units tile their part; the first unit of a shard has the header
            units = [u for u in plan.units if u.shard == index and u.part == part.number]
            assert units[0].start == part.start and units[-1].end == part.end
            for before, after in zip(units, units[1:]):
                assert before.end == after.start
            for unit in units:
                first = plan.tensors[unit.pieces[0].tensor]
                assert first.start == max(unit.start, shard.header_size)


def test_a_tensor_over_the_budget_is_cut_at_blocks(tmp_path):
    from raymerge.synth import SynthOptions, synthesize

    models = synthesize(str(tmp_path / "m"), SynthOptions(
        models=3, with_base=True, layers=1, hidden=64, intermediate=96, vocab=40_000, seed=3,
    ))  # fmt: skip
    spec = parse_spec(ties_config(models), "c", str(tmp_path))
    checkpoints = [open_checkpoint(m.path) for m in spec.inputs]
    whole = make_plan(spec, checkpoints)
    assert whole.split_tensors() == []
    plan = make_plan(spec, checkpoints, worker_memory=100 << 20)
    split = [plan.tensors[i].name for i in plan.split_tensors()]
    assert split == ["lm_head.weight", "model.embed_tokens.weight"]
    assert plan.parts == whole.parts and plan.digest == whole.digest  # parts ignore memory
    for index in plan.split_tensors():
        tensor = plan.tensors[index]
        pieces = [p for u in plan.units for p in u.pieces if p.tensor == index]
        assert pieces[0].row_start == 0 and pieces[-1].row_end == tensor.rows
        assert all(p.row_start % tensor.block_rows == 0 for p in pieces)
    assert [u.index for u in plan.units] == list(range(len(plan.units)))
    assert len({u.key for u in plan.units}) == len(plan.units)
    assert max(3 * u.io_bytes + u.scratch for u in plan.units) <= 100 << 20
    assert plan.peak_worker_bytes() <= 100 << 20


def test_a_method_that_cannot_split_refuses_a_tensor_over_the_budget(tmp_path, monkeypatch):
    import dataclasses

    from raymerge.methods import REGISTRY
    from raymerge.synth import SynthOptions, synthesize

    whole_only = dataclasses.replace(REGISTRY["linear"], locality="tensor", rounds=None)
    monkeypatch.setitem(REGISTRY, "linear", whole_only)  # a kernel that needs whole tensors
    models = synthesize(str(tmp_path / "m"), SynthOptions(
        models=2, with_base=False, layers=1, hidden=64, intermediate=96, vocab=40_000, seed=3,
    ))  # fmt: skip
    body = {"merge_method": "linear", "dtype": "bfloat16", "models": [
        {"model": models[f"model_{i}"], "parameters": {"weight": 1.0}} for i in (1, 2)]}
    spec = parse_spec(body, "c", str(tmp_path))
    checkpoints = [open_checkpoint(m.path) for m in spec.inputs]
    with pytest.raises(ConfigError, match=r"'lm_head.weight' \[40000, 64\] needs .* cannot split"):
        make_plan(spec, checkpoints, worker_memory=100 << 20)
    make_plan(spec, checkpoints, worker_memory=1 << 30)  # fits whole: fine


def test_write_parts_stay_within_s3_limits(models, tmp_path, monkeypatch):
    import raymerge.plan

    monkeypatch.setattr(raymerge.plan, "MAX_PARTS_PER_SHARD", 3)  # S3 allows 10,000
    with pytest.raises(ConfigError, match="more than S3's 3; raise part_size to at least"):
        plan_for(models, tmp_path, shard_size=10**9, part_size=1)
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="may then exceed S3's 5 GiB"):
        plan_for(models, tmp_path, part_size="4.5GiB")


def test_plan_is_deterministic_and_names_sorted(models, tmp_path):
    _, a = plan_for(models, tmp_path)
    _, b = plan_for(models, tmp_path)
    assert a.digest == b.digest and a == b
    names = [t.name for t in a.tensors]
    assert names == sorted(names, key=natural_key)
    assert layer_of("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_of("model.embed_tokens.weight") is None


def test_digest_changes_with_parameters(models, tmp_path):
    _, a = plan_for(models, tmp_path)
    _, b = plan_for(models, tmp_path, seed=5)
    assert a.digest != b.digest


def test_bytes_and_memory_estimates(models, tmp_path):
    spec, plan = plan_for(models, tmp_path)
    base = open_checkpoint(models["base"]).total_bytes
    assert plan.bytes_to_read == 4 * base
    assert plan.bytes_to_write == sum(s.size for s in plan.shards)
    assert plan.peak_worker_bytes() > 0


def _copy_with(tmp_path, models, name, transform):
    folder = tmp_path / name
    shutil.copytree(models["model_2"], folder)
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(shard))
        save_file(transform(tensors), str(shard), {"format": "pt"})
    return str(folder)


def test_models_with_different_names_are_refused(models, tmp_path):
    def rename(tensors):
        if "model.layers.1.mlp.up_proj.weight" in tensors:
            tensors["model.layers.1.mlp.upper.weight"] = tensors.pop(
                "model.layers.1.mlp.up_proj.weight"
            )
        return tensors

    body = ties_config(models)
    body["models"][1]["model"] = _copy_with(tmp_path, models, "renamed", rename)
    (tmp_path / "renamed" / "model.safetensors.index.json").unlink()
    spec = parse_spec(body, "c", str(tmp_path))
    with pytest.raises(ConfigError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' is in"):
        make_plan(spec, [open_checkpoint(m.path) for m in spec.inputs])


def test_models_with_different_shapes_are_refused(models, tmp_path):
    def widen(tensors):
        name = "model.layers.0.input_layernorm.weight"
        if name in tensors:
            tensors[name] = torch.ones(65, dtype=torch.bfloat16)
        return tensors

    body = ties_config(models)
    body["models"][1]["model"] = _copy_with(tmp_path, models, "wide", widen)
    spec = parse_spec(body, "c", str(tmp_path))
    with pytest.raises(
        ConfigError, match=r"'model.layers.0.input_layernorm.weight' has shape \[64\]"
    ):
        make_plan(spec, [open_checkpoint(m.path) for m in spec.inputs])
