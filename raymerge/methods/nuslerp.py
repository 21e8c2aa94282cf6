"""nuslerp: slerp of two models at t = w_2 / (w_1 + w_2), optionally of their task vectors.

mergekit's "new" slerp: weights instead of t, an optional base (then the task vectors
x_i - base are interpolated and the base added back), and a choice of which vectors to
interpolate: the whole tensor (flatten, the default), each row (last dimension), or with
`nuslerp_row_wise` each vector along dimension 0. Colinear and anti-parallel vectors fall
back to lerp. mergekit's test, 1 - cos^2 <= 1e-16, only passes in fp32 when rounding happens
to give |cos| = 1, and exactly anti-parallel vectors of unequal norms then blow up (sin(theta)
~ 3e-4 divides a non-cancelling sum); the test here also accepts the few ulps of rounding.
"""

from __future__ import annotations

from typing import Any

from raymerge.lazy import torch
from raymerge.methods.base import MergeInputs, MergeMethod, Param, compute_dtype
from raymerge.methods.spherical import non_base_weights, normalize, slerp_coefficients

NORM_EPS = 1e-7
COLINEAR_EPS = 1e-8
ROUNDING_ULPS = 16  # 1 - cos^2 of exactly parallel fp32 vectors measured up to 3 ulps


def nuslerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool
) -> torch.Tensor:
    """slerp of matching vectors of v0 and v1 (compute dtype), same shape out."""
    shape = v0.shape
    if flatten or v0.dim() < 2:
        a, b = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        a, b = v0, v1
    unit_a, _ = normalize(a, NORM_EPS, "clamp", dim=-1)
    unit_b, _ = normalize(b, NORM_EPS, "clamp", dim=-1)
    cos = (unit_a * unit_b).sum(dim=-1, keepdim=True).clamp(-1, 1)
    del unit_a, unit_b
    tolerance = max(COLINEAR_EPS**2, ROUNDING_ULPS * torch.finfo(cos.dtype).eps)
    c0, c1 = slerp_coefficients(cos, t, (1 - cos.square()) <= tolerance)
    result = c0 * a + c1 * b
    if row_wise and not flatten and v0.dim() >= 2:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def interpolation_t(w0: float, w1: float) -> float:
    total = w0 + w1
    return 0.5 if abs(total) < 1e-6 else w1 / total


def merge(inputs: MergeInputs) -> torch.Tensor:
    others = inputs.others()
    if len(others) != 2:
        raise ValueError(f"nuslerp needs exactly two models besides the base; got {len(others)}")
    (_, x0, p0), (_, x1, p1) = others
    t = interpolation_t(p0["weight"], p1["weight"])
    dtype = compute_dtype(x0)
    a, b = x0.to(dtype), x1.to(dtype)
    row_wise, flatten = inputs.shared["nuslerp_row_wise"], inputs.shared["nuslerp_flatten"]
    if inputs.base is None:
        return nuslerp(t, a, b, row_wise, flatten)
    base = inputs.base.to(dtype)
    return nuslerp(t, a - base, b - base, row_wise, flatten).add_(base)


def check(shared: dict[str, Any], per_input: list[dict[str, Any]]) -> str | None:
    count = len(non_base_weights(per_input))
    if count != 2:
        return f"nuslerp merges exactly two models besides the base_model; got {count}"
    return None


METHODS = (
    MergeMethod(
        name="nuslerp",
        merge=merge,
        params=(
            Param("weight", float, "non_base", help="this model's weight; t = w_2 / (w_1 + w_2)"),
            Param(
                "nuslerp_row_wise",
                bool,
                "shared",
                default=False,
                help="interpolate the vectors along dimension 0 (when not flattening)",
            ),
            Param(
                "nuslerp_flatten",
                bool,
                "shared",
                default=True,
                help="interpolate each tensor as one vector",
            ),
        ),
        base="optional",
        min_inputs=2,
        max_inputs=3,
        summary="slerp of two models (or their task vectors) at t = w_2 / (w_1 + w_2)",
        check=check,
    ),
)
