"""Feature matching of ZipIt and permute (raymerge/zipit/match.py), against slow references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from raymerge.zipit.match import (
    correlation,
    kv_order,
    match_heads,
    permute_clusters,
    residual_permutations,
    zip_clusters,
)

ALPHAS = (1e-4, 0.1, 0.3, 0.5, 1.0)
BETAS = (0.0, 0.075, 0.125, 0.5, 1.0)
KINDS = ("plain", "duplicates", "rounded", "nan", "constant")

# ----------------------------------------------------------------------------- references


def zip_clusters_slow(corr, models, alpha, beta):
    """The official greedy loop, literally: full argmax each step, rows/columns deleted.

    Returns the cluster ids and how many same-label merges each model made.
    """
    size = corr.shape[0]
    n = size // models
    sim = np.array(corr, dtype=np.float64)
    sim[np.isnan(sim)] = -np.inf
    np.fill_diagonal(sim, -np.inf)
    members = [[k] for k in range(size)]
    labels = [k // n for k in range(size)]
    budget = [int((size - n) // models * beta)] * models
    same_label_merges = [0] * models
    while len(members) > n:
        i, j = divmod(int(np.argmax(sim)), len(members))
        if sim[i, j] == -np.inf:
            i, j = 0, next(k for k, lab in enumerate(labels) if lab != labels[0])
        assert i < j
        row = alpha * np.minimum(sim[i], sim[j])
        row[i] = -np.inf
        sim[i, :] = row
        sim[:, i] = row
        sim = np.delete(np.delete(sim, j, axis=0), j, axis=1)
        members[i] += members.pop(j)
        label_j = labels.pop(j)
        if labels[i] == label_j:
            same_label_merges[label_j] += 1
            budget[label_j] -= 1
            if budget[label_j] <= 0:
                spent = np.array(labels) == label_j
                sim[np.ix_(spent, spent)] = -np.inf
    ids = np.empty(size, dtype=np.int64)
    for cid, group in enumerate(sorted(members, key=min)):
        ids[group] = cid
    return ids, same_label_merges


def stats(x):
    """(count, total, outer) of token rows x [T, F]."""
    x = np.asarray(x, dtype=np.float64)
    return x.shape[0], x.sum(axis=0), x.T @ x


def corr_of(x):
    return correlation(*stats(x))


def random_features(rng, models, n, tokens=40):
    """Features of `models` models sharing a few latent signals, so some pairs correlate."""
    latent = rng.standard_normal((tokens, max(2, n // 3)))
    mix = rng.standard_normal((latent.shape[1], models * n)) * (rng.random(models * n) < 0.5)
    return latent @ mix + rng.standard_normal((tokens, models * n))


def case_matrix(rng, models, n, kind):
    """Random correlation matrices with the awkward cases: ties, NaN, constant features."""
    x = random_features(rng, models, n)
    size = models * n
    if kind == "duplicates":
        for _ in range(max(1, size // 4)):
            a, b = rng.integers(size, size=2)
            x[:, b] = x[:, a]
    if kind == "constant":
        x[:, rng.integers(size, size=max(1, size // 5))] = 3.0
    corr = corr_of(x)
    if kind == "rounded":
        corr = np.round(corr, 1)
    if kind == "nan":
        a = rng.integers(size, size=max(1, size // 3))
        b = rng.integers(size, size=a.size)
        corr[a, b] = corr[b, a] = np.nan
        k = rng.integers(size)
        corr[k] = corr[:, k] = np.nan
    return corr


def ids_to_clusters(ids):
    return [set(np.flatnonzero(ids == c)) for c in range(ids.max() + 1)]


# ----------------------------------------------------------------------------- correlation


def test_correlation_matches_corrcoef():
    rng = np.random.default_rng(0)
    x = random_features(rng, 2, 8, tokens=200) + 5.0
    np.testing.assert_allclose(corr_of(x), np.corrcoef(x, rowvar=False), atol=1e-10)


def test_correlation_constant_feature_is_zero_not_nan():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 4))
    x[:, 2] = 3.0
    corr = corr_of(x)
    assert np.isfinite(corr).all()
    np.testing.assert_allclose(corr[2], 0.0, atol=1e-6)
    np.testing.assert_allclose(corr[:, 2], 0.0, atol=1e-6)


def test_correlation_needs_tokens():
    with pytest.raises(ValueError):
        correlation(0, np.zeros(2), np.zeros((2, 2)))


# ----------------------------------------------------------------------------- zip


@pytest.mark.parametrize(
    "models,n", [(2, 1), (2, 2), (3, 1), (2, 7), (3, 5), (4, 3), (2, 30), (3, 16), (4, 12)]
)
@pytest.mark.parametrize("kind", KINDS)
def test_zip_matches_slow_reference(models, n, kind):
    rng = np.random.default_rng([models, n, KINDS.index(kind)])
    corr = case_matrix(rng, models, n, kind)
    before = corr.copy()
    for alpha, beta in itertools.product(ALPHAS, BETAS):
        expected, _ = zip_clusters_slow(corr, models, alpha, beta)
        got = zip_clusters(corr, models, alpha, beta)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, expected, err_msg=f"alpha={alpha} beta={beta}")
    np.testing.assert_array_equal(corr, before)


def test_zip_matches_slow_reference_at_2x60():
    rng = np.random.default_rng(7)
    for kind in ("plain", "rounded"):
        corr = case_matrix(rng, 2, 60, kind)
        for alpha, beta in [(0.3, 0.125), (1.0, 0.0), (1e-4, 1.0)]:
            expected, _ = zip_clusters_slow(corr, 2, alpha, beta)
            np.testing.assert_array_equal(zip_clusters(corr, 2, alpha, beta), expected)


def test_zip_fast_path_at_600_matches_slow_reference():
    rng = np.random.default_rng(8)
    corr = np.round(case_matrix(rng, 2, 600, "plain"), 3)
    expected, _ = zip_clusters_slow(corr, 2, 0.3, 0.125)
    np.testing.assert_array_equal(zip_clusters(corr, 2, 0.3, 0.125), expected)


def test_zip_reads_only_the_upper_triangle():
    rng = np.random.default_rng(9)
    corr = case_matrix(rng, 3, 8, "plain")
    noisy = corr + np.tril(rng.normal(scale=1e-3, size=corr.shape), -1)
    expected, _ = zip_clusters_slow(corr, 3, 0.3, 0.125)
    np.testing.assert_array_equal(zip_clusters(noisy, 3, 0.3, 0.125), expected)


def test_zip_all_minus_inf_merges_first_cross_model_pair():
    corr = np.full((6, 6), np.nan)
    ids = zip_clusters(corr, 2, 0.5, 1.0)
    np.testing.assert_array_equal(ids, zip_clusters_slow(corr, 2, 0.5, 1.0)[0])
    np.testing.assert_array_equal(ids, [0, 1, 2, 0, 0, 0])


def permuted_copies(rng, n, models, tokens=400):
    """Model 0's data and models 1.. as exact column permutations of it."""
    x = rng.standard_normal((tokens, n))
    perms = [np.arange(n)] + [rng.permutation(n) for _ in range(models - 1)]
    return np.concatenate([x[:, p] for p in perms], axis=1), perms


def expected_permuted_ids(perms):
    """Model m's feature q is a copy of model 0's feature perm[q], so it joins cluster perm[q]."""
    return np.concatenate(perms).astype(np.int64)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("beta", [0.0, 0.075, 0.125])
def test_zip_pairs_exact_permuted_copies(alpha, beta):
    rng = np.random.default_rng(3)
    x, perms = permuted_copies(rng, 20, 2)
    ids = zip_clusters(corr_of(x), 2, alpha, beta)
    np.testing.assert_array_equal(ids, expected_permuted_ids(perms))


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_zip_groups_three_permuted_copies(alpha):
    rng = np.random.default_rng(4)
    x, perms = permuted_copies(rng, 15, 3)
    ids = zip_clusters(corr_of(x), 3, alpha, 0.125)
    np.testing.assert_array_equal(ids, expected_permuted_ids(perms))


def duplicated_model0(rng, n=16, tokens=300):
    """Model 0 holds near-duplicate pairs (corr ~1); model 1 only weakly follows model 0."""
    latent = rng.standard_normal((tokens, n // 2))
    model0 = np.repeat(latent, 2, axis=1) + 0.01 * rng.standard_normal((tokens, n))
    model1 = 0.6 * model0[:, rng.permutation(n)] + rng.standard_normal((tokens, n))
    return np.concatenate([model0, model1], axis=1)


def model0_same_label_merges(ids, n):
    """Clusters holding a model-0 feature are labelled 0, so extra model-0 members count
    exactly the merges of two label-0 clusters."""
    counts = np.bincount(ids[:n], minlength=n)
    return int(np.maximum(counts - 1, 0).sum())


def test_zip_beta_zero_allows_one_within_model_merge():
    rng = np.random.default_rng(5)
    n = 16
    corr = corr_of(duplicated_model0(rng, n))
    assert model0_same_label_merges(zip_clusters(corr, 2, 0.3, 0.0), n) == 1
    assert model0_same_label_merges(zip_clusters(corr, 2, 0.3, 1.0), n) >= 4


@pytest.mark.parametrize("models", [2, 3, 4])
def test_zip_beta_zero_budget_in_reference_log(models):
    rng = np.random.default_rng(models)
    for kind in ("plain", "duplicates", "rounded"):
        corr = case_matrix(rng, models, 10, kind)
        for alpha in ALPHAS:
            _, merges = zip_clusters_slow(corr, models, alpha, 0.0)
            assert max(merges) <= 1
            _, merges = zip_clusters_slow(corr, models, alpha, 1.0)
            budget = int((models * 10 - 10) // models)
            assert max(merges) <= budget


@pytest.mark.parametrize("alpha", [1e-4, 1.0])
def test_zip_extreme_alpha_gives_n_nonempty_clusters(alpha):
    rng = np.random.default_rng(6)
    corr = case_matrix(rng, 3, 9, "plain")
    ids = zip_clusters(corr, 3, alpha, 0.125)
    assert sorted(set(ids.tolist())) == list(range(9))
    firsts = [min(c) for c in ids_to_clusters(ids)]
    assert firsts == sorted(firsts)


@pytest.mark.parametrize(
    "models,alpha,beta,shape",
    [
        (2, 0.0, 0.1, (4, 4)),
        (2, -0.5, 0.1, (4, 4)),
        (2, 1.5, 0.1, (4, 4)),
        (2, 0.5, -0.1, (4, 4)),
        (2, 0.5, 1.1, (4, 4)),
        (1, 0.5, 0.1, (4, 4)),
        (3, 0.5, 0.1, (4, 4)),
        (2, 0.5, 0.1, (4, 3)),
    ],
)
def test_zip_rejects_bad_arguments(models, alpha, beta, shape):
    with pytest.raises(ValueError):
        zip_clusters(np.zeros(shape), models, alpha, beta)


# ----------------------------------------------------------------------------- permute


def brute_force_partner(block):
    n = block.shape[0]
    best = max(itertools.permutations(range(n)), key=lambda p: block[np.arange(n), p].sum())
    return np.array(best)


@pytest.mark.parametrize("n", range(1, 7))
@pytest.mark.parametrize("models", [2, 3])
def test_permute_matches_brute_force(n, models):
    rng = np.random.default_rng(10 * n + models)
    corr = rng.uniform(-1, 1, size=(models * n, models * n))
    corr = (corr + corr.T) / 2
    expected = np.empty(models * n, dtype=np.int64)
    expected[:n] = np.arange(n)
    for m in range(1, models):
        partner = brute_force_partner(corr[:n, m * n : (m + 1) * n])
        expected[m * n + partner] = np.arange(n)
    got = permute_clusters(corr, models)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("models", [2, 3])
def test_permute_pairs_exact_permuted_copies(models):
    rng = np.random.default_rng(11)
    x, perms = permuted_copies(rng, 25, models)
    np.testing.assert_array_equal(
        permute_clusters(corr_of(x), models), expected_permuted_ids(perms)
    )


def test_permute_survives_nan():
    rng = np.random.default_rng(12)
    corr = rng.uniform(-1, 1, size=(8, 8))
    corr[0, 4:] = np.nan
    corr[1, 5] = -np.inf
    ids = permute_clusters(corr, 2)
    assert sorted(ids[4:].tolist()) == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- heads


def head_permuted_models(rng, models, heads, kv_heads, head_dim, tokens=300):
    """Head outputs of model 0; every other model permutes KV groups and heads within them.

    Returns the features and, per model, `src`: its head h' is model 0's head src[h'].
    """
    group = heads // kv_heads
    base = rng.standard_normal((tokens, heads, head_dim))
    srcs = [np.arange(heads)]
    for _ in range(models - 1):
        groups = rng.permutation(kv_heads)
        srcs.append(np.concatenate([g * group + rng.permutation(group) for g in groups]))
    parts = [base[:, s, :] + 0.1 * rng.standard_normal(base.shape) for s in srcs]
    return np.concatenate([p.reshape(tokens, -1) for p in parts], axis=1), srcs


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 4), (4, 4, 3), (6, 3, 2)])
def test_match_heads_recovers_group_and_head_permutation(heads, kv_heads, head_dim):
    rng = np.random.default_rng(heads + kv_heads)
    x, srcs = head_permuted_models(rng, 3, heads, kv_heads, head_dim)
    orders = match_heads(corr_of(x), 3, heads, kv_heads, head_dim)
    group = heads // kv_heads
    assert len(orders) == 3
    for order, src in zip(orders, srcs):
        assert order.dtype == np.int64
        np.testing.assert_array_equal(order, np.argsort(src))
        np.testing.assert_array_equal(
            kv_order(order, heads, kv_heads), np.argsort(src)[::group] // group
        )


def gqa_orders(heads, kv_heads):
    """Every GQA-consistent order: groups map to groups, heads stay inside their group."""
    group = heads // kv_heads
    for groups in itertools.permutations(range(kv_heads)):
        for inner in itertools.product(itertools.permutations(range(group)), repeat=kv_heads):
            yield np.concatenate([g * group + np.array(p) for g, p in zip(groups, inner)])


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 2), (4, 1), (3, 3)])
def test_match_heads_is_best_gqa_consistent_order(heads, kv_heads):
    rng = np.random.default_rng(heads * kv_heads)
    head_dim = 2
    width = heads * head_dim
    corr = rng.uniform(-1, 1, size=(2 * width, 2 * width))
    block = corr[:width, width:].reshape(heads, head_dim, heads, head_dim)
    scores = np.trace(block, axis1=1, axis2=3)
    best = max(gqa_orders(heads, kv_heads), key=lambda o: scores[np.arange(heads), o].sum())
    orders = match_heads(corr, 2, heads, kv_heads, head_dim)
    np.testing.assert_array_equal(orders[0], np.arange(heads))
    np.testing.assert_array_equal(orders[1], best)


def test_match_heads_rejects_bad_layout():
    with pytest.raises(ValueError):
        match_heads(np.zeros((16, 16)), 2, 4, 3, 2)
    with pytest.raises(ValueError):
        match_heads(np.zeros((16, 16)), 2, 4, 2, 3)


# ----------------------------------------------------------------------------- residual


def test_residual_permutations_need_every_layer():
    """Each layer only informs a third of the dims, so only the sum recovers the mapping."""
    rng = np.random.default_rng(13)
    d, models, tokens = 12, 3, 300
    perms = [np.arange(d)] + [rng.permutation(d) for _ in range(models - 1)]
    corrs = []
    for layer in range(3):
        x = np.zeros((tokens, d))
        dims = slice(4 * layer, 4 * layer + 4)
        x[:, dims] = rng.standard_normal((tokens, 4))
        parts = [x[:, p] + 0.05 * rng.standard_normal((tokens, d)) * (x[:, p] != 0) for p in perms]
        corrs.append(corr_of(np.concatenate(parts, axis=1)))
    got = residual_permutations(corrs, models)
    for perm, p in zip(got, perms):
        assert perm.dtype == np.int64
        np.testing.assert_array_equal(perm, np.argsort(p))
