"""linear, task_arithmetic and ties against the slow references, on random inputs and edges."""

from __future__ import annotations

import pytest
import torch

from raymerge.methods import REGISTRY
from raymerge.methods.base import MergeInputs
from raymerge.methods.sparsify import top_k_mask
from tests import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run(method: str, tensors, base_index=None, shared=None, per_input=None):
    m = REGISTRY[method]
    defaults = {p.name: p.default for p in m.params if p.scope == "shared"}
    defaults.update(shared or {})
    return m.merge(MergeInputs("t", list(tensors), base_index, defaults, per_input))


def randoms(count, shape=(7, 11), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(count)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_reference(dtype, normalize):
    tensors = randoms(3, dtype=dtype)
    weights = [0.5, 1.5, 0.25]
    got = run(
        "linear",
        tensors,
        shared={"normalize": normalize},
        per_input=[{"weight": w} for w in weights],
    )
    want = reference.linear(tensors, weights, normalize)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_linear_single_model_is_identity():
    (t,) = randoms(1, dtype=torch.bfloat16)
    got = run("linear", [t], per_input=[{"weight": 0.3}])
    assert torch.equal(got.to(torch.bfloat16), t)


@pytest.mark.parametrize("dtype", DTYPES)
def test_task_arithmetic_matches_reference(dtype):
    *models, base = randoms(4, dtype=dtype, seed=1)
    weights = [0.7, -0.3, 1.2]
    for normalize, lam in [(False, 1.0), (True, 0.5)]:
        got = run(
            "task_arithmetic",
            models + [base],
            base_index=3,
            shared={"normalize": normalize, "lambda": lam},
            per_input=[{"weight": w, "density": 1.0} for w in weights] + [{}],
        )
        want = reference.task_family(base, models, weights, normalize=normalize, lam=lam)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("densities", [[0.5, 0.3, 0.9], [1.0, 1.0, 1.0], [0.0, 0.2, 0.01]])
def test_ties_matches_reference(dtype, densities):
    *models, base = randoms(4, shape=(9, 13), dtype=dtype, seed=2)
    weights = [1.0, 0.6, 0.3]
    got = run(
        "ties",
        [base] + models,
        base_index=0,
        per_input=[{}] + [{"weight": w, "density": d} for w, d in zip(weights, densities)],
    )
    want = reference.task_family(
        base, models, weights, densities, trim=True, elect=True, normalize=True
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_with_rescale_and_lambda_matches_reference(dtype):
    *models, base = randoms(4, shape=(9, 13), dtype=dtype, seed=5)
    weights, densities = [0.9, -0.4, 0.5], [0.4, 0.7, 0.2]
    got = run(
        "ties",
        [base] + models,
        base_index=0,
        shared={"rescale": True, "lambda": 0.7},
        per_input=[{}] + [{"weight": w, "density": d} for w, d in zip(weights, densities)],
    )
    trims = [reference.magnitude_trim_list(d) for d in densities]
    want = reference.family(
        base, models, weights, trims, elect=True, normalize=True, rescale=True, lam=0.7
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_ties_sign_ties_and_zeros():
    base = torch.zeros(6)
    a = torch.tensor([1.0, -1.0, 0.0, 2.0, 0.0, -3.0])
    b = torch.tensor([-1.0, 1.0, 0.0, -2.0, 0.0, 3.0])
    per_input = [{}, {"weight": 1.0, "density": 1.0}, {"weight": 1.0, "density": 1.0}]
    got = run("ties", [base, a, b], base_index=0, per_input=per_input)
    # every sum is exactly zero: the elected sign is +, so only positive entries survive
    want = reference.task_family(
        base, [a, b], [1.0, 1.0], [1.0, 1.0], trim=True, elect=True, normalize=True
    )
    assert got.tolist() == [1.0, 1.0, 0.0, 2.0, 0.0, 3.0]
    assert torch.equal(got.double(), want)


def test_ties_all_task_vectors_zero_returns_base():
    base = randoms(1, seed=3)[0]
    got = run(
        "ties",
        [base, base.clone(), base.clone()],
        base_index=0,
        per_input=[{}, {"weight": 1.0, "density": 0.5}, {"weight": 2.0, "density": 0.5}],
    )
    assert torch.equal(got, base)


def test_ties_no_other_model_returns_base():
    base = randoms(1, seed=4, dtype=torch.bfloat16)[0]
    got = run("ties", [base], base_index=0, per_input=[{}])
    assert torch.equal(got.to(torch.bfloat16), base)


def test_top_k_breaks_ties_toward_lower_index():
    magnitude = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0, 0.5])
    assert top_k_mask(magnitude, 3).tolist() == [False, True, True, True, False, False]
    assert top_k_mask(magnitude, 0).sum() == 0
    assert top_k_mask(magnitude, 6).all()


def test_density_truncation_matches_python_float():
    assert reference.keep_count(0.29, 100) == 28
    from raymerge.methods.sparsify import keep_count

    assert keep_count(0.29, 100) == 28
    assert keep_count(0.001, 10) == 1  # at least one entry survives a positive density
    assert keep_count(0.0, 10) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 7, 150, 299])
def test_top_k_mask_matches_a_sort_with_negatives_and_ties(dtype, k):
    g = torch.Generator().manual_seed(k)
    values = torch.randint(-20, 20, (300,), generator=g).to(dtype) / 4  # many ties, signs
    values[5] = -0.0
    order = sorted(range(300), key=lambda i: (-float(values[i]), i))[:k]
    want = torch.zeros(300, dtype=torch.bool)
    want[order] = True
    assert torch.equal(top_k_mask(values, k), want)
