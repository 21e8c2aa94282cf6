"""karcher against mergekit's iteration written out in float64 on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from raymerge.methods import REGISTRY
from raymerge.methods.base import MergeInputs
from tests.methods.splitting import SPLIT_SHAPES, assert_split_gives_whole_bytes

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
METHOD = REGISTRY["karcher"]

# over three reduction blocks each: a matrix, one with 7-element rows, a vector


def run(tensors, max_iter=10, tol=1e-5, base_index=None):
    shared = {"max_iter": max_iter, "tol": tol}
    per_input = [{} for _ in tensors]
    return METHOD.merge(MergeInputs("w", list(tensors), base_index, shared, per_input))


def randoms(count, shape=(4, 6), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(count)]


def norm(v):
    return math.sqrt(math.fsum(x * x for x in v))


def reference(tensors, max_iter=10, tol=1e-5):
    """mergekit's weighted Karcher mean at equal weights, element by element in float64."""
    if len(tensors) == 1:
        return tensors[0].double()
    shape = tensors[0].shape
    xs = [t.double().reshape(-1).tolist() for t in tensors]
    alphas = [1 / len(xs)] * len(xs)
    norms = [norm(x) for x in xs]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros(shape, dtype=torch.float64)
    weights = [alphas[i] / sum(alphas[j] for j in valid) for i in valid]
    units = [[v / norms[i] for v in xs[i]] for i in valid]
    size = len(xs[0])
    mean = [math.fsum(w * u[j] for w, u in zip(weights, units)) for j in range(size)]
    mean_norm = norm(mean)
    mean = list(units[0]) if mean_norm < tol else [m / mean_norm for m in mean]
    for _ in range(max_iter):
        tangent = [0.0] * size
        for w, u in zip(weights, units):
            dot = max(-1.0, min(1.0, math.fsum(p * q for p, q in zip(mean, u))))
            theta = math.acos(dot)
            if theta < tol:
                continue
            for j in range(size):
                tangent[j] += w * theta / math.sin(theta) * (u[j] - dot * mean[j])
        step = norm(tangent)
        if step < tol:
            break
        mean = [math.cos(step) * m + math.sin(step) * v / step for m, v in zip(mean, tangent)]
        length = norm(mean)
        if length > tol:
            mean = [m / length for m in mean]
    scale = math.fsum(a * n for a, n in zip(alphas, norms))
    return torch.tensor([scale * m for m in mean], dtype=torch.float64).reshape(shape)


def close(got, want, tol=2e-6):
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_declaration_matches_mergekit():
    assert (METHOD.base, METHOD.min_inputs, METHOD.max_inputs) == ("ignored", 1, None)
    assert [(p.name, p.type, p.scope, p.default) for p in METHOD.params] == [
        ("max_iter", int, "shared", 10),
        ("tol", float, "shared", 1e-5),
    ]
    assert METHOD.check is None and not getattr(METHOD, "elementwise", False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", [2, 3, 5])
def test_matches_reference(dtype, count):
    tensors = randoms(count, dtype=dtype, seed=count)
    close(run(tensors), reference(tensors))


@pytest.mark.parametrize("max_iter", [0, 1, 3, 50])
def test_iteration_count_and_tolerance(max_iter):
    tensors = randoms(3, seed=1)
    close(run(tensors, max_iter), reference(tensors, max_iter))
    close(run(tensors, max_iter, tol=0.1), reference(tensors, max_iter, tol=0.1))
    if max_iter == 0:  # no steps: the normalized Euclidean mean of the directions
        units = [t.double() / t.double().norm() for t in tensors]
        mean = sum(units)
        scale = sum(t.double().norm() for t in tensors) / 3
        close(run(tensors, 0), mean / mean.norm() * scale)


def test_converged_mean_is_a_fixed_point():
    tensors = randoms(3, seed=2)
    a = run(tensors, 10)
    b = run(tensors, 100)
    close(a, b.double(), tol=1e-5)
    # the Riemannian gradient vanishes: the log maps at the mean sum to ~0
    m = (a / a.norm()).double().reshape(-1)
    total = torch.zeros_like(m)
    for t in tensors:
        u = t.double().reshape(-1) / t.double().norm()
        theta = torch.arccos(torch.dot(m, u).clamp(-1, 1))
        total += theta / torch.sin(theta) * (u - torch.dot(m, u) * m)
    assert total.norm() < 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_model_is_returned_as_it_is(dtype):
    (x,) = randoms(1, dtype=dtype, seed=3)
    got = run([x])
    assert got.dtype == torch.float32 and torch.equal(got.to(dtype), x)


def test_base_is_just_another_input():
    tensors = randoms(3, seed=4)
    close(run(tensors, base_index=2), reference(tensors))
    assert torch.equal(run(tensors, base_index=2), run(tensors))


@pytest.mark.parametrize("factor", [2.0, 0.5])
def test_colinear_gives_the_mean_norm_on_the_common_direction(factor):
    (x,) = randoms(1, seed=5)
    close(run([x, factor * x]), (1 + factor) / 2 * x.double())


def test_antiparallel_is_finite_at_the_mean_norm():
    # a and -a have no unique Karcher mean (the whole equator is one); as in mergekit the
    # direction found depends on rounding, but the result is finite with the mean norm
    for seed in range(4):
        (x,) = randoms(1, seed=10 + seed)
        got = run([x, -2 * x])
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.norm().item(), 1.5 * x.norm().item(), rtol=1e-5, atol=0)


def test_zero_tensors():
    x0, x1 = randoms(2, seed=6)
    zero = torch.zeros_like(x0)
    # a zero input drops out of the direction but counts in the mean norm
    got = run([x0, zero, x1])
    close(got, reference([x0, zero, x1]))
    direction = run([x0, x1]) / run([x0, x1]).norm()
    close(got, direction.double() * (x0.norm() + x1.norm()).double() / 3, tol=1e-5)
    assert torch.equal(run([zero, zero.clone()]), zero)
    close(run([zero, x0]), x0.double() / 2)


def test_equal_inputs():
    (x,) = randoms(1, dtype=torch.bfloat16, seed=7)
    close(run([x, x.clone(), x.clone()]), x.double(), tol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_element_tensors(dtype):
    def one(x):
        return torch.tensor([x], dtype=dtype)

    close(run([one(2.0), one(4.0)]), one(3.0).double())
    close(run([one(2.0), one(4.0), one(0.0)]), one(2.0).double())
    got = run([one(2.0), one(-4.0), one(3.0)])  # directions +1, -1, +1: the mean is +1
    close(got, reference([one(2.0), one(-4.0), one(3.0)]))
    close(got, one(3.0).double())


def test_inputs_are_not_modified():
    tensors = randoms(3, seed=8)
    copies = [t.clone() for t in tensors]
    run(tensors)
    assert all(torch.equal(a, b) for a, b in zip(tensors, copies))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("count", [2, 3])
def test_cuda_matches_cpu(count):
    tensors = randoms(count, shape=(300, 257), dtype=torch.bfloat16, seed=11)
    cpu = run(tensors)
    gpu = run([t.cuda() for t in tensors])
    assert gpu.is_cuda and gpu.dtype == torch.float32
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-4)
    zero = torch.zeros_like(tensors[0]).cuda()
    assert torch.equal(run([zero, zero]), zero.float())


@pytest.mark.parametrize("shape", SPLIT_SHAPES, ids=str)
def test_merged_block_by_block_gives_the_whole_bytes(shape):
    tensors = randoms(3, shape=shape, dtype=torch.bfloat16, seed=12)
    shared = {"max_iter": 10, "tol": 1e-5}
    assert_split_gives_whole_bytes(METHOD, MergeInputs("w", tensors, None, shared, [{}] * 3))
