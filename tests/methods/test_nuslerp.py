"""nuslerp against a slow float64 reference: whole tensors, rows, columns, with and without a
base, plus the geometric edge cases and the plan-time check."""

from __future__ import annotations

import math

import pytest
import torch

from raymerge.methods import REGISTRY
from raymerge.methods.base import REQUIRED, MergeInputs
from tests.methods.splitting import SPLIT_SHAPES, assert_split_gives_whole_bytes

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
METHOD = REGISTRY["nuslerp"]

# over three reduction blocks each: a matrix, one with 7-element rows, a vector


def run(x0, x1, weights=(1.0, 1.0), base=None, row_wise=False, flatten=True):
    tensors = [x0, x1] + ([] if base is None else [base])
    per_input = [{"weight": w} for w in weights] + ([] if base is None else [{}])
    shared = {"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten}
    base_index = None if base is None else 2
    return METHOD.merge(MergeInputs("w", tensors, base_index, shared, per_input))


def randoms(count, shape=(6, 9), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(count)]


def vectors(shape, row_wise, flatten):
    """Flat indices of each interpolated vector: all, each row (last dim) or along dim 0."""
    index = torch.arange(math.prod(shape)).reshape(shape)
    if flatten or len(shape) < 2:
        return [index.reshape(-1).tolist()]
    if row_wise:
        return index.movedim(0, -1).reshape(-1, shape[0]).tolist()
    return index.reshape(-1, shape[-1]).tolist()


def slerp_vector(t, a, b):
    """mergekit's nuslerp of one pair of vectors, in float64."""
    norm_a = max(math.sqrt(math.fsum(x * x for x in a)), 1e-7)
    norm_b = max(math.sqrt(math.fsum(x * x for x in b)), 1e-7)
    cos = math.fsum((x / norm_a) * (y / norm_b) for x, y in zip(a, b))
    cos = max(-1.0, min(1.0, cos))
    if 1 - cos * cos <= 16 * 2**-23:  # colinear up to fp32 rounding (mergekit: 1e-16)
        return [(1 - t) * x + t * y for x, y in zip(a, b)]
    theta = math.acos(cos)
    s0, s1, s = math.sin((1 - t) * theta), math.sin(t * theta), math.sin(theta)
    return [(s0 * x + s1 * y) / s for x, y in zip(a, b)]


def reference(x0, x1, weights=(1.0, 1.0), base=None, row_wise=False, flatten=True):
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    b = [0.0] * x0.numel() if base is None else base.double().reshape(-1).tolist()
    v0 = [x - y for x, y in zip(x0.double().reshape(-1).tolist(), b)]
    v1 = [x - y for x, y in zip(x1.double().reshape(-1).tolist(), b)]
    out = list(b)
    for idx in vectors(tuple(x0.shape), row_wise, flatten):
        merged = slerp_vector(t, [v0[i] for i in idx], [v1[i] for i in idx])
        for i, value in zip(idx, merged):
            out[i] += value
    return torch.tensor(out, dtype=torch.float64).reshape(x0.shape)


def close(got, want, tol=2e-6):
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_declaration_matches_mergekit():
    assert (METHOD.base, METHOD.min_inputs, METHOD.max_inputs) == ("optional", 2, 3)
    assert [(p.name, p.type, p.scope, p.default) for p in METHOD.params] == [
        ("weight", float, "non_base", REQUIRED),
        ("nuslerp_row_wise", bool, "shared", False),
        ("nuslerp_flatten", bool, "shared", True),
    ]
    assert not getattr(METHOD, "elementwise", False)


def test_check_wants_exactly_two_models_besides_the_base():
    shared = {"nuslerp_row_wise": False, "nuslerp_flatten": True}
    assert METHOD.check(shared, [{"weight": 1.0}, {"weight": 2.0}]) is None
    assert METHOD.check(shared, [{"weight": 1.0}, {"weight": 2.0}, {}]) is None
    assert "got 1" in METHOD.check(shared, [{"weight": 1.0}, {}])
    assert "got 3" in METHOD.check(shared, [{"weight": 1.0}] * 3)
    with pytest.raises(ValueError, match="exactly two"):
        METHOD.merge(MergeInputs("w", randoms(2), 0, shared, [{}, {"weight": 1.0}]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize(
    "row_wise,flatten", [(False, True), (True, True), (False, False), (True, False)]
)
def test_matches_reference(dtype, with_base, row_wise, flatten):
    x0, x1, base = randoms(3, dtype=dtype, seed=1)
    base = base if with_base else None
    for weights in [(1.0, 1.0), (0.3, 0.9), (2.0, -0.5), (1.0, -1.0)]:
        got = run(x0, x1, weights, base, row_wise, flatten)
        close(got, reference(x0, x1, weights, base, row_wise, flatten))


@pytest.mark.parametrize("row_wise", [False, True])
def test_three_dimensional_tensors(row_wise):
    x0, x1, base = randoms(3, shape=(3, 4, 5), seed=2)
    got = run(x0, x1, (0.4, 0.6), base, row_wise, flatten=False)
    close(got, reference(x0, x1, (0.4, 0.6), base, row_wise, flatten=False))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("flatten", [True, False])
def test_endpoints_are_exact(dtype, with_base, flatten):
    x0, x1, base = randoms(3, dtype=dtype, seed=3)
    base = base if with_base else None
    at0 = run(x0, x1, (2.0, 0.0), base, flatten=flatten)
    at1 = run(x0, x1, (0.0, 3.0), base, flatten=flatten)
    if dtype == torch.float32 and with_base:  # base + (x - base) rounds in fp32
        close(at0, x0.double(), tol=1e-6)
        close(at1, x1.double(), tol=1e-6)
    else:
        assert torch.equal(at0.to(dtype), x0) and torch.equal(at1.to(dtype), x1)


@pytest.mark.parametrize("factor", [2.0, -3.0, 1.0, -1.0])
@pytest.mark.parametrize("with_base", [False, True])
def test_colinear_and_antiparallel_fall_back_to_lerp(factor, with_base):
    # -3.0 without a base: fp32 cos = -0.99999994, which mergekit's 1e-16 test takes for a
    # 0.02-degree angle, returning ~4000x the inputs; here it is a lerp
    (x0, base) = randoms(2, seed=4)
    base = base if with_base else torch.zeros_like(x0)
    x1 = base + factor * (x0 - base)
    got = run(x0, x1, (0.25, 0.75), base if with_base else None)
    close(got, 0.25 * x0.double() + 0.75 * x1.double(), tol=1e-5)


def test_zero_task_vector_is_a_90_degree_slerp():
    x0, base = randoms(2, seed=5)
    t = 0.75
    got = run(x0, base.clone(), (0.25, 0.75), base)
    close(got, base.double() + math.sin((1 - t) * math.pi / 2) * (x0.double() - base.double()))
    # rows: a zero row of one model makes that row a 90-degree slerp, the others are normal
    x1 = randoms(1, seed=6)[0]
    x1[2] = 0
    got = run(x0, x1, (0.5, 0.5), flatten=False)
    close(got, reference(x0, x1, (0.5, 0.5), flatten=False))
    close(got[2], math.sin(math.pi / 4) * x0[2].double())


def test_equal_inputs_and_zero_weights():
    x0, base = randoms(2, dtype=torch.bfloat16, seed=7)
    assert torch.equal(run(x0, x0.clone(), (0.3, 0.7)).to(torch.bfloat16), x0)
    assert torch.equal(run(x0, x0.clone(), (0.3, 0.7), base).to(torch.bfloat16), x0)
    # weights summing to ~0 give t = 0.5
    x1 = randoms(1, seed=8)[0]
    close(run(x0, x1, (1.0, -1.0)), reference(x0, x1, (0.5, 0.5)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("flatten", [True, False])
def test_one_element_tensors(dtype, flatten):
    def one(x):
        return torch.tensor([x], dtype=dtype)

    weights = (0.75, 0.25)
    close(run(one(2.0), one(3.0), weights, flatten=flatten), one(2.25).double())
    close(run(one(2.0), one(-3.0), weights, flatten=flatten), one(0.75).double())
    want = torch.tensor([3 * math.sin(math.pi / 8)], dtype=torch.float64)
    close(run(one(0.0), one(3.0), weights, flatten=flatten), want)
    close(run(one(1.0), one(4.0), weights, one(1.0), flatten=flatten), 1 + want)
    scalar = run(torch.tensor(2.0), torch.tensor(3.0), weights, flatten=flatten)
    assert scalar.shape == () and scalar.item() == 2.25


def test_inputs_are_not_modified():
    x0, x1, base = randoms(3, seed=9)
    copies = [x.clone() for x in (x0, x1, base)]
    run(x0, x1, (0.5, 1.0), base, flatten=False, row_wise=True)
    assert all(torch.equal(a, b) for a, b in zip((x0, x1, base), copies))


def test_small_angles_are_still_spherical():
    (x0,) = randoms(1, seed=10)
    x1 = x0 + 0.05 * randoms(1, seed=11)[0]
    got = run(x0, x1, (0.5, 0.5))
    close(got, reference(x0, x1, (0.5, 0.5)))
    assert not torch.allclose(got, 0.5 * x0 + 0.5 * x1, rtol=0, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("row_wise,flatten", [(False, True), (False, False), (True, False)])
def test_cuda_matches_cpu(row_wise, flatten):
    x0, x1, base = randoms(3, shape=(300, 257), dtype=torch.bfloat16, seed=12)
    for b in [None, base]:
        cpu = run(x0, x1, (0.3, 0.8), b, row_wise, flatten)
        cuda = [x0.cuda(), x1.cuda(), None if b is None else b.cuda()]
        gpu = run(cuda[0], cuda[1], (0.3, 0.8), cuda[2], row_wise, flatten)
        assert gpu.is_cuda and gpu.dtype == torch.float32
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-4)
    x = x0.float().cuda()  # -3x is exact in fp32: exactly anti-parallel
    gpu = run(x, -3 * x, (0.25, 0.75), row_wise=row_wise, flatten=flatten)
    torch.testing.assert_close(gpu.cpu(), 0.25 * x0.float() - 2.25 * x0.float())


@pytest.mark.parametrize("shape", SPLIT_SHAPES, ids=str)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("row_wise,flatten", [(False, True), (True, False), (False, False)])
def test_merged_block_by_block_gives_the_whole_bytes(shape, with_base, row_wise, flatten):
    x0, x1, base = randoms(3, shape=shape, dtype=torch.bfloat16, seed=13)
    tensors = [x0, x1] + ([base] if with_base else [])
    per_input = [{"weight": 0.7}, {"weight": 0.4}] + ([{}] if with_base else [])
    shared = {"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten}
    inputs = MergeInputs("w", tensors, 2 if with_base else None, shared, per_input)
    assert_split_gives_whole_bytes(METHOD, inputs)
