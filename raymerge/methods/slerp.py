"""Spherical interpolation between the base (t = 0) and one other model (t = 1).

Each tensor is one flat vector. As in mergekit: the angle comes from the normalized
tensors (a tensor with norm <= 1e-8 is left unnormalized, so a zero tensor gives a 90-degree
slerp), |cos| > 0.9995 (colinear or anti-parallel) falls back to lerp, and the weights apply
to the original tensors, so norms are not equalized.
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
from raymerge.methods.spherical import dots, fsum, row_chunks, slerp_coefficients

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def _pair(inputs: MergeInputs) -> tuple[torch.Tensor, torch.Tensor]:
    base, others = inputs.base, inputs.others()
    if base is None or len(others) != 1:
        raise ValueError(f"slerp needs a base and exactly one other model; got {len(others)}")
    dtype = compute_dtype(base)
    return base.to(dtype).reshape(-1), others[0][1].to(dtype).reshape(-1)


def _dots(inputs: MergeInputs, facts: dict) -> dict:
    wide = int(compute_dtype(inputs.base) == torch.float64)  # blocks computed in fp64
    chunks = ([p[0].reshape(-1), p[1].reshape(-1)] for p in map(_pair, row_chunks(inputs)))
    aa, bb, ab = dots(chunks, [(0, 0), (1, 1), (0, 1)])
    return {"aa": [aa], "bb": [bb], "ab": [ab], "fp64": wide}


def _sums(total: dict, facts: dict, inputs: MergeInputs) -> dict:
    """The whole tensor's dot products, each summed exactly over blocks (pure Python: this
    runs on the driver for split tensors)."""
    return {k: fsum(total[k]) for k in ("aa", "bb", "ab")} | {"fp64": total["fp64"] > 0}


def _coefficients(facts: dict, t: float) -> tuple[float, float]:
    """slerp's weights: cos of the angle between the (guarded) unit vectors, as mergekit
    takes it, then the lerp fallback near colinear."""
    norm_a, norm_b = math.sqrt(facts["aa"]), math.sqrt(facts["bb"])
    divisor = (norm_a if norm_a > EPS else 1.0) * (norm_b if norm_b > EPS else 1.0)
    dtype = torch.float64 if facts["fp64"] else torch.float32
    cos = torch.tensor(facts["ab"] / divisor, dtype=dtype).clamp(-1, 1)
    c0, c1 = slerp_coefficients(cos, t, cos.abs() > DOT_THRESHOLD)
    return float(c0), float(c1)


ROUNDS = (FactRound(_dots, _sums),)


def merge(inputs: MergeInputs) -> torch.Tensor:
    facts = inputs.facts if inputs.facts is not None else gather_facts(ROUNDS, inputs)
    c0, c1 = _coefficients(facts, inputs.shared["t"])
    a, b = _pair(inputs)
    return (a * c0 + b * c1).reshape(inputs.tensors[0].shape)


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
