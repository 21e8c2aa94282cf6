"""Model Stock (Jang et al., 2024): move from the base toward the average of the fine-tuned
models by t = N cos / (1 + (N - 1) cos), where cos is the mean pairwise cosine between their
task vectors. Near-orthogonal task vectors keep the result close to the base.

With `filter_wise`, cos and t are computed per row (along the last axis) instead of once per
tensor; a 1-D tensor is one row either way. As in mergekit, cosines use norms clamped to 1e-6
and are clipped to [-1, 1], and where the denominator is below 1e-6 the base is kept (t = 0).
"""

from __future__ import annotations

from raymerge.lazy import torch
from raymerge.methods.base import MergeInputs, MergeMethod, Param, compute_dtype


def merge(inputs: MergeInputs) -> torch.Tensor:
    dtype = compute_dtype(inputs.base)
    base = inputs.base.to(dtype)
    others = inputs.others()
    if not others:
        return base
    if len(others) < 2:
        raise ValueError(f"{inputs.name}: model_stock needs at least two models besides the base")
    # cosines are taken along the last axis: of each row, or of the whole flattened tensor
    rowwise = inputs.shared["filter_wise"] and base.dim() >= 2
    shape = base.shape if rowwise else (1, base.numel())
    deltas = [(tensor.to(dtype) - base).reshape(shape) for _, tensor, _ in others]
    norms = [delta.norm(dim=-1, keepdim=True) for delta in deltas]
    cosines = [
        (
            (deltas[i] * deltas[j]).sum(dim=-1, keepdim=True)
            / (norms[i] * norms[j]).clamp(min=1e-6)
        ).clamp(-1, 1)
        for i in range(len(deltas))
        for j in range(i + 1, len(deltas))
    ]
    cos = sum(cosines[1:], cosines[0].clone()).div_(len(cosines))
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
    ),
)
