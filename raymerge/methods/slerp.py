"""Spherical interpolation between the base (t = 0) and one other model (t = 1).

Each tensor is one flat vector. As in mergekit: the angle comes from the normalized
tensors (a tensor with norm <= 1e-8 is left unnormalized, so a zero tensor gives a 90-degree
slerp), |cos| > 0.9995 (colinear or anti-parallel) falls back to lerp, and the weights apply
to the original tensors, so norms are not equalized.
"""

from __future__ import annotations

import torch

from raymerge.methods.base import MergeInputs, MergeMethod, Param, compute_dtype
from raymerge.methods.spherical import normalize, slerp_coefficients

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """slerp of two same-shape tensors of the compute dtype, each taken as one vector."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    unit_a, _ = normalize(a, EPS, "keep")
    unit_b, _ = normalize(b, EPS, "keep")
    cos = torch.dot(unit_a, unit_b).clamp(-1, 1)
    del unit_a, unit_b
    c0, c1 = slerp_coefficients(cos, t, cos.abs() > DOT_THRESHOLD)
    return (c0 * a + c1 * b).reshape(v0.shape)


def merge(inputs: MergeInputs) -> torch.Tensor:
    base, others = inputs.base, inputs.others()
    if base is None or len(others) != 1:
        raise ValueError(f"slerp needs a base and exactly one other model; got {len(others)}")
    dtype = compute_dtype(base)
    return slerp(inputs.shared["t"], base.to(dtype), others[0][1].to(dtype))


METHODS = (
    MergeMethod(
        name="slerp",
        merge=merge,
        params=(Param("t", float, "shared", help="interpolation factor: 0 = base, 1 = the other"),),
        base="required",
        min_inputs=2,
        max_inputs=2,
        summary="spherical interpolation from the base (t=0) to the other model (t=1)",
    ),
)
