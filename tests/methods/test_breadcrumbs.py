"""breadcrumbs and breadcrumbs_ties against a sort-by-hand reference, with ties and edges."""

from __future__ import annotations

import pytest
import torch

from raymerge.methods import REGISTRY
from raymerge.methods.sparsify import lowest_mask, magnitude_outliers
from tests.methods.splitting import merge_by_rows, split_ties, tied_models
from tests.methods.test_dare import DTYPES, family, randoms, run


def shared_of(method, **values):
    shared = {p.name: p.default for p in REGISTRY[method].params if p.scope == "shared"}
    return shared | values


def outliers_trim(density, gamma):
    """Order by (|v|, index); keep positions n_bot .. n_bot + int(density n) - 1."""

    def trim(flat):
        if density >= 1:
            return list(flat)
        n = len(flat)
        target = int(density * n)
        bottom = max(0, n - target - int(gamma * n))
        order = sorted(range(n), key=lambda i: (abs(flat[i]), i))
        keep = set(order[bottom : bottom + target])
        return [v if i in keep else 0.0 for i, v in enumerate(flat)]

    return trim


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize(
    "densities,gammas",
    [
        ([0.5, 0.3, 0.9], [0.01, 0.01, 0.01]),
        ([0.9, 0.8, 0.99], [0.1, 0.3, 0.05]),  # density + gamma > 1: fewer outliers go
        ([1.0, 0.0, 0.005], [0.2, 0.2, 0.0]),
    ],
)
def test_breadcrumbs_matches_reference(dtype, method, densities, gammas):
    base, *models = randoms(4, dtype=dtype, seed=11)
    weights = [0.8, 1.0, 0.4]
    per_input = [{}] + [
        {"weight": w, "density": d, "gamma": g} for w, d, g in zip(weights, densities, gammas)
    ]
    for shared in [{}, {"rescale": True, "normalize": True, "lambda": 1.5}]:
        got = run(method, [base] + models, 0, per_input, shared)
        trims = [outliers_trim(d, g) for d, g in zip(densities, gammas)]
        want = family(
            base,
            models,
            weights,
            trims,
            elect=method == "breadcrumbs_ties",
            normalize=shared.get("normalize", False),
            rescale=shared.get("rescale", False),
            lam=shared.get("lambda", 1.0),
        )
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_small_example_drops_both_ends():
    delta = torch.arange(1.0, 11.0)
    # n 10: keep 5, drop the 2 largest (gamma 0.2) and so the 3 smallest
    assert magnitude_outliers(delta, 0.5, 0.2).tolist() == [0, 0, 0, 4, 5, 6, 7, 8, 0, 0]
    assert magnitude_outliers(-delta, 0.5, 0.0).tolist() == [0, 0, 0, 0, 0, -6, -7, -8, -9, -10]
    # density + gamma > 1: only 1 outlier fits
    assert magnitude_outliers(delta, 0.9, 0.5).tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]


def test_equal_magnitudes_rank_by_flat_index():
    delta = torch.tensor([[2.0, -2.0, 2.0], [-2.0, 2.0, 2.0]], dtype=torch.bfloat16).float()
    # all |v| equal: ascending order is the flat index; keep ranks 1..3 (bottom 1, top 2 gone)
    got = magnitude_outliers(delta, 0.5, 0.34)
    assert got.tolist() == [[0.0, -2.0, 2.0], [-2.0, 0.0, 0.0]]
    lowest = lowest_mask(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]), 3)
    assert lowest.tolist() == [True, True, False, False, True]


def test_density_edges_and_zero_vectors():
    (delta,) = randoms(1, seed=12)
    assert torch.equal(magnitude_outliers(delta, 1.0, 0.5), delta)  # gamma unused, as mergekit
    assert magnitude_outliers(delta, 0.0, 0.01).count_nonzero() == 0
    assert magnitude_outliers(delta, 0.01, 0.0).count_nonzero() == int(0.01 * delta.numel())
    zero = torch.zeros(5, 5)
    assert magnitude_outliers(zero, 0.3, 0.1).count_nonzero() == 0
    base = randoms(1, seed=13, dtype=torch.float16)[0]
    per_input = [{}, {"weight": 1.0, "density": 0.5}, {"weight": 2.0, "density": 0.5}]
    for method in ("breadcrumbs", "breadcrumbs_ties"):
        same = run(method, [base, base.clone(), base.clone()], 0, per_input)
        assert torch.equal(same, base.float())
        assert torch.equal(run(method, [base], 0, [{}]), base.float())


def test_breadcrumbs_ties_sign_ties_elect_plus():
    base = torch.zeros(6)
    a = torch.tensor([1.0, -1.0, 0.0, 2.0, 0.0, -3.0])
    per_input = [{}, {"weight": 1.0, "density": 1.0}, {"weight": 1.0, "density": 1.0}]
    got = run("breadcrumbs_ties", [base, a, -a], 0, per_input)
    assert got.tolist() == [1.0, 1.0, 0.0, 2.0, 0.0, 3.0]  # normalize false: sums


def test_defaults_follow_mergekit():
    for name in ("breadcrumbs", "breadcrumbs_ties"):
        m = REGISTRY[name]
        assert m.param("normalize").default is False
        assert m.param("rescale").default is False
        gamma = m.param("gamma")
        assert (gamma.default, gamma.scope, gamma.low, gamma.high) == (0.01, "non_base", 0, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_selection_matches_cpu():
    delta = torch.randn(300, 1000, generator=torch.Generator().manual_seed(14))
    delta = delta.bfloat16().float()  # few distinct magnitudes: many ties
    for density, gamma in [(0.3, 0.01), (0.9, 0.2), (0.0, 0.1), (0.5, 0.0)]:
        cpu = magnitude_outliers(delta, density, gamma)
        gpu = magnitude_outliers(delta.cuda(), density, gamma).cpu()
        assert torch.equal(gpu, cpu)


@pytest.mark.parametrize(
    "method,dtype,rescale",
    [
        ("breadcrumbs", torch.bfloat16, False),
        ("breadcrumbs", torch.float64, True),
        ("breadcrumbs_ties", torch.bfloat16, True),
        ("breadcrumbs_ties", torch.float64, False),
    ],
)
def test_row_ranges_merge_to_the_whole_tensor(method, dtype, rescale):
    base, models = tied_models(3, dtype, seed=21)
    trims = [(0.5, 0.1), (0.9, 0.01), (0.3, 0.6)]  # the last: density + gamma > 1
    per_input = [{}] + [{"weight": w, "density": d, "gamma": g}
                        for w, (d, g) in zip([0.7, 1.0, -0.4], trims)]  # fmt: skip
    shared = shared_of(method, rescale=rescale, normalize=rescale)
    whole, split, facts = merge_by_rows(method, [base, *models], 0, shared, per_input)
    assert torch.equal(split, whole)
    # each model's upper rank cuts a run of ties that spans every block
    assert all(split_ties(facts[f"t|{i} upto"]) == 4 for i in (1, 2, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("density,gamma", [(0.5, 0.1), (0.9, 0.2), (0.004, 0.0), (0.0, 0.1)])
def test_split_trim_is_magnitude_outliers(dtype, density, gamma):
    """One model of weight 1 over a zero base: the merge is the trimmed delta itself."""
    _, (delta,) = tied_models(1, dtype, seed=22)
    base = torch.zeros_like(delta)
    per_input = [{}, {"weight": 1.0, "density": density, "gamma": gamma}]
    whole, split, _ = merge_by_rows("breadcrumbs", [base, delta], 0, shared_of("breadcrumbs"),
                                    per_input)  # fmt: skip
    want = magnitude_outliers(delta, density, gamma)
    assert torch.equal(whole, want) and torch.equal(split, want)
