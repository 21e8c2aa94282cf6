"""Geometry shared by the spherical methods (slerp, nuslerp, multislerp, karcher).

Their angles and norms are whole-tensor facts: each block of rows gives its share of the
dot products (`dots`), summed in fp64, and the blocks' shares are added exactly (`fsum`), so
a tensor split into row ranges gets the very numbers a whole one does, in any order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

from raymerge.lazy import torch
from raymerge.methods.base import MergeInputs, float_sum, rows_of

# elements per chunk of the fact sums on CPUs: 2 MiB of fp64 scratch a vector rather than a
# block's 8 MiB, in few torch calls a block (many small ones stall on busy threads); it
# groups the float sums, so it is fixed apart from CPU_CHUNK: changing it changes output bits
FACT_CHUNK = 1 << 18


def row_chunks(inputs: MergeInputs) -> Iterator[MergeInputs]:
    """The rows held, about FACT_CHUNK elements at a time on CPUs, all at once on GPUs; an
    empty tensor is one empty chunk."""
    first = inputs.tensors[0]
    held = first.shape[0] if first.dim() else 1
    width = rows_of(inputs.full_shape)[1]
    step = max(1, FACT_CHUNK // width) if first.device.type == "cpu" else max(1, held)
    for lo in range(0, max(1, held), step):
        yield inputs.rows(lo, lo + step)


def upper_pairs(count: int) -> list[tuple[int, int]]:
    """(i, j), i <= j: the upper triangle of a count x count matrix, row by row."""
    return [(i, j) for i in range(count) for j in range(i, count)]


def dots(parts: Iterable[list[torch.Tensor]], pairs: list[tuple[int, int]]) -> list[float]:
    """sum(v_i * v_j) for each pair (i, j), over the vectors' parts: each part's dot products
    in fp64 (exact products of fp32 values), added up in part order."""
    total = [0.0] * len(pairs)
    for vectors in parts:
        # fresh copies: the sums never depend on where a block starts in memory
        wide = [v.reshape(-1).to(torch.float64, copy=True) for v in vectors]
        total = [s + float_sum(wide[i] * wide[j]) for s, (i, j) in zip(total, pairs)]
    return total


def gram_matrix(blocks: list[list[float]]) -> list[list[float]]:
    """The whole tensor's Gram matrix from every block's `dots` over `upper_pairs` (pure
    Python: it runs on the driver for split tensors)."""
    upper = [fsum(column) for column in zip(*blocks)]
    count = (math.isqrt(8 * len(upper) + 1) - 1) // 2
    matrix = [[0.0] * count for _ in range(count)]
    entries = iter(upper)
    for i in range(count):
        for j in range(i, count):
            matrix[i][j] = matrix[j][i] = next(entries)
    return matrix


def fsum(values: Iterable[float]) -> float:
    """The exactly rounded sum (so the order blocks arrive in never matters); non-finite
    values, which math.fsum refuses when they cancel (inf - inf), add as usual."""
    values = list(values)
    try:
        return math.fsum(values)
    except (ValueError, OverflowError):
        return sum(values)


def clip(value: float) -> float:
    """value clamped to [-1, 1], NaN kept (as torch.clamp keeps it; min/max would not)."""
    return value if math.isnan(value) else max(-1.0, min(1.0, value))


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
