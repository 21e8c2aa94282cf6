"""arcee_fusion against a slow float64 reference: per-row KL importance, Tukey fence."""

from __future__ import annotations

import math

import pytest
import torch

from raymerge.methods import REGISTRY, arcee_fusion
from raymerge.methods.arcee_fusion import fence
from raymerge.methods.base import MergeInputs
from tests.methods.splitting import SPLIT_SHAPE, merge_by_rows
from tests.reference import as_f32

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run(tensors, base_index=0):
    per_input = [{} for _ in tensors]
    return REGISTRY["arcee_fusion"].merge(
        MergeInputs("t", list(tensors), base_index, {}, per_input)
    )


def randoms(shape=(7, 11), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    # small changes everywhere, a few large ones: the outliers the fence should pick
    spikes = 1 + 4 * (torch.rand(shape, generator=g) < 0.1)
    model = base + torch.randn(shape, generator=g) * 0.3 * spikes
    return base.to(dtype), model.to(dtype)


def softmax(row):
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [e / sum(exps) for e in exps]


def reference(base, model):
    b, x = as_f32(base).double(), as_f32(model).double()
    width = b.shape[-1] if b.dim() >= 1 else 1
    b_rows, x_rows = b.reshape(-1, width).tolist(), x.reshape(-1, width).tolist()
    scores = []
    for b_row, x_row in zip(b_rows, x_rows):
        p = [v + 1e-8 for v in softmax(x_row)]
        q = [v + 1e-8 for v in softmax(b_row)]
        kl = sum(pj * math.log(pj / qj) for pj, qj in zip(p, q))
        scores += [abs(xj - bj) * kl for xj, bj in zip(x_row, b_row)]
    ordered = sorted(scores)
    last = len(ordered) - 1
    q1, median, q3 = (ordered[int(q * last)] for q in (0.25, 0.5, 0.75))
    threshold = median + 1.5 * (q3 - q1)
    flat_b, flat_x = sum(b_rows, []), sum(x_rows, [])
    out = [xj if s >= threshold else bj for s, xj, bj in zip(scores, flat_x, flat_b)]
    return torch.tensor(out, dtype=torch.float64).reshape(b.shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 11), (40,), (3, 5, 6), (64, 33)])
def test_matches_reference(dtype, shape):
    base, model = randoms(shape, dtype=dtype, seed=len(shape))
    got = run([base, model])
    assert got.dtype == torch.float32
    want = reference(base, model)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    # a real selection: some entries take the model, most keep the base
    changed = got != base.float()
    assert 0 < int(changed.sum()) < changed.numel() // 2


def test_base_position_does_not_matter():
    base, model = randoms(seed=1)
    assert torch.equal(run([model, base], base_index=1), run([base, model]))


def test_quantiles_are_sorted_entries_at_floor_positions():
    scores = torch.tensor([7.0, 2.0, 9.0, 0.0, 4.0, 1.0, 8.0, 3.0, 6.0, 5.0])
    # n = 10: positions 9 // 4 = 2, 9 // 2 = 4, 27 // 4 = 6, no interpolation
    assert fence(scores).item() == 4 + 1.5 * (6 - 2)
    assert fence(torch.tensor([[3.0]])).item() == 3.0


def test_identical_inputs_give_the_base():
    base, _ = randoms(seed=2, dtype=torch.bfloat16)
    assert torch.equal(run([base, base.clone()]), base.float())


def test_sparse_change_is_taken_whole():
    """With most entries unchanged, q1 = median = q3 = 0: the fence is 0 and keeps everything."""
    base = torch.zeros(4, 8)
    model = base.clone()
    model[1, 3], model[2, 0] = 0.5, -2.0
    assert torch.equal(run([base, model]), model)


def test_zero_dimensional_and_constant_rows():
    assert run([torch.tensor(1.0), torch.tensor(2.0)]).item() == 2.0
    # a row shifted by a constant has the same softmax (KL 0): no importance anywhere
    base, model = torch.zeros(2, 3), torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    assert torch.equal(run([base, model]), model)


def test_declaration_matches_mergekit():
    m = REGISTRY["arcee_fusion"]
    assert m.params == ()
    assert (m.base, m.min_inputs, m.max_inputs) == ("required", 2, 2)
    assert not m.elementwise


def test_row_blocks_do_not_change_the_result(monkeypatch):
    base, model = randoms((12, 5), seed=3)
    whole = run([base, model])
    monkeypatch.setattr(arcee_fusion, "BLOCK", 7)  # one row per block, then a ragged end
    assert torch.equal(run([base, model]), whole)
    monkeypatch.setattr(arcee_fusion, "BLOCK", 23)
    assert torch.equal(run([base, model]), whole)


def tied_rows(dtype, seed):
    """Every base row the same, every model row that row plus one of five patterns: scores
    take a dozen values, so each quantile sits in a run of ties across all blocks."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, SPLIT_SHAPE[1], generator=g).expand(SPLIT_SHAPE[0], -1)
    patterns = torch.randint(-2, 3, (5, SPLIT_SHAPE[1]), generator=g) / 4
    which = torch.randint(0, 5, (SPLIT_SHAPE[0],), generator=g)
    return base.to(dtype), (base + patterns[which]).to(dtype)


@pytest.mark.parametrize(
    "dtype,tied", [(torch.bfloat16, False), (torch.float64, False), (torch.float32, True)]
)
def test_row_ranges_merge_to_the_whole_tensor(dtype, tied):
    base, model = tied_rows(dtype, 41) if tied else randoms(SPLIT_SHAPE, dtype, seed=41)
    whole, split, facts = merge_by_rows("arcee_fusion", [model, base], 1, {}, [{}, {}])
    assert torch.equal(split, whole)
    scores = arcee_fusion.importance(model.to(whole.dtype), base.to(whole.dtype)).reshape(-1)
    last = scores.numel() - 1
    for name, rank in zip(("q1", "median", "q3"), (last // 4, last // 2, 3 * last // 4)):
        assert facts[name]["value"] == torch.kthvalue(scores, rank + 1).values.item()
    if not tied:  # a real selection
        assert 0 < int((whole != base.to(whole.dtype)).sum()) < whole.numel() // 2


def test_a_vector_is_one_row_and_cannot_be_split():
    m = REGISTRY["arcee_fusion"]
    assert m.split_problem(2) is None and m.split_problem(3) is None
    assert "whole rows" in m.split_problem(1)
