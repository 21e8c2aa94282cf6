"""Geometry shared by the spherical methods (slerp, nuslerp, multislerp, karcher).

mergekit's spherical methods each guard small norms differently; `normalize` keeps every
variant in one place so each method can match its mergekit counterpart on tiny and zero
tensors, where the choice decides between a 90-degree slerp and a lerp.
"""

from __future__ import annotations

from typing import Any, Literal

from raymerge.lazy import torch

# keep: divide only where norm > eps, else leave x as is (a zero tensor stays zero)
# clamp: divide by max(norm, eps)
# shift: divide by norm + eps
Guard = Literal["keep", "clamp", "shift"]


def normalize(
    x: torch.Tensor, eps: float, guard: Guard, dim: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / |x|, |x|), the norm over `dim` (all of x when None), small norms guarded."""
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=dim is not None)
    if guard == "keep":
        divisor = torch.where(norm > eps, norm, torch.ones_like(norm))
    elif guard == "clamp":
        divisor = norm.clamp(min=eps)
    else:
        divisor = norm + eps
    return x / divisor, norm


def slerp_coefficients(
    cos: torch.Tensor, t: float, linear: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (c0, c1) of v0 and v1 in slerp(v0, v1; t) given cos of their angle.

    Where `linear` is set (colinear or anti-parallel: sin(theta) ~ 0) the weights are the
    lerp's (1 - t, t). t = 0 and t = 1 give exactly (1, 0) and (0, 1) on both branches.
    """
    theta = torch.acos(torch.where(linear, torch.zeros_like(cos), cos))
    sin_theta = torch.sin(theta)
    c0 = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    c1 = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    return c0, c1


def non_base_weights(per_input: list[dict[str, Any]]) -> list[float]:
    """The `weight` of each non-base input: the planner leaves non_base parameters out of
    the base's dict, so at plan time this also counts the inputs besides the base."""
    return [p["weight"] for p in per_input if "weight" in p]
