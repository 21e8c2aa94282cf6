"""slerp against a slow float64 reference, on random inputs and the geometric edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from raymerge.methods import REGISTRY
from raymerge.methods.base import REQUIRED, MergeInputs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run(base, other, t, base_index=0):
    tensors = [base, other] if base_index == 0 else [other, base]
    shared = {"t": t}
    return REGISTRY["slerp"].merge(MergeInputs("w", tensors, base_index, shared, [{}, {}]))


def randoms(count, shape=(7, 11), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(count)]


def reference(t, v0, v1):
    """mergekit's slerp, element by element in float64."""
    a = v0.double().reshape(-1).tolist()
    b = v1.double().reshape(-1).tolist()
    norm_a = math.sqrt(math.fsum(x * x for x in a))
    norm_b = math.sqrt(math.fsum(x * x for x in b))
    unit_a = [x / norm_a for x in a] if norm_a > 1e-8 else a
    unit_b = [x / norm_b for x in b] if norm_b > 1e-8 else b
    cos = max(-1.0, min(1.0, math.fsum(x * y for x, y in zip(unit_a, unit_b))))
    if abs(cos) > 0.9995:
        c0, c1 = 1 - t, t
    else:
        theta = math.acos(cos)
        c0 = math.sin((1 - t) * theta) / math.sin(theta)
        c1 = math.sin(t * theta) / math.sin(theta)
    out = [c0 * x + c1 * y for x, y in zip(a, b)]
    return torch.tensor(out, dtype=torch.float64).reshape(v0.shape)


def close(got, want, tol=2e-6):
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_declaration_matches_mergekit():
    m = REGISTRY["slerp"]
    assert (m.base, m.min_inputs, m.max_inputs) == ("required", 2, 2)
    assert [(p.name, p.type, p.scope, p.default) for p in m.params] == [
        ("t", float, "shared", REQUIRED)
    ]
    assert m.check is None and not getattr(m, "elementwise", False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [0.25, 0.5, 0.9, 1.5, -0.3])
def test_matches_reference(dtype, t):
    base, other = randoms(2, dtype=dtype)
    got = run(base, other, t)
    close(got, reference(t, base, other))
    assert not torch.allclose(got, (1 - t) * base.float() + t * other.float(), atol=1e-3)


def test_base_is_the_t0_end_wherever_it_is_listed():
    base, other = randoms(2, seed=1)
    first = run(base, other, 0.3, base_index=0)
    second = run(base, other, 0.3, base_index=1)
    assert torch.equal(first, second)
    close(first, reference(0.3, base, other))


@pytest.mark.parametrize("dtype", DTYPES)
def test_endpoints_are_exact(dtype):
    base, other = randoms(2, dtype=dtype, seed=2)
    assert torch.equal(run(base, other, 0.0).to(dtype), base)
    assert torch.equal(run(base, other, 1.0).to(dtype), other)
    assert torch.equal(run(base, 2.5 * base, 0).to(dtype), base)  # lerp branch too
    assert torch.equal(run(base, -base, 1).to(dtype), -base)


@pytest.mark.parametrize("factor", [2.0, -3.0, 1.0])
def test_colinear_and_antiparallel_fall_back_to_lerp(factor):
    (base,) = randoms(1, seed=3)
    other = base * factor
    for t in [0.2, 0.7]:
        got = run(base, other, t)
        lerp = (1 - t) * base.double() + t * other.double()
        close(got, lerp)
        close(got, reference(t, base, other))


def test_equal_inputs_return_the_input():
    (base,) = randoms(1, dtype=torch.bfloat16, seed=4)
    got = run(base, base.clone(), 0.4)
    assert torch.equal(got.to(torch.bfloat16), base)


def test_zero_tensor_is_a_90_degree_slerp_not_a_lerp():
    (other,) = randoms(1, seed=5)
    zero = torch.zeros_like(other)
    t = 0.3
    got = run(zero, other, t)
    close(got, math.sin(t * math.pi / 2) * other.double())
    close(got, reference(t, zero, other))
    got = run(other, zero, t)
    close(got, math.sin((1 - t) * math.pi / 2) * other.double())
    assert torch.equal(run(zero, zero, t), zero)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_element_tensors(dtype):
    def one(x):
        return torch.tensor([x], dtype=dtype)

    t = 0.25
    # one element: the vectors are always (anti)parallel, so lerp, unless one is zero
    close(run(one(2.0), one(3.0), t), torch.tensor([2.25], dtype=torch.float64))
    close(run(one(2.0), one(-3.0), t), torch.tensor([0.75], dtype=torch.float64))
    want = torch.tensor([3 * math.sin(t * math.pi / 2)], dtype=torch.float64)
    close(run(one(0.0), one(3.0), t), want)
    scalar = run(torch.tensor(2.0, dtype=dtype), torch.tensor(3.0, dtype=dtype), t)
    assert scalar.shape == () and scalar.item() == 2.25


def test_empty_tensor():
    got = run(torch.zeros(0, 4), torch.zeros(0, 4), 0.5)
    assert got.shape == (0, 4)


def test_float64_stays_float64_and_inputs_are_not_modified():
    base, other = randoms(2, seed=6)
    copies = base.clone(), other.clone()
    run(base, other, 0.6)
    assert torch.equal(base, copies[0]) and torch.equal(other, copies[1])
    got = run(base.double(), other.double(), 0.6)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, reference(0.6, base, other), rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype):
    base, other = randoms(2, shape=(300, 257), dtype=dtype, seed=7)
    for t in [0.0, 0.35, 1.0]:
        cpu = run(base, other, t)
        gpu = run(base.cuda(), other.cuda(), t)
        assert gpu.is_cuda and gpu.dtype == torch.float32
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)
    for pair in [(base, -2 * base), (torch.zeros_like(base), other)]:
        gpu = run(*(x.cuda() for x in pair), 0.3).cpu()
        torch.testing.assert_close(gpu, run(*pair, 0.3), rtol=1e-5, atol=1e-6)
