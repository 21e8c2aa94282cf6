"""Spherical interpolation between the base (t = 0) and one other model (t = 1).

Each tensor is one flat vector. As in mergekit: the angle comes from the normalized
tensors (a tensor with norm <= 1e-8 is left unnormalized, so a zero tensor gives a 90-degree
slerp), |cos| > 0.9995 (colinear or anti-parallel) falls back to lerp, and the weights apply
to the original tensors, so norms are not equalized.
"""

from __future__ import annotations

import math

import torch

from raymerge.methods.base import (
    FactRound,
    MergeInputs,
    MergeMethod,
    Param,
    compute_dtype,
    gather_facts,
)  # fmt: skip
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


def _pair(inputs: MergeInputs) -> tuple[torch.Tensor, torch.Tensor]:
    base, others = inputs.base, inputs.others()
    if base is None or len(others) != 1:
        raise ValueError(f"slerp needs a base and exactly one other model; got {len(others)}")
    dtype = compute_dtype(base)
    return base.to(dtype).reshape(-1), others[0][1].to(dtype).reshape(-1)


def _dots(inputs: MergeInputs, facts: dict) -> dict:
    a, b = _pair(inputs)
    wide = int(a.dtype == torch.float64)  # blocks: how many computed in fp64
    a, b = a.double(), b.double()
    return {"aa": [float(a @ a)], "bb": [float(b @ b)], "ab": [float(a @ b)], "fp64": wide}


def _coefficients(total: dict, facts: dict, inputs: MergeInputs) -> dict:
    """slerp's weights from the block sums: cos of the angle between the (guarded) unit
    vectors, as mergekit takes it, then the lerp fallback near colinear."""
    norm_a, norm_b = math.sqrt(math.fsum(total["aa"])), math.sqrt(math.fsum(total["bb"]))
    divisor = (norm_a if norm_a > EPS else 1.0) * (norm_b if norm_b > EPS else 1.0)
    dtype = torch.float64 if total["fp64"] else torch.float32
    cos = torch.tensor(math.fsum(total["ab"]) / divisor, dtype=dtype).clamp(-1, 1)
    c0, c1 = slerp_coefficients(cos, inputs.shared["t"], cos.abs() > DOT_THRESHOLD)
    return {"c0": float(c0), "c1": float(c1)}


ROUNDS = (FactRound(_dots, _coefficients),)


def merge(inputs: MergeInputs) -> torch.Tensor:
    facts = inputs.facts if inputs.facts is not None else gather_facts(ROUNDS, inputs)
    a, b = _pair(inputs)
    shape = inputs.tensors[0].shape
    return (a * facts["c0"] + b * facts["c1"]).reshape(shape)


METHODS = (
    MergeMethod(
        name="slerp",
        merge=merge,
        params=(Param("t", float, "shared", help="interpolation factor: 0 = base, 1 = the other"),),
        base="required",
        min_inputs=2,
        max_inputs=2,
        summary="spherical interpolation from the base (t=0) to the other model (t=1)",
        locality="tensor",
        rounds=lambda shared: ROUNDS,
    ),
)
