"""nearswap against an entry-by-entry float64 reference, and its extremes."""

from __future__ import annotations

import pytest
import torch

from raymerge.methods import REGISTRY
from raymerge.methods.base import MergeInputs
from tests.reference import as_f32

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run(tensors, t, base_index=0):
    per_input = [{} for _ in tensors]
    return REGISTRY["nearswap"].merge(
        MergeInputs("t", list(tensors), base_index, {"t": t}, per_input)
    )


def randoms(shape=(7, 11), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    model = base + torch.randn(shape, generator=g) * 0.1
    return base.to(dtype), model.to(dtype)


def reference(base, model, t):
    b = as_f32(base).double().reshape(-1).tolist()
    x = as_f32(model).double().reshape(-1).tolist()
    out = []
    for bj, xj in zip(b, x):
        w = min(1.0, max(0.0, t / max(abs(bj - xj), 1e-6)))
        out.append(w * xj + (1 - w) * bj)
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [0.0, 0.01, 0.05, 0.2, 1.0])
def test_matches_reference(dtype, t):
    base, model = randoms(dtype=dtype, seed=1)
    got = run([base, model], t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference(base, model, t), rtol=0, atol=1e-6)


def test_base_position_does_not_matter():
    base, model = randoms(shape=(5, 2, 3), seed=2)
    assert torch.equal(run([model, base], 0.05, base_index=1), run([base, model], 0.05))


def test_extremes_are_exact():
    base, model = randoms(seed=3, dtype=torch.bfloat16)
    assert torch.equal(run([base, model], 0.0), base.float())  # t = 0: the base
    assert torch.equal(run([base, model], 1e9), model.float())  # t beyond every gap: the model


def test_close_entries_are_swapped_far_ones_move_by_t_over_gap():
    base = torch.zeros(4)
    model = torch.tensor([0.05, -0.1, 0.4, -1.0])
    got = run([base, model], 0.1)
    torch.testing.assert_close(got, torch.tensor([0.05, -0.1, 0.1, -0.1]))


def test_identical_inputs_give_the_base():
    base, _ = randoms(seed=4, dtype=torch.float16)
    assert torch.equal(run([base, base.clone()], 0.3), base.float())


def test_elementwise_chunks_agree_with_the_whole_tensor():
    base, model = randoms(shape=(9, 10), seed=5)
    whole = run([base, model], 0.05).reshape(-1)
    flat = [base.reshape(-1), model.reshape(-1)]
    chunks = [run([x[i : i + 16] for x in flat], 0.05) for i in range(0, 90, 16)]
    assert torch.equal(torch.cat(chunks), whole)


def test_declaration_matches_mergekit():
    m = REGISTRY["nearswap"]
    assert [(p.name, p.type, p.scope, p.required) for p in m.params] == [
        ("t", float, "shared", True)
    ]
    assert (m.base, m.min_inputs, m.max_inputs) == ("required", 2, 2)
    assert m.elementwise
    with pytest.raises(ValueError, match="outside"):
        m.param("t").validate(-0.1, "parameters.t")
