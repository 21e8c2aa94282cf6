"""NearSwap: take the other model's value where it is already close to the base, keep the
base where they differ a lot. Each entry moves toward the other model by
w = clamp(t / max(|base - x|, 1e-6), 0, 1): entries closer than t are replaced outright, and
farther ones move by t/|base - x| of the gap. t = 0 gives the base.
"""

from __future__ import annotations

from raymerge.lazy import torch
from raymerge.methods.base import MergeInputs, MergeMethod, Param, compute_dtype


def merge(inputs: MergeInputs) -> torch.Tensor:
    dtype = compute_dtype(inputs.base)
    base = inputs.base.to(dtype)
    ((_, other, _),) = inputs.others()
    other = other.to(dtype)
    weight = (inputs.shared["t"] / (base - other).abs().clamp_(min=1e-6)).clamp_(0, 1)
    return torch.lerp(base, other, weight)


METHODS = (
    MergeMethod(
        name="nearswap",
        merge=merge,
        params=(
            Param(
                "t",
                float,
                "shared",
                low=0.0,
                help="distance below which the other model's value is taken as is",
            ),
        ),
        base="required",
        min_inputs=2,
        max_inputs=2,
        summary="lerp(base, x, clamp(t / |base - x|, 0, 1)) per entry",
        locality="elementwise",
    ),
)
