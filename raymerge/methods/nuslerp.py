"""nuslerp: slerp of two models at t = w_2 / (w_1 + w_2), optionally of their task vectors.

mergekit's "new" slerp: weights instead of t, an optional base (then the task vectors
x_i - base are interpolated and the base added back), and a choice of which vectors to
interpolate: the whole tensor (flatten, the default), each row (last dimension), or with
`nuslerp_row_wise` each vector along dimension 0. Colinear and anti-parallel vectors fall
back to lerp. mergekit's test, 1 - cos^2 <= 1e-16, only passes in fp32 when rounding happens
to give |cos| = 1, and exactly anti-parallel vectors of unequal norms then blow up (sin(theta)
~ 3e-4 divides a non-cancelling sum); the test here also accepts the few ulps of rounding.

Rows need nothing beyond themselves; the whole tensor and the vectors along dimension 0 (one
per column of the rows) span every row, so their cosines come from a fact round: each block's
dot products per vector in fp64, summed exactly. A split tensor merges to the whole's bytes.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

from raymerge.lazy import torch
from raymerge.methods.base import (
    FactRound,
    MergeInputs,
    MergeMethod,
    Param,
    compute_dtype,
    gather_facts,
)  # fmt: skip
from raymerge.methods.spherical import fsum, non_base_weights, row_chunks, slerp_coefficients

NORM_EPS = 1e-7
COLINEAR_EPS = 1e-8
ROUNDING_ULPS = 16  # 1 - cos^2 of exactly parallel fp32 vectors measured up to 3 ulps
# the interpolated vectors: the flattened tensor, the columns (along dimension 0), the rows
Mode = Literal["flat", "columns", "rows"]


def _mode(shared: dict[str, Any], ndim: int) -> Mode:
    if shared["nuslerp_flatten"] or ndim < 2:
        return "flat"
    return "columns" if shared["nuslerp_row_wise"] else "rows"


def interpolation_t(w0: float, w1: float) -> float:
    total = w0 + w1
    return 0.5 if abs(total) < 1e-6 else w1 / total


def _vectors(inputs: MergeInputs) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(t, v0, v1, base): the (task) vectors interpolated, in the compute dtype."""
    others = inputs.others()
    if len(others) != 2:
        raise ValueError(f"nuslerp needs exactly two models besides the base; got {len(others)}")
    (_, x0, p0), (_, x1, p1) = others
    dtype = compute_dtype(x0)
    a, b = x0.to(dtype), x1.to(dtype)
    base = None if inputs.base is None else inputs.base.to(dtype)
    if base is not None:
        a, b = a - base, b - base
    return interpolation_t(p0["weight"], p1["weight"]), a, b, base


def _matrix(x: torch.Tensor, mode: Mode) -> torch.Tensor:
    """x as (rows, vectors): the vectors (flat: one, columns: one per column) run down it."""
    if mode == "flat":
        return x.reshape(-1, 1)
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def _dots(inputs: MergeInputs, facts: dict) -> dict:
    mode = _mode(inputs.shared, len(inputs.full_shape))
    if mode == "rows":
        return {}
    total = None
    for part in row_chunks(inputs):
        _, a, b, _ = _vectors(part)
        a, b = (_matrix(x, mode).to(torch.float64, copy=True) for x in (a, b))
        sums = torch.stack([(a * a).sum(0), (b * b).sum(0), (a * b).sum(0)])
        total = sums if total is None else total.add_(sums)
    return {"dots": [total.cpu().numpy()]}


def _cosines(total: dict, facts: dict, inputs: MergeInputs) -> dict:
    """cos of each vector pair from its dot products, each summed exactly over blocks (pure
    Python: this runs on the driver for split tensors)."""
    if "dots" not in total:
        return {}
    blocks = np.stack(total["dots"])  # (blocks, 3, vectors)
    aa, bb, ab = ([fsum(v) for v in blocks[:, k, :].T.tolist()] for k in range(3))
    return {
        "cos": [
            dot / (max(math.sqrt(x), NORM_EPS) * max(math.sqrt(y), NORM_EPS))
            for x, y, dot in zip(aa, bb, ab)
        ]
    }


ROUNDS = (FactRound(_dots, _cosines),)


def _coefficients(cos: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    cos = cos.clamp(-1, 1)
    tolerance = max(COLINEAR_EPS**2, ROUNDING_ULPS * torch.finfo(cos.dtype).eps)
    return slerp_coefficients(cos, t, (1 - cos.square()) <= tolerance)


def _row_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos of each pair of rows (last dimension), norms clamped to NORM_EPS."""
    unit_a = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    unit_b = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    return (unit_a * unit_b).sum(dim=-1, keepdim=True)


def merge(inputs: MergeInputs) -> torch.Tensor:
    t, a, b, base = _vectors(inputs)
    mode = _mode(inputs.shared, a.dim())
    if mode == "rows":
        c0, c1 = _coefficients(_row_cosines(a, b), t)
        result = c0 * a + c1 * b
    else:
        facts = inputs.facts if inputs.facts is not None else gather_facts(ROUNDS, inputs)
        cos = torch.tensor(facts["cos"], dtype=a.dtype, device=a.device)
        c0, c1 = _coefficients(cos, t)
        result = (c0 * _matrix(a, mode) + c1 * _matrix(b, mode)).reshape(a.shape)
    return result if base is None else result.add_(base)


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
        locality="tensor",
        rounds=lambda shared: ROUNDS,
        # rows need no facts for matrices, but a vector is always interpolated whole
        facts_for=lambda shared, ndim: _mode(shared, ndim) != "rows",
    ),
)
