"""TIES with density_scope: global keeps each model's top-k over the whole model, found by
map-reduce over the parts; checked against an in-memory flatten-and-sort reference."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from raymerge.config import parse_spec
from raymerge.errors import ConfigError
from raymerge.mapping import natural_key
from raymerge.methods import selection
from raymerge.methods.base import MergeInputs
from raymerge.methods.sparsify import keep_count, magnitude_bits, split
from raymerge.runner import RunOptions, run_merge
from tests.test_run import load_model


def test_split_finds_the_bin_of_the_kth_largest():
    histogram = np.array([5, 0, 3, 2])  # bins 0..3, largest values in bin 3
    assert split(histogram, 1) == (3, 0)
    assert split(histogram, 2) == (3, 0)
    assert split(histogram, 3) == (2, 2)
    assert split(histogram, 5) == (2, 2)
    assert split(histogram, 6) == (0, 5)


def test_ties_go_to_earlier_tensors_and_blocks():
    counts = [("model.layers.10.a", 0, 4), ("model.layers.2.a", 1, 1), ("model.layers.9.a", 0, 5),
              ("model.layers.2.a", 0, 2)]  # fmt: skip
    facts = {"g": {"threshold": 7, "take": 5}}
    got = selection._reduce_ties({"ties": {"g": counts}}, facts, None)["g"]
    assert got["quota"] == {
        "model.layers.2.a": {"0": 2, "1": 1},
        "model.layers.9.a": {"0": 2},
        "model.layers.10.a": {"0": 0},
    }


def test_keep_mask_keeps_above_and_the_first_ties():
    delta = torch.tensor([0.5, -2.0, 1.0, -1.0, 1.0, 0.0])
    inputs = MergeInputs("w", [delta], None, {}, [{}])
    one = int(magnitude_bits(torch.tensor([1.0]))[0])

    def kept(fact):
        mask = selection.keep_mask(delta, fact, inputs)
        return delta.tolist() if mask is None else (delta * mask).tolist()

    assert kept({"threshold": one, "quota": {"w": {"0": 0}}}) == [0, -2.0, 0, 0, 0, 0]
    assert kept({"threshold": one, "quota": {"w": {"0": 2}}}) == [0, -2.0, 1.0, -1.0, 0, 0]
    assert kept({"threshold": one, "quota": selection.KEEP_ALL}) == [0, -2.0, 1.0, -1.0, 1.0, 0]
    assert sum(abs(v) for v in kept(selection.KEEP_NONE)) == 0
    assert kept(selection.KEEP_ALL) == delta.tolist()


def scaled_model(models, tmp_path, name, transform) -> str:
    """model_1 with each tensor's delta from the base transformed by `transform(name, delta)`."""
    folder = tmp_path / name
    shutil.copytree(models["model_1"], folder)
    base = load_model(models["base"])
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(shard))
        for key, value in tensors.items():
            delta = value.float() - base[key].float()
            tensors[key] = (base[key].float() + transform(key, delta)).to(value.dtype)
        save_file(tensors, str(shard), {"format": "pt"})
    return str(folder)


def reference_global_trim(base: dict, model: dict, density: float) -> dict:
    """Flatten every task vector in name order, keep the k largest |tau| (earliest first)."""
    names = sorted(base, key=natural_key)
    flat = torch.cat([(model[n].float() - base[n].float()).reshape(-1) for n in names])
    k = keep_count(density, flat.numel())
    order = sorted(range(flat.numel()), key=lambda i: (-abs(float(flat[i])), i))[:k]
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order] = True
    kept, out, offset = flat * mask, {}, 0
    for n in names:
        size = base[n].numel()
        out[n] = base[n].float() + kept[offset : offset + size].reshape(base[n].shape)
        offset += size
    return out, k, flat.numel()


def global_config(models, model_path, density=0.3):
    return {
        "merge_method": "ties",
        "base_model": models["base"],
        "models": [{"model": model_path, "parameters": {"weight": 1.0, "density": density}}],
        "parameters": {"density_scope": "global"},
        "dtype": "float32",
    }


@pytest.mark.ray
@pytest.mark.parametrize("quantized", [False, True], ids=["scales", "many-ties"])
def test_global_kept_fraction_is_the_density(ray_local, models, tmp_path, quantized):
    if quantized:  # every delta is one of three magnitudes: ties at the threshold everywhere

        def transform(name, delta):
            return torch.sign(delta) * torch.where(delta.abs() > 0.002, 2**-7, 2**-9)
    else:  # layer 0 moves 50x more than the rest: per-tensor and global trims differ

        def transform(name, delta):
            return delta * (50.0 if ".layers.0." in name else 1.0)

    path = scaled_model(models, tmp_path, "scaled", transform)
    spec = parse_spec(
        global_config(models, path), "c", str(tmp_path), {"shard_size": 50_000, "part_size": 8_000}
    )
    summary = run_merge(
        spec, str(tmp_path / "out"), RunOptions(progress=False, workers=2), log=lambda _: None
    )
    assert len(summary.plan.shards) > 1 and len(summary.plan.units) > 4
    out, base = load_model(str(tmp_path / "out")), load_model(models["base"])
    want, k, total = reference_global_trim(base, load_model(path), 0.3)
    kept = sum(int((out[n] != base[n].float()).sum()) for n in out)
    assert kept == k == int(0.3 * total)
    for name in want:
        assert torch.equal(out[name], want[name]), name
    if not quantized:
        layer0 = [n for n in out if ".layers.0." in n and n.endswith("proj.weight")]
        fraction = sum(int((out[n] != base[n]).sum()) for n in layer0) / sum(
            out[n].numel() for n in layer0
        )
        assert fraction > 0.9  # per-tensor trimming would keep 0.3 of each
    assert os.path.exists(tmp_path / "out" / "_raymerge" / "facts.json")


def test_global_scope_needs_one_density_per_model(models, tmp_path):
    from raymerge.checkpoint import open_checkpoint
    from raymerge.plan import make_plan

    body = global_config(models, models["model_1"], density=[0.2, 0.6])
    spec = parse_spec(body, "c", str(tmp_path))
    with pytest.raises(ConfigError, match="one density per model"):
        make_plan(spec, [open_checkpoint(m.path) for m in spec.inputs])


def test_density_scope_values_are_checked(models, tmp_path):
    body = global_config(models, models["model_1"])
    body["parameters"]["density_scope"] = "model"
    with pytest.raises(ConfigError, match=r"density_scope: 'model' is not one of"):
        parse_spec(body, "c", str(tmp_path))
