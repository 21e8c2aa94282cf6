"""ram and ramplus_tl against an entry-by-entry float64 reference, and their edges."""

from __future__ import annotations

import pytest
import torch

from raymerge.methods import REGISTRY
from raymerge.methods.base import MergeInputs
from tests.methods.splitting import SPLIT_SHAPE, merge_by_rows
from tests.reference import as_f32

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run(method, tensors, base_index=0, **shared):
    m = REGISTRY[method]
    values = {p.name: p.default for p in m.params}
    values.update(shared)
    per_input = [{} for _ in tensors]
    return m.merge(MergeInputs("t", list(tensors), base_index, values, per_input))


def randoms(count, shape=(7, 11), dtype=torch.float32, seed=0, keep=0.4):
    """Sparse fine-tunes: each model changes a random ~40% of the entries."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = []
    for _ in range(count):
        changed = torch.rand(shape, generator=g) < keep
        models.append(base + changed * torch.randn(shape, generator=g) * 0.1)
    return base.to(dtype), [m.to(dtype) for m in models]


def reference(base, models, epsilon=1e-5, r=0.0, alpha=0.0):
    """r = 0 is plain ram; otherwise each model's unique entries are scaled by its lambda."""
    b = as_f32(base)
    # the fp32 delta, as the fast path takes it: |delta| > epsilon must see the same values
    deltas = [(as_f32(m) - b).double().reshape(-1).tolist() for m in models]
    n = b.numel()
    changed = [[abs(d[j]) > epsilon for j in range(n)] for d in deltas]
    counts = [sum(c[j] for c in changed) for j in range(n)]
    lambdas = []
    for c in changed:
        unique = sum(1 for j in range(n) if c[j] and counts[j] == 1)
        shared = sum(1 for j in range(n) if c[j] and counts[j] > 1)
        rho = shared / max(unique, epsilon) if unique else 0.0
        lambdas.append(1 + r * min(max(rho, 0.0), alpha))
    out = []
    for j in range(n):
        if counts[j] == 1:
            i = next(i for i, c in enumerate(changed) if c[j])
            out.append(deltas[i][j] * lambdas[i])
        elif counts[j] > 1:
            out.append(sum(d[j] for d, c in zip(deltas, changed) if c[j]) / counts[j])
        else:
            out.append(0.0)
    return b.double() + torch.tensor(out, dtype=torch.float64).reshape(b.shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("epsilon", [1e-5, 0.0, 0.05])
def test_ram_matches_reference(dtype, epsilon):
    base, models = randoms(3, dtype=dtype, seed=1)
    got = run("ram", [base] + models, epsilon=epsilon)
    assert got.dtype == torch.float32
    want = reference(base, models, epsilon)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r, alpha", [(0.1, 0.2), (0.5, 10.0), (1.0, 0.0), (0.0, 0.2), (0.3, -1)])
def test_ramplus_tl_matches_reference(dtype, r, alpha):
    base, models = randoms(3, shape=(4, 3, 6), dtype=dtype, seed=2)
    got = run("ramplus_tl", [models[0], base, models[1], models[2]], 1, r=r, alpha=alpha)
    want = reference(base, models, 1e-5, r, alpha)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_ramplus_tl_with_zero_boost_is_ram():
    base, models = randoms(4, seed=3)
    ram = run("ram", [base] + models)
    assert torch.equal(run("ramplus_tl", [base] + models, r=0.0), ram)
    assert torch.equal(run("ramplus_tl", [base] + models, alpha=0.0), ram)


def test_unique_and_shared_entries():
    base = torch.zeros(5)
    a = torch.tensor([1.0, 2.0, 0.0, 4.0, 0.0])
    b = torch.tensor([0.0, 4.0, 0.0, -4.0, 0.0])
    # unique entries keep the full change, shared ones take the mean, opposite ones cancel
    assert run("ram", [base, a, b]).tolist() == [1.0, 3.0, 0.0, 0.0, 0.0]
    # a: 2 shared / 1 unique, rho clamped to alpha 0.2: lambda 1 + 0.5 * 0.2
    got = run("ramplus_tl", [base, a, b], r=0.5)
    torch.testing.assert_close(got, torch.tensor([1.1, 3.0, 0.0, 0.0, 0.0]))


def test_changes_below_epsilon_are_ignored():
    base = torch.zeros(3)
    a = torch.tensor([1e-6, 1.0, 1e-6])
    b = torch.tensor([1.0, 1.0, 1e-6])
    assert run("ram", [base, a, b]).tolist() == [1.0, 1.0, 0.0]


def test_only_shared_entries_do_not_divide_by_zero():
    """No unique entry: mergekit computes 0 / 0 for lambda with epsilon 0; nothing uses it."""
    base, (model,) = randoms(1, seed=4)
    got = run("ramplus_tl", [base, model, model.clone()], epsilon=0.0, r=1.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, model, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_identical_models_zero_task_vectors_and_one_model(method):
    base, (model,) = randoms(1, seed=5, dtype=torch.bfloat16, keep=1.0)
    torch.testing.assert_close(run(method, [base, model, model.clone()]), model.float())
    assert torch.equal(run(method, [base, base.clone(), base.clone()]), base.float())
    assert torch.equal(run(method, [base]), base.float())
    # one model: every change is unique, with no shared entry to boost it
    torch.testing.assert_close(run(method, [base, model]), model.float(), rtol=0, atol=1e-6)


def test_ram_elementwise_chunks_agree_with_the_whole_tensor():
    base, models = randoms(3, shape=(9, 10), seed=6)
    whole = run("ram", [base] + models).reshape(-1)
    flat = [t.reshape(-1) for t in [base] + models]
    chunks = [run("ram", [t[i : i + 16] for t in flat]) for i in range(0, 90, 16)]
    assert torch.equal(torch.cat(chunks), whole)


def test_declarations_match_mergekit():
    ram, plus = REGISTRY["ram"], REGISTRY["ramplus_tl"]
    assert [(p.name, p.type, p.scope, p.default) for p in ram.params] == [
        ("epsilon", float, "shared", 1e-5)
    ]
    assert [(p.name, p.type, p.scope, p.default) for p in plus.params] == [
        ("r", float, "shared", 0.1),
        ("alpha", float, "shared", 0.2),
        ("epsilon", float, "shared", 1e-5),
    ]
    for m in (ram, plus):
        assert (m.base, m.min_inputs, m.max_inputs) == ("required", 1, None)
    assert ram.elementwise and not plus.elementwise


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_ramplus_tl_row_ranges_merge_to_the_whole_tensor(dtype):
    base, models = randoms(3, shape=SPLIT_SHAPE, dtype=dtype, seed=7)
    m = REGISTRY["ramplus_tl"]
    shared = {p.name: p.default for p in m.params} | {"r": 0.5, "alpha": 10.0}
    whole, split, facts = merge_by_rows("ramplus_tl", [base, *models], 0, shared, [{}] * 4)
    assert torch.equal(split, whole)
    assert all(boost > 1 for boost in facts["boost"])  # every model's unique entries scaled


def test_ram_needs_no_facts_and_ramplus_tl_gathers_counts():
    ram, plus = REGISTRY["ram"], REGISTRY["ramplus_tl"]
    assert ram.rounds is None and ram.split_problem(1) is None
    assert plus.split_problem(1) is None and plus.split_problem(2) is None
