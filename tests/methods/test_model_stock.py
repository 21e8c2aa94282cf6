"""model_stock against a slow float64 reference, per tensor and filter-wise, and its edges."""

from __future__ import annotations

import math

import pytest
import torch

from raymerge.methods import REGISTRY
from raymerge.methods.base import MergeInputs
from tests.methods.splitting import SPLIT_SHAPES, assert_split_gives_whole_bytes
from tests.reference import as_f32

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
METHOD = REGISTRY["model_stock"]

# over three reduction blocks each: a matrix, one with 7-element rows, a vector


def run(tensors, filter_wise=False, base_index=0):
    shared = {"filter_wise": filter_wise}
    per_input = [{} for _ in tensors]
    return REGISTRY["model_stock"].merge(
        MergeInputs("t", list(tensors), base_index, shared, per_input)
    )


def randoms(count, shape=(7, 11), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    # fine-tuned models share a direction, so the cosines are well away from zero
    common = torch.randn(shape, generator=g) * 0.1
    models = [base + common + torch.randn(shape, generator=g) * 0.05 for _ in range(count)]
    return base.to(dtype), [m.to(dtype) for m in models]


def reference(base, models, filter_wise=False):
    """Row by row: t = N c / (1 + (N - 1) c), c the mean clipped pairwise cosine."""
    b = as_f32(base).double()
    xs = [as_f32(m).double() for m in models]
    rowwise = filter_wise and b.dim() >= 2
    width = b.shape[-1] if rowwise else b.numel()
    b_rows = b.reshape(-1, width).tolist()
    x_rows = [x.reshape(-1, width).tolist() for x in xs]
    n = len(models)
    out = []
    for r, base_row in enumerate(b_rows):
        deltas = [[x[r][j] - base_row[j] for j in range(width)] for x in x_rows]
        norms = [math.sqrt(sum(v * v for v in d)) for d in deltas]
        cosines = []
        for i in range(n):
            for k in range(i + 1, n):
                dot = sum(a * c for a, c in zip(deltas[i], deltas[k]))
                cosines.append(min(1.0, max(-1.0, dot / max(norms[i] * norms[k], 1e-6))))
        cos = sum(cosines) / len(cosines)
        denominator = 1 + (n - 1) * cos
        t = 0.0 if abs(denominator) < 1e-6 else n * cos / denominator
        out.append([base_row[j] + t * sum(d[j] for d in deltas) / n for j in range(width)])
    return torch.tensor(out, dtype=torch.float64).reshape(b.shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("count", [2, 4])
def test_matches_reference(dtype, filter_wise, count):
    base, models = randoms(count, dtype=dtype, seed=count)
    got = run([base] + models, filter_wise)
    assert got.dtype == torch.float32
    torch.testing.assert_close(
        got.double(), reference(base, models, filter_wise), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("shape", [(13,), (3, 4, 5), ()])
def test_other_shapes(shape):
    base, models = randoms(3, shape=shape, seed=5)
    for filter_wise in (False, True):
        got = run([models[0], base, models[1], models[2]], filter_wise, base_index=1)
        want = reference(base, models, filter_wise)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def test_filter_wise_on_a_vector_is_per_tensor():
    base, models = randoms(3, shape=(17,), seed=6)
    assert torch.equal(run([base] + models, True), run([base] + models, False))


def test_identical_models_give_the_model():
    base, (model,) = randoms(1, seed=7)
    got = run([base, model, model.clone(), model.clone()])  # cos = 1, t = 1
    torch.testing.assert_close(got, model, rtol=0, atol=1e-6)


def test_all_zero_task_vectors_give_the_base():
    base, _ = randoms(1, seed=8, dtype=torch.bfloat16)
    got = run([base, base.clone(), base.clone()])
    assert torch.equal(got, base.float())


def test_opposite_task_vectors_keep_the_base():
    """cos = -1 with two models is the singularity 1 + (N - 1) cos = 0: t = 0."""
    base, (model,) = randoms(1, seed=9)
    mirror = 2 * base - model
    got = run([base, model, mirror])
    torch.testing.assert_close(got, base, rtol=0, atol=1e-6)


def test_orthogonal_task_vectors_keep_the_base():
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])
    assert torch.equal(run([base, a, b]), base)


def test_filter_wise_rows_are_independent():
    base = torch.zeros(2, 3)
    # row 0: identical task vectors (t = 1); row 1: orthogonal ones (t = 0)
    a = torch.tensor([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0]])
    b = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
    got = run([base, a, b], filter_wise=True)
    torch.testing.assert_close(got, torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(run([base, a, b]), reference(base, [a, b]).float())


def test_base_alone_is_returned_and_one_model_is_refused():
    base, (model,) = randoms(1, seed=10)
    assert torch.equal(run([base]), base)
    with pytest.raises(ValueError, match="at least two models"):
        run([base, model])


def test_declaration_matches_mergekit():
    m = REGISTRY["model_stock"]
    assert [(p.name, p.type, p.scope, p.default) for p in m.params] == [
        ("filter_wise", bool, "shared", False)
    ]
    assert (m.base, m.min_inputs, m.max_inputs) == ("required", 3, None)
    assert not m.elementwise


@pytest.mark.parametrize("shape", SPLIT_SHAPES, ids=str)
@pytest.mark.parametrize("filter_wise", [False, True])
def test_merged_block_by_block_gives_the_whole_bytes(shape, filter_wise):
    base, models = randoms(3, shape=shape, dtype=torch.bfloat16, seed=11)
    shared = {"filter_wise": filter_wise}
    assert_split_gives_whole_bytes(METHOD, MergeInputs("t", [base] + models, 0, shared, [{}] * 4))
