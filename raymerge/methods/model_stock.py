"""Model Stock (Jang et al., 2024): move from the base toward the average of the fine-tuned
models by t = N cos / (1 + (N - 1) cos), where cos is the mean pairwise cosine between their
task vectors. Near-orthogonal task vectors keep the result close to the base.

With `filter_wise`, cos and t are computed per row (along the last axis) instead of once per
tensor; a 1-D tensor is one row either way. As in mergekit, cosines use norms clamped to 1e-6
and are clipped to [-1, 1], and where the denominator is below 1e-6 the base is kept (t = 0).

Per tensor, the cosines come from the task vectors' Gram matrix, a fact round (each block's
dot products in fp64, summed exactly), so a split tensor merges to the bytes of a whole one.
"""

from __future__ import annotations

import math

from raymerge.lazy import torch
from raymerge.methods.base import (
    FactRound,
    MergeInputs,
    MergeMethod,
    Param,
    compute_dtype,
    gather_facts,
)  # fmt: skip
from raymerge.methods.spherical import clip, dots, gram_matrix, row_chunks, upper_pairs

NORM_EPS = 1e-6


def _rowwise(inputs: MergeInputs) -> bool:
    """Cosines per row (no whole-tensor facts), or of the whole flattened tensor."""
    return inputs.shared["filter_wise"] and len(inputs.full_shape) >= 2


def _deltas(inputs: MergeInputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    dtype = compute_dtype(inputs.base)
    base = inputs.base.to(dtype)
    return base, [tensor.to(dtype) - base for _, tensor, _ in inputs.others()]


def _gram(inputs: MergeInputs, facts: dict) -> dict:
    count = len(inputs.others())
    if _rowwise(inputs) or count < 2:
        return {}
    parts = (_deltas(part)[1] for part in row_chunks(inputs))
    return {"gram": [dots(parts, upper_pairs(count))]}


def _cosine(total: dict, facts: dict, inputs: MergeInputs) -> dict:
    """The mean clipped pairwise cosine of the whole task vectors (pure Python: this runs on
    the driver for split tensors)."""
    if "gram" not in total:
        return {}
    g = gram_matrix(total["gram"])
    norms = [math.sqrt(g[i][i]) for i in range(len(g))]
    cosines = [
        clip(g[i][j] / max(norms[i] * norms[j], NORM_EPS))
        for i in range(len(g))
        for j in range(i + 1, len(g))
    ]
    return {"cos": sum(cosines) / len(cosines)}


ROUNDS = (FactRound(_gram, _cosine),)


def _row_cosines(deltas: list[torch.Tensor]) -> torch.Tensor:
    """The mean clipped pairwise cosine of each row (along the last axis)."""
    norms = [delta.norm(dim=-1, keepdim=True) for delta in deltas]
    cosines = [
        (
            (deltas[i] * deltas[j]).sum(dim=-1, keepdim=True)
            / (norms[i] * norms[j]).clamp(min=NORM_EPS)
        ).clamp(-1, 1)
        for i in range(len(deltas))
        for j in range(i + 1, len(deltas))
    ]
    return sum(cosines[1:], cosines[0].clone()).div_(len(cosines))


def merge(inputs: MergeInputs) -> torch.Tensor:
    base, deltas = _deltas(inputs)
    if not deltas:
        return base
    if len(deltas) < 2:
        raise ValueError(f"{inputs.name}: model_stock needs at least two models besides the base")
    rowwise = _rowwise(inputs)
    shape = base.shape if rowwise else (1, base.numel())
    deltas = [delta.reshape(shape) for delta in deltas]
    if rowwise:
        cos = _row_cosines(deltas)
    else:
        facts = inputs.facts if inputs.facts is not None else gather_facts(ROUNDS, inputs)
        cos = torch.full((1, 1), facts["cos"], dtype=base.dtype, device=base.device)
    count = len(deltas)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, count * cos / denominator.masked_fill(singular, 1.0))
    # t * mean(x_i) + (1 - t) * base, written as a step along the mean task vector
    mean_delta = sum(deltas[1:], deltas[0].clone()).div_(count)
    return (base.reshape(shape) + t * mean_delta).reshape(base.shape)


METHODS = (
    MergeMethod(
        name="model_stock",
        merge=merge,
        params=(
            Param(
                "filter_wise",
                bool,
                "shared",
                default=False,
                help="one interpolation ratio per row (last axis) instead of per tensor",
            ),
        ),
        base="required",
        min_inputs=3,
        summary="base + t (mean_i x_i - base), t = N cos / (1 + (N - 1) cos)",
        locality="tensor",
        rounds=lambda shared: ROUNDS,
        # filter_wise needs no facts for matrices, but a vector's one row is the whole tensor
        facts_for=lambda shared, ndim: not (shared["filter_wise"] and ndim >= 2),
    ),
)
