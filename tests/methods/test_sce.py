"""sce against a slow float64 reference: variance selection, energy weights, sign erasure."""

from __future__ import annotations

import struct

import pytest
import torch

from raymerge.methods import REGISTRY
from raymerge.methods.base import MergeInputs
from raymerge.methods.sce import select_mask
from tests.methods.splitting import SPLIT_SHAPE, merge_by_rows, split_ties
from tests.reference import as_f32

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run(tensors, select_topk=1.0, base_index=0):
    shared = {"select_topk": select_topk, "int8_mask": False}
    per_input = [{} for _ in tensors]
    return REGISTRY["sce"].merge(MergeInputs("t", list(tensors), base_index, shared, per_input))


def randoms(count, shape=(7, 11), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = [base + torch.randn(shape, generator=g) * (0.5 + i) for i in range(count)]
    return base.to(dtype), [m.to(dtype) for m in models]


def f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def reference(base, models, select_topk=1.0):
    b = as_f32(base)
    # the fp32 delta, as the fast path takes it: selection must see the same values
    deltas = [(as_f32(m) - b).double().reshape(-1).tolist() for m in models]
    n, count = b.numel(), len(models)
    if select_topk < 1:
        variances = []
        for j in range(n):
            values = [d[j] for d in deltas]
            mean = sum(values) / count
            variances.append(sum((v - mean) ** 2 for v in values) / count)
        nonzero = sum(1 for v in variances if v != 0)
        k = 0 if select_topk <= 0 else int(f32(f32(nonzero) * f32(select_topk)))
        keep = set(sorted(range(n), key=lambda j: (-variances[j], j))[:k])
        deltas = [[v if j in keep else 0.0 for j, v in enumerate(d)] for d in deltas]
    energies = [sum(v * v for v in d) / n for d in deltas]
    total = sum(energies)
    weights = [1 / count] * count if abs(total) < 1e-6 else [e / total for e in energies]
    out = []
    for j in range(n):
        values = [d[j] for d in deltas]
        positive = sum(values) >= 0
        agree = [(v > 0) if positive else (v < 0) for v in values]
        num = sum(w * v for w, v, a in zip(weights, values, agree) if a)
        den = sum(w for w, a in zip(weights, agree) if a)
        out.append(num / max(den, 1e-6))
    return b.double() + torch.tensor(out, dtype=torch.float64).reshape(b.shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.29, 0.05])
def test_matches_reference(dtype, select_topk):
    base, models = randoms(3, dtype=dtype, seed=1)
    got = run([base] + models, select_topk)
    assert got.dtype == torch.float32
    want = reference(base, models, select_topk)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_base_position_and_shapes():
    base, models = randoms(2, shape=(4, 3, 5), seed=2)
    got = run([models[0], base, models[1]], 0.4, base_index=1)
    torch.testing.assert_close(got.double(), reference(base, models, 0.4), rtol=1e-5, atol=1e-5)


def test_select_topk_zero_keeps_nothing():
    base, models = randoms(3, seed=3)
    assert torch.equal(run([base] + models, 0.0), base)


def test_select_topk_one_selects_nothing_away():
    base, models = randoms(2, seed=4)
    torch.testing.assert_close(run([base] + models, 1.0).double(), reference(base, models, 1.0))


def test_count_is_multiplied_in_float32():
    """mergekit's int(count_nonzero(var) * 0.29) is 29 for 100 entries; Python floats give 28."""
    deltas = [torch.zeros(100), torch.arange(1, 101, dtype=torch.float32)]
    assert int(select_mask(deltas, 0.29).sum()) == 29
    assert int(select_mask(deltas, 0.57).sum()) == 57
    # the 29 kept are the largest variances (the last entries)
    assert select_mask(deltas, 0.29)[71:].all()


def test_variance_ties_go_to_the_lowest_index_and_constant_entries_never_count():
    base = torch.zeros(8)
    a = torch.tensor([0.5, 1.0, 5.0, 1.0, 3.0, 1.0, 0.0, 1.0])
    b = torch.tensor([0.0, -1.0, 5.0, -1.0, 0.0, -1.0, 0.0, -1.0])
    # entries 2 and 6 do not vary, entry 4 varies most, 1, 3, 5, 7 tie: k = int(6 * 0.5) = 3
    mask = select_mask([a, b], 0.5)
    assert mask.tolist() == [False, True, False, True, True, False, False, False]
    torch.testing.assert_close(run([base, a, b], 0.5).double(), reference(base, [a, b], 0.5))


def test_one_model():
    base, (model,) = randoms(1, seed=5, dtype=torch.bfloat16)
    # alone, its task vector is kept whole (weight 1, every nonzero entry agrees) ...
    torch.testing.assert_close(run([base, model]), model.float(), rtol=0, atol=1e-6)
    # ... but nothing varies across one model, so any selection keeps nothing
    assert torch.equal(run([base, model], 0.5), base.float())
    assert torch.equal(run([base]), base.float())


def test_identical_models():
    base, (model,) = randoms(1, seed=6)
    tensors = [base, model, model.clone(), model.clone()]
    torch.testing.assert_close(run(tensors), model, rtol=0, atol=1e-6)
    assert torch.equal(run(tensors, 0.9), base)  # no variance: nothing selected


def test_all_zero_task_vectors_give_the_base():
    base, _ = randoms(1, seed=7, dtype=torch.float16)
    for topk in (1.0, 0.5):
        assert torch.equal(run([base, base.clone(), base.clone()], topk), base.float())


def test_sign_ties_elect_plus():
    base = torch.zeros(4)
    a = torch.tensor([1.0, -1.0, 2.0, 0.0])
    b = torch.tensor([-1.0, 1.0, -2.0, 0.0])
    got = run([base, a, b])
    assert got.tolist() == [1.0, 1.0, 2.0, 0.0]
    assert torch.equal(got.double(), reference(base, [a, b]))


def test_weight_sum_is_clamped_not_replaced():
    """Where only a near-zero-energy model agrees, its mean is divided by 1e-6, not its weight."""
    base = torch.zeros(10)
    big = torch.tensor([1000.0] * 9 + [0.0])
    small = torch.full((10,), 1e-3)
    got = run([base, big, small])
    want = reference(base, [big, small])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    assert 0 < got[9] < 1e-6


def test_declaration_matches_mergekit():
    m = REGISTRY["sce"]
    assert [(p.name, p.type, p.scope, p.default) for p in m.params] == [
        ("int8_mask", bool, "shared", False),
        ("select_topk", float, "shared", 1.0),
    ]
    assert (m.base, m.min_inputs, m.max_inputs) == ("required", 1, None)
    assert not m.elementwise


def split_inputs(seed, dtype=torch.float32):
    """A base and four models at SPLIT_SHAPE whose deltas are multiples of 1/8: the variances
    take few values (heavy ties at the top-k threshold, across every block); a tenth of the
    entries do not vary."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-64, 64, SPLIT_SHAPE, generator=g).double() / 8
    steady = torch.rand(SPLIT_SHAPE, generator=g) < 0.1
    offset = torch.randint(-4, 5, SPLIT_SHAPE, generator=g).double() / 8
    models = []
    for _ in range(4):
        delta = torch.randint(-8, 9, SPLIT_SHAPE, generator=g).double() / 8
        models.append((base + torch.where(steady, offset, delta)).to(dtype))
    return base.to(dtype), models


@pytest.mark.parametrize(
    "dtype,select_topk",
    [(torch.bfloat16, 0.37), (torch.float64, 0.37), (torch.float32, 0.9), (torch.bfloat16, 1.0),
     (torch.bfloat16, 0.0)],
)  # fmt: skip
def test_row_ranges_merge_to_the_whole_tensor(dtype, select_topk):
    base, models = split_inputs(31, dtype)
    shared = {"select_topk": select_topk, "int8_mask": False}
    per_input = [{} for _ in range(5)]
    tensors = [models[0], base, *models[1:]]
    whole, split, facts = merge_by_rows("sce", tensors, 1, shared, per_input)
    assert torch.equal(split, whole)
    if 0 < select_topk < 1:  # the threshold cuts a run of ties spanning every block
        assert split_ties(facts["variance"]) == 4
