"""No method writes into its inputs: workers hand them views of reused read buffers."""

from __future__ import annotations

import pytest
import torch

from raymerge.methods import REGISTRY
from raymerge.methods.base import MergeInputs
from raymerge.storage.local import LocalDestination
from raymerge.zipit import store

EXAMPLE_VALUES = {"t": 0.5, "weight": 0.7, "density": 0.5}


def example_inputs(method, folder: str = "") -> MergeInputs:
    count = max(method.min_inputs, min(3, method.max_inputs or 3))
    base_index = None if method.base == "ignored" else 0
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(6, 10, generator=g) for _ in range(count)]
    shared = {
        p.name: EXAMPLE_VALUES.get(p.name, p.default) for p in method.params if p.scope == "shared"
    }
    per_input = []
    for i in range(count):
        scopes = ("input",) if i == base_index else ("input", "non_base")
        per_input.append({
            p.name: EXAMPLE_VALUES.get(p.name, p.default)
            for p in method.params if p.scope in scopes
        })  # fmt: skip
    facts = None if method.stage is None else stage_facts(method.name, count, g, folder)
    return MergeInputs("model.layers.0.mlp.up_proj.weight", tensors, base_index, shared, per_input,
                       facts=facts)  # fmt: skip


def stage_facts(name: str, count: int, g: torch.Generator, folder: str) -> dict:
    """What a data stage hands an up_proj [6, 10]: clusters and a residual permutation
    (zipit, permute), or its input Gram matrices as stored tiles, one per model (regmean)."""
    regmean = name == "regmean"
    clusters = torch.cat([torch.randperm(6, generator=g) for _ in range(count)])
    tiles = {}
    for m in range(count):
        x = torch.randn(40, 10, generator=g, dtype=torch.float64)
        tile = store.path("grams", f"{m}.npy")
        tiles[f"{m}-{m}"] = store.write(LocalDestination(folder), tile, (x.T @ x).numpy())
    grams = {"store": folder, "count": 40, "width": 10, "tile": 10, "models": count,
             "tiles": tiles}  # fmt: skip
    return {
        "role": "up_proj", "shape": {"heads": 2, "kv_heads": 1, "head_dim": 5},
        "regmean_alpha": 0.9 if regmean else None,
        "residual": None if regmean else [torch.randperm(10, generator=g).numpy()
                                          for _ in range(count)],
        "clusters": None if regmean else clusters.numpy(), "heads": None,
        "grams": grams if regmean else None,
    }  # fmt: skip


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_method_leaves_inputs_untouched(name, tmp_path):
    inputs = example_inputs(REGISTRY[name], str(tmp_path))
    before = [t.clone() for t in inputs.tensors]
    merged = REGISTRY[name].merge(inputs)
    assert merged.shape == before[0].shape and torch.isfinite(merged).all()
    for original, after in zip(before, inputs.tensors):
        assert torch.equal(original, after), f"{name} wrote into an input"
