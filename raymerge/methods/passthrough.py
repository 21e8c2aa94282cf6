"""Passthrough: copy the single input's tensor, optionally multiplied by its `scale` (used by
mergekit configs to stack or scale layers without merging anything)."""

from __future__ import annotations

from raymerge.lazy import torch
from raymerge.methods.base import MergeInputs, MergeMethod, Param, compute_dtype


def merge(inputs: MergeInputs) -> torch.Tensor:
    (tensor,) = inputs.tensors
    result = tensor.to(compute_dtype(tensor), copy=True)  # never alias an input
    scale = inputs.per_input[0].get("scale")
    return result if scale is None else result * scale


METHODS = (
    MergeMethod(
        name="passthrough",
        merge=merge,
        params=(
            Param(
                "scale",
                float,
                "input",
                default=None,
                help="multiply the tensor by this factor (unset: copy as is)",
            ),
        ),
        base="ignored",
        min_inputs=1,
        max_inputs=1,
        summary="the single input, times `scale` when set",
        locality="elementwise",
    ),
)
