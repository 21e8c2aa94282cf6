"""dare_linear and dare_ties against a slow reference, statistics (§4), edges, determinism.

The reference draws the same uniforms from the generator, but thresholds, rescales, elects
signs and combines element by element in float64 on its own, with `family` from
tests/reference.py, shared with the TIES, breadcrumbs and della tests.
"""

from __future__ import annotations

import math

import pytest
import torch

from raymerge.methods import REGISTRY
from raymerge.methods import random as rng
from raymerge.methods.base import MergeInputs
from tests.reference import family

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run(method, tensors, base_index, per_input, shared=None, name="t", seed=0):
    m = REGISTRY[method]
    values = {p.name: p.default for p in m.params if p.scope == "shared"}
    values.update(shared or {})
    full = [
        {}
        if i == base_index
        else {
            **{p.name: p.default for p in m.params if p.scope == "non_base" and not p.required},
            **params,
        }
        for i, params in enumerate(per_input)
    ]
    return m.merge(MergeInputs(name, list(tensors), base_index, values, full, seed))


def randoms(count, shape=(9, 13), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(count)]


def dare_trim(density, seed, name, position):
    def trim(flat):
        if density >= 1:
            return list(flat)
        u = rng.uniform(rng.key(seed, name, position), len(flat)).tolist()
        return [v if u[j] < density else 0.0 for j, v in enumerate(flat)]

    return trim


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("densities", [[0.5, 0.3, 0.9], [1.0, 1.0, 1.0], [0.0, 0.2, 0.01]])
def test_dare_matches_reference(dtype, method, densities):
    base, *models = randoms(4, dtype=dtype, seed=5)
    weights = [1.0, 0.6, -0.3]
    for shared in [{}, {"rescale": False, "normalize": True, "lambda": 0.7}]:
        got = run(
            method,
            [base] + models,
            0,
            [{}] + [{"weight": w, "density": d} for w, d in zip(weights, densities)],
            shared,
            name="layers.0.w",
            seed=3,
        )
        trims = [dare_trim(d, 3, "layers.0.w", i + 1) for i, d in enumerate(densities)]
        want = family(
            base,
            models,
            weights,
            trims,
            elect=method == "dare_ties",
            normalize=shared.get("normalize", False),
            rescale=shared.get("rescale", True),
            lam=shared.get("lambda", 1.0),
        )
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rescale", [True, False])
def test_dare_linear_statistics(rescale):
    """One model, weight 1: output - base = c * delta * mask with one c; zeros stay zero."""
    n = 200_000
    g = torch.Generator().manual_seed(9)
    delta = torch.randn(n, generator=g)
    delta[::10] = 0
    nonzero = delta != 0
    base = torch.zeros(n)
    zs = []
    for density, name in [(0.1, "a"), (0.5, "b"), (0.9, "c"), (0.3, "d")]:
        out = run(
            "dare_linear",
            [base, delta],
            0,
            [{}, {"weight": 1.0, "density": density}],
            {"rescale": rescale},
            name=name,
        )
        assert torch.all(out[~nonzero] == 0)
        kept = out != 0
        ratios = (out[kept] / delta[kept]).double()
        c = ratios.mean().item()
        torch.testing.assert_close(ratios, torch.full_like(ratios, c), rtol=2e-7, atol=0)
        m = int(nonzero.sum())
        k = int(kept.sum())
        z = (k - m * density) / math.sqrt(m * density * (1 - density))
        assert abs(z) < 5
        zs.append(z)
        l1 = delta.double().abs().sum() / delta[kept].double().abs().sum()
        assert c == pytest.approx(l1.item() if rescale else 1.0, rel=1e-6)
    assert abs(sum(zs) / math.sqrt(len(zs))) < 4


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_edges(method):
    base, a, b = randoms(3, dtype=torch.bfloat16, seed=6)
    one = [{}, {"weight": 1.0, "density": 0.0}]
    assert torch.equal(run(method, [base, a], 0, one), base.float())  # density 0: all dropped
    everything = run(method, [base, a], 0, [{}, {"weight": 1.0, "density": 1.0}])
    assert torch.equal(everything, base.float() + (a.float() - base.float()))
    zeros = run(method, [base, base.clone(), base.clone()], 0, [{}, *[one[1]] * 2])
    assert torch.equal(zeros, base.float())
    assert torch.equal(run(method, [base], 0, [{}]), base.float())  # no other model


def test_dare_ties_sign_ties_elect_plus():
    base = torch.zeros(6)
    a = torch.tensor([1.0, -1.0, 0.0, 2.0, 0.0, -3.0])
    per_input = [{}, {"weight": 1.0, "density": 1.0}, {"weight": 1.0, "density": 1.0}]
    got = run("dare_ties", [base, a, -a], 0, per_input, {"normalize": True})
    assert got.tolist() == [1.0, 1.0, 0.0, 2.0, 0.0, 3.0]


def test_dare_is_deterministic_per_seed_name_and_position():
    base, a = randoms(2, shape=(64, 64), seed=7)
    per_input = [{}, {"weight": 1.0, "density": 0.5}]
    first = run("dare_linear", [base, a], 0, per_input, name="w", seed=1)
    again = run("dare_linear", [base, a], 0, per_input, name="w", seed=1)
    assert first.numpy().tobytes() == again.numpy().tobytes()
    mask = first != base
    for name, seed in [("w", 2), ("v", 1)]:
        other = run("dare_linear", [base, a], 0, per_input, name=name, seed=seed)
        assert not torch.equal(other != base, mask)
    # the same model at another position draws another mask
    moved = run("dare_linear", [a, base], 1, [per_input[1], {}], name="w", seed=1)
    assert not torch.equal(moved != base, mask)


def test_defaults_follow_mergekit():
    for name, normalize in [("dare_linear", False), ("dare_ties", False)]:
        m = REGISTRY[name]
        assert m.param("normalize").default is normalize
        assert m.param("rescale").default is True
        assert m.param("density").default == 1.0
        assert m.base == "required"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_cuda_matches_cpu(method):
    base, a, b = randoms(3, shape=(300, 257), dtype=torch.bfloat16, seed=8)
    per_input = [{}, {"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.6}]
    cpu = run(method, [base, a, b], 0, per_input, name="w")
    gpu = run(method, [t.cuda() for t in (base, a, b)], 0, per_input, name="w").cpu()
    assert torch.equal(gpu != base.float(), cpu != base.float())
    torch.testing.assert_close(gpu, cpu, rtol=1e-6, atol=1e-6)
