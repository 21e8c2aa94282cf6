"""della and della_linear against a per-row reference, the epsilon check, statistics, edges."""

from __future__ import annotations

import math

import pytest
import torch

from raymerge.methods import REGISTRY
from raymerge.methods import random as rng
from raymerge.methods.sparsify import della_magprune
from tests.methods.test_dare import DTYPES, family, randoms, run


def magprune_ref(flat, shape, density, epsilon, stream):
    """Rank |v| within each row along dim 1 (ties by position), keep with a rising probability.

    Draw d belongs to the entry at position d of the tensor viewed as rows (dim 1 moved last).
    """
    if density >= 1:
        return list(flat)
    if density <= 0:
        return [0.0] * len(flat)
    shape = list(shape) if len(shape) >= 2 else [1, max(1, len(flat))]
    m = shape[1]
    outer = shape[0]
    inner = math.prod(shape[2:])
    u = rng.uniform(stream, len(flat)).tolist()
    out = [0.0] * len(flat)
    for a in range(outer):
        for c in range(inner):
            row = [(a * m + j) * inner + c for j in range(m)]  # flat indices along dim 1
            ranked = sorted(range(m), key=lambda j: (abs(flat[row[j]]), j))
            for rank, j in enumerate(ranked):
                norm = rank / (m - 1) if m > 1 else 0.5
                p = (density - epsilon) + norm * 2 * epsilon
                draw = (a * inner + c) * m + j
                if u[draw] < p:
                    out[row[j]] = flat[row[j]]
    return out


def magprune_trim(density, epsilon, shape, seed, name, position):
    stream = rng.key(seed, name, position)
    return lambda flat: magprune_ref(flat, shape, density, epsilon, stream)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("shape", [(9, 13), (40,), (3, 5, 4)])
def test_della_matches_reference(dtype, method, shape):
    base, *models = randoms(4, shape=shape, dtype=dtype, seed=21)
    densities, epsilons, weights = [0.5, 0.3, 1.0], [0.15, 0.1, 0.3], [1.0, 0.5, 0.25]
    per_input = [{}] + [
        {"weight": w, "density": d, "epsilon": e} for w, d, e in zip(weights, densities, epsilons)
    ]
    for shared in [{}, {"rescale": False, "normalize": method == "della_linear"}]:
        got = run(method, [base] + models, 0, per_input, shared, name="x", seed=4)
        trims = [
            magprune_trim(d, e, shape, 4, "x", i + 1)
            for i, (d, e) in enumerate(zip(densities, epsilons))
        ]
        want = family(
            base,
            models,
            weights,
            trims,
            elect=method == "della",
            normalize=shared.get("normalize", method == "della"),
            rescale=shared.get("rescale", True),
        )
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_keep_probability_rises_with_rank():
    """Per row the smallest tenth is kept about density - 0.9 eps, the largest density + 0.9 eps."""
    rows, m = 400, 500
    delta = torch.randn(rows, m, generator=torch.Generator().manual_seed(22))
    density, epsilon = 0.4, 0.2
    kept = della_magprune(delta, density, epsilon, rng.key(0, "stats", 1)) != 0
    ranks = delta.abs().argsort(dim=1).argsort(dim=1)
    for low, high in [(0, 50), (450, 500), (0, 500)]:
        band = (ranks >= low) & (ranks < high)
        centre = (low + high - 1) / 2 / (m - 1)
        p = density - epsilon + 2 * epsilon * centre
        n = int(band.sum())
        z = (int((kept & band).sum()) - n * p) / math.sqrt(n * p * (1 - p))
        assert abs(z) < 5, (low, high, z)


def test_chunking_and_scalar_and_one_column():
    delta = torch.randn(37, 11, generator=torch.Generator().manual_seed(23))
    stream = rng.key(0, "c", 1)
    whole = della_magprune(delta, 0.5, 0.2, stream)
    assert torch.equal(della_magprune(delta, 0.5, 0.2, stream, chunk=1), whole)
    assert torch.equal(della_magprune(delta, 0.5, 0.2, stream, chunk=50), whole)
    # a row of one entry keeps it with probability density (mergekit divides by zero there)
    column = della_magprune(delta[:, :1], 0.5, 0.2, stream)
    u = rng.uniform(stream, 37)
    assert torch.equal(column[:, 0] != 0, u < 0.5)
    scalar = torch.tensor(2.0)
    assert della_magprune(scalar, 0.5, 0.1, stream).shape == ()


def test_density_edges_and_zero_vectors():
    (delta,) = randoms(1, seed=24)
    stream = rng.key(0, "e", 1)
    assert torch.equal(della_magprune(delta, 1.0, 0.9, stream), delta)
    assert della_magprune(delta, 0.0, 0.9, stream).count_nonzero() == 0
    base = randoms(1, seed=25, dtype=torch.bfloat16)[0]
    per_input = [{}, {"weight": 1.0, "density": 0.5}, {"weight": 2.0, "density": 0.5}]
    for method in ("della", "della_linear"):
        same = run(method, [base, base.clone(), base.clone()], 0, per_input)
        assert torch.equal(same, base.float())
        assert torch.equal(run(method, [base], 0, [{}]), base.float())


def test_della_sign_ties_elect_plus_and_normalize():
    base = torch.zeros(6)
    a = torch.tensor([1.0, -1.0, 0.0, 2.0, 0.0, -3.0])
    per_input = [{}, {"weight": 1.0, "density": 1.0}, {"weight": 1.0, "density": 1.0}]
    got = run("della", [base, a, -a], 0, per_input)
    assert got.tolist() == [1.0, 1.0, 0.0, 2.0, 0.0, 3.0]  # one agreeing model: mean = value


def test_della_is_deterministic():
    base, a = randoms(2, shape=(32, 48), seed=26)
    per_input = [{}, {"weight": 1.0, "density": 0.4}]
    first = run("della_linear", [base, a], 0, per_input, name="w", seed=1)
    again = run("della_linear", [base, a], 0, per_input, name="w", seed=1)
    assert first.numpy().tobytes() == again.numpy().tobytes()
    other = run("della_linear", [base, a], 0, per_input, name="w", seed=2)
    assert not torch.equal(other != base, first != base)


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_epsilon_check(name):
    check = REGISTRY[name].check
    ok = [{}, {"weight": 1.0, "density": 0.5, "epsilon": 0.15}]
    assert check({}, ok) is None
    bad = [{}, ok[1], {"weight": 1.0, "density": 0.1, "epsilon": 0.15}]
    problem = check({}, bad)
    assert "input 2" in problem and "density 0.1" in problem and "epsilon 0.15" in problem
    assert "epsilon < 0.1" in problem
    high = check({}, [{}, {"weight": 1.0, "density": 0.9, "epsilon": 0.1}])
    assert high is not None and "(0, 1)" in high  # 0.9 + 0.1 = 1 is not inside
    # nothing is drawn at density 0 or 1, so epsilon does not matter there (as mergekit)
    assert check({}, [{}, {"weight": 1.0, "density": 1.0, "epsilon": 0.9}]) is None
    assert check({}, [{}, {"weight": 1.0, "density": 0.0, "epsilon": 0.9}]) is None


def test_defaults_follow_mergekit():
    for name, normalize in [("della", True), ("della_linear", False)]:
        m = REGISTRY[name]
        assert m.param("normalize").default is normalize
        assert m.param("rescale").default is True
        epsilon = m.param("epsilon")
        assert (epsilon.default, epsilon.scope, epsilon.low) == (0.15, "non_base", 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_della_cuda_mask_matches_cpu():
    delta = torch.randn(300, 1000, generator=torch.Generator().manual_seed(27))
    delta[:, ::7] = delta[:, :1]  # repeated magnitudes: rank ties by position
    stream = rng.key(3, "gpu", 1)
    cpu = della_magprune(delta, 0.4, 0.2, stream)
    gpu = della_magprune(delta.cuda(), 0.4, 0.2, stream).cpu()
    assert torch.equal(gpu, cpu)
    cube = torch.randn(6, 50, 7, generator=torch.Generator().manual_seed(28))
    gpu_cube = della_magprune(cube.cuda(), 0.4, 0.2, stream).cpu()
    assert torch.equal(gpu_cube, della_magprune(cube, 0.4, 0.2, stream))
