"""The torch matcher (zipit/match_torch.py) against the numpy reference (zipit/match.py), bit
for bit on the CPU: random inputs with ties, NaN and constant features."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from raymerge.zipit import match, match_torch
from tests.test_zipit_match import ALPHAS, BETAS, KINDS, case_matrix, random_features

# ----------------------------------------------------------------------------- matcher


@pytest.mark.parametrize("models,n", [(2, 1), (2, 7), (3, 5), (4, 3), (2, 30), (3, 16)])
@pytest.mark.parametrize("kind", KINDS)
def test_torch_zip_equals_numpy_zip(models, n, kind):
    rng = np.random.default_rng([models, n, KINDS.index(kind), 1])
    corr = case_matrix(rng, models, n, kind)
    for alpha, beta in itertools.product(ALPHAS, BETAS):
        want = match.zip_clusters(corr, models, alpha, beta)
        got = match_torch.zip_clusters(torch.from_numpy(corr.copy()), models, alpha, beta)
        np.testing.assert_array_equal(got, want, err_msg=f"alpha={alpha} beta={beta}")


def test_torch_zip_equals_numpy_at_2x300_with_ties():
    rng = np.random.default_rng(21)
    for kind in ("rounded", "duplicates", "constant"):
        corr = np.round(case_matrix(rng, 2, 300, kind), 2)
        for alpha, beta in [(0.3, 0.125), (1.0, 0.0), (0.5, 1.0)]:
            want = match.zip_clusters(corr, 2, alpha, beta)
            got = match_torch.zip_clusters(torch.from_numpy(corr.copy()), 2, alpha, beta)
            np.testing.assert_array_equal(got, want)


def test_torch_zip_all_nan_and_bad_arguments():
    corr = np.full((6, 6), np.nan)
    got = match_torch.zip_clusters(torch.from_numpy(corr.copy()), 2, 0.5, 1.0)
    np.testing.assert_array_equal(got, match.zip_clusters(corr, 2, 0.5, 1.0))
    with pytest.raises(ValueError):
        match_torch.zip_clusters(torch.zeros(6, 6), 2, 0.5, 1.0)  # float32
    with pytest.raises(ValueError):
        match_torch.zip_clusters(torch.zeros(6, 6, dtype=torch.float64), 2, 0.0, 1.0)


@pytest.mark.parametrize("kind", ["plain", "constant", "duplicates"])
def test_torch_correlation_is_the_numpy_correlation(kind):
    rng = np.random.default_rng(KINDS.index(kind))
    x = random_features(rng, 2, 9, tokens=60) + 3.0
    if kind == "constant":
        x[:, [1, 12]] = 2.5
    if kind == "duplicates":
        x[:, 4] = x[:, 15]
    count, total, outer = x.shape[0], x.sum(0), x.T @ x
    want = match.correlation(count, total, outer)
    got = match_torch.correlation(count, total, outer).numpy()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 4), (4, 4, 3), (6, 3, 2), (2, 1, 16)])
def test_torch_head_scores_are_the_numpy_scores(heads, kv_heads, head_dim):
    rng = np.random.default_rng(heads * head_dim)
    block = rng.standard_normal((heads * head_dim, heads * head_dim))
    want = match._head_scores(block, heads, head_dim)
    got = match_torch.head_scores(torch.from_numpy(block), heads, head_dim)
    np.testing.assert_array_equal(got, want)
    trace = np.trace(block.reshape(heads, head_dim, heads, head_dim), axis1=1, axis2=3)
    np.testing.assert_allclose(want, trace, rtol=1e-12)


def test_numpy_zip_in_place_equals_the_copying_zip():
    rng = np.random.default_rng(31)
    corr = case_matrix(rng, 3, 12, "nan")
    want = match.zip_clusters(corr, 3, 0.3, 0.5)
    work_copy = corr.copy()
    np.testing.assert_array_equal(match.zip_clusters(work_copy, 3, 0.3, 0.5, True), want)
    with pytest.raises(ValueError):
        match.zip_clusters(corr.astype(np.float32), 3, 0.3, 0.5, True)
