"""multislerp against mergekit's algorithm written out in float64, tangent step included."""

from __future__ import annotations

import math

import pytest
import torch

from raymerge.methods import REGISTRY
from raymerge.methods.base import REQUIRED, MergeInputs
from tests.methods.splitting import SPLIT_SHAPES, assert_split_gives_whole_bytes

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
METHOD = REGISTRY["multislerp"]

# over three reduction blocks each: a matrix, one with 7-element rows, a vector


def run(tensors, weights, base=None, normalize_weights=True, eps=1e-8):
    tensors = list(tensors) + ([] if base is None else [base])
    per_input = [{"weight": w} for w in weights] + ([] if base is None else [{}])
    shared = {"normalize_weights": normalize_weights, "eps": eps}
    base_index = None if base is None else len(tensors) - 1
    return METHOD.merge(MergeInputs("w", tensors, base_index, shared, per_input))


def randoms(count, shape=(5, 8), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(count)]


def norm(v):
    return math.sqrt(math.fsum(x * x for x in v))


def reference(tensors, weights, base=None, normalize_weights=True, eps=1e-8):
    """mergekit's multislerp, element by element in float64 (its tangent step included)."""
    if len(tensors) == 1:
        return tensors[0].double()
    b = [0.0] * tensors[0].numel() if base is None else base.double().reshape(-1).tolist()
    xs = [[x - y for x, y in zip(t.double().reshape(-1).tolist(), b)] for t in tensors]
    if normalize_weights:
        weights = [w / sum(weights) for w in weights]
    norms = [norm(x) for x in xs]
    units = [[v / (n + eps) for v in x] for x, n in zip(xs, norms)]
    mean = [math.fsum(w * u[j] for w, u in zip(weights, units)) for j in range(len(b))]
    mean_norm = norm(mean)
    if mean_norm < eps:
        if len(xs) != 2:
            raise ValueError("mergekit: the weighted sum of the input tensors is zero")
        out = [weights[0] * p + weights[1] * q for p, q in zip(*xs)]
    else:
        mean = [m / mean_norm for m in mean]
        tangents = []
        for u in units:
            dot = math.fsum(p * q for p, q in zip(u, mean))
            tangents.append([p - dot * m for p, m in zip(u, mean)])
        tangent = [math.fsum(w * v[j] for w, v in zip(weights, tangents)) for j in range(len(b))]
        size = norm(tangent) + eps
        scale = math.fsum(n * w for n, w in zip(norms, weights))
        out = [
            (m * math.cos(size) + v * math.sin(size) / size) * scale for m, v in zip(mean, tangent)
        ]
    return torch.tensor([o + c for o, c in zip(out, b)], dtype=torch.float64).reshape(
        tensors[0].shape
    )


def close(got, want, tol=2e-6):
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_declaration_matches_mergekit():
    assert (METHOD.base, METHOD.min_inputs, METHOD.max_inputs) == ("optional", 1, None)
    assert [(p.name, p.type, p.scope, p.default) for p in METHOD.params] == [
        ("weight", float, "non_base", REQUIRED),
        ("normalize_weights", bool, "shared", True),
        ("eps", float, "shared", 1e-8),
    ]
    assert not getattr(METHOD, "elementwise", False)


def test_check():
    shared = {"normalize_weights": True, "eps": 1e-8}
    assert METHOD.check(shared, [{"weight": 1.0}]) is None
    assert METHOD.check(shared, [{"weight": 1.0}, {}]) is None
    assert "at least one" in METHOD.check(shared, [{}])
    assert "sum to zero" in METHOD.check(shared, [{"weight": 1.0}, {"weight": -1.0}, {}])
    assert METHOD.check(shared, [{"weight": 0.0}]) is None  # one model: nothing to normalize
    unnormalized = {**shared, "normalize_weights": False}
    assert METHOD.check(unnormalized, [{"weight": 1.0}, {"weight": -1.0}]) is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize_weights", [True, False])
def test_matches_reference(dtype, count, with_base, normalize_weights):
    *tensors, base = randoms(count + 1, dtype=dtype, seed=count)
    base = base if with_base else None
    weights = [0.5, 1.25, 0.3][:count]
    got = run(tensors, weights, base, normalize_weights)
    close(got, reference(tensors, weights, base, normalize_weights))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_base", [False, True])
def test_one_model_is_returned_as_it_is(dtype, with_base):
    x, base = randoms(2, dtype=dtype, seed=1)
    got = run([x], [0.3], base if with_base else None)
    assert got.dtype == torch.float32 and torch.equal(got.to(dtype), x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_zero_weight_gives_the_other_model(dtype):
    x0, x1, base = randoms(3, dtype=dtype, seed=2)
    close(run([x0, x1], [1.0, 0.0]), x0.double(), tol=1e-6)
    close(run([x0, x1], [0.0, 2.0], base), x1.double(), tol=1e-5)


@pytest.mark.parametrize("factor", [2.0, 0.5])
def test_colinear_is_lerp(factor):
    (x,) = randoms(1, seed=3)
    got = run([x, factor * x], [0.25, 0.75])
    close(got, (0.25 + 0.75 * factor) * x.double())


def test_antiparallel():
    (x,) = randoms(1, seed=4)
    # equal weights cancel: mergekit's lerp fallback, here also with a base
    close(run([x, -x], [1.0, 1.0]), torch.zeros_like(x, dtype=torch.float64))
    # bf16-valued: base +- x is exact in fp32, so the task vectors are exactly x and -x
    x, base = (v.bfloat16().float() for v in randoms(2, seed=5))
    assert torch.equal(run([base + x, base - x], [1.0, 1.0], base), base)
    # unequal weights: the direction of the heavier one, at the mean norm
    close(run([x, -2 * x], [0.75, 0.25]), reference([x, -2 * x], [0.75, 0.25]))
    close(run([x, -2 * x], [0.75, 0.25]), 1.25 * x.double())


def test_cancelling_three_models_fall_back_to_lerp_where_mergekit_raises():
    x, base = randoms(2, seed=6)
    tensors = [base.clone(), base.clone(), base.clone()]  # all equal to the base: tau_i = 0
    with pytest.raises(ValueError):
        reference(tensors, [1.0, 2.0, 3.0], base)
    assert torch.equal(run(tensors, [1.0, 2.0, 3.0], base), base)
    got = run([x, -x, 2 * x], [1.0, 2.0, 1.0])  # units u, -u, u at weights .25 .5 .25
    close(got, 0.25 * x.double() - 0.5 * x.double() + 0.5 * x.double())


def test_zero_task_vector():
    x0, x1, base = randoms(3, seed=7)
    tensors = [x0, base.clone(), x1]  # the middle model equals the base
    got = run(tensors, [1.0, 1.0, 1.0], base)
    close(got, reference(tensors, [1.0, 1.0, 1.0], base))


def test_equal_inputs():
    (x,) = randoms(1, dtype=torch.bfloat16, seed=8)
    got = run([x, x.clone(), x.clone()], [0.2, 0.3, 0.5])
    close(got, x.double(), tol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_element_tensors(dtype):
    def one(x):
        return torch.tensor([x], dtype=dtype)

    # one element: units are +-1, so the direction is the sign of the weighted sign sum
    for values, weights in [((2.0, 3.0), (0.5, 0.5)), ((2.0, -3.0), (0.75, 0.25))]:
        tensors = [one(v) for v in values]
        close(run(tensors, weights), reference(tensors, weights))
    close(run([one(2.0), one(-3.0), one(1.0)], [1, 1, 1]), one(2.0).double())
    close(run([one(0.0), one(4.0)], [0.5, 0.5], one(0.0)), one(2.0).double())


def test_inputs_are_not_modified():
    x0, x1, base = randoms(3, seed=9)
    copies = [x.clone() for x in (x0, x1, base)]
    run([x0, x1], [0.4, 0.6], base)
    assert all(torch.equal(a, b) for a, b in zip((x0, x1, base), copies))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("with_base", [False, True])
def test_cuda_matches_cpu(with_base):
    *tensors, base = randoms(4, shape=(300, 257), dtype=torch.bfloat16, seed=10)
    base = base if with_base else None
    weights = [0.2, 0.5, 0.9]
    cpu = run(tensors, weights, base)
    gpu = run([t.cuda() for t in tensors], weights, None if base is None else base.cuda())
    assert gpu.is_cuda and gpu.dtype == torch.float32
    # 77k-element fp32 norms: CPU's own error against float64 is ~2e-5 here
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-4)
    same = [torch.zeros_like(tensors[0]).cuda()] * 3
    assert torch.equal(run(same, weights, same[0]), same[0].float())


@pytest.mark.parametrize("shape", SPLIT_SHAPES, ids=str)
@pytest.mark.parametrize("with_base", [False, True])
def test_merged_block_by_block_gives_the_whole_bytes(shape, with_base):
    *tensors, base = randoms(4, shape=shape, dtype=torch.bfloat16, seed=11)
    tensors += [base] if with_base else []
    per_input = [{"weight": w} for w in (0.5, 1.25, 0.3)] + ([{}] if with_base else [])
    shared = {"normalize_weights": True, "eps": 1e-8}
    inputs = MergeInputs("w", tensors, 3 if with_base else None, shared, per_input)
    assert_split_gives_whole_bytes(METHOD, inputs)
