"""karcher: the Karcher (Riemannian) mean of the inputs' directions, times their mean norm.

As mergekit: every input counts equally (the base too, when one is listed: the base policy is
"ignored", so it is just another input). Inputs with norm <= tol drop out of the direction
but still count in the mean norm. The mean starts at the normalized Euclidean mean of the unit
vectors and takes up to max_iter Riemannian gradient steps (log maps averaged in the tangent
space, exp map back), stopping once the step is shorter than tol.

Every iterate is a combination of the unit vectors, so the iteration needs only their
angles: one fact round gathers the inputs' Gram matrix (each block's dot products in fp64,
summed exactly), the iteration runs in fp64 on the units' coordinates in an orthonormal basis
of their span, and the merge is one weighted sum of the inputs, row by row. A unit within
1e-6 rad of the span of the others counts as lying in it, so exactly parallel or opposite
inputs stay exact instead of amplifying the rounding of their angle.
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
from raymerge.methods.spherical import clip, dots, fsum, gram_matrix, row_chunks, upper_pairs

SPAN_TOLERANCE = 1e-12  # squared sine of the angle below which a unit lies in the span
Vector = list[float]


def _gram(inputs: MergeInputs, facts: dict) -> dict:
    count = len(inputs.tensors)
    if count < 2:
        return {}
    dtype = compute_dtype(inputs.tensors[0])
    parts = ([x.to(dtype) for x in part.tensors] for part in row_chunks(inputs))
    return {"gram": [dots(parts, upper_pairs(count))]}


def _weights(total: dict, facts: dict, inputs: MergeInputs) -> dict:
    """Each input's weight in the result, None for zero (pure Python: this runs on the driver
    for split tensors)."""
    if "gram" not in total:
        return {}
    g = gram_matrix(total["gram"])
    if not all(math.isfinite(v) for row in g for v in row):
        return {"weights": [math.nan] * len(g)}
    tol = inputs.shared["tol"]
    norms = [math.sqrt(g[i][i]) for i in range(len(g))]
    valid = [i for i, norm in enumerate(norms) if norm > tol]
    if not valid:
        return {"weights": None}
    cosines = [[g[i][j] / norms[i] / norms[j] for j in valid] for i in valid]
    points, basis = _coordinates(cosines)
    mean = _karcher(points, inputs.shared["max_iter"], tol)
    scale = fsum(norms) / len(norms)
    weights = [0.0] * len(g)
    for k, i in enumerate(valid):
        weights[i] = scale * fsum(m * b[k] for m, b in zip(mean, basis)) / norms[i]
    return {"weights": weights}


ROUNDS = (FactRound(_gram, _weights),)


def _coordinates(cosines: list[Vector]) -> tuple[list[Vector], list[Vector]]:
    """The units' coordinates in an orthonormal basis of their span, and each basis vector
    as a combination of the units (pivoted Cholesky of their cosines: the unit farthest from
    the span so far comes next, the first of equals)."""
    count = len(cosines)
    points: list[Vector] = [[] for _ in range(count)]
    basis: list[Vector] = []
    residual = [cosines[i][i] for i in range(count)]
    while len(basis) < count:
        pivot = max(range(count), key=residual.__getitem__)
        if not residual[pivot] > SPAN_TOLERANCE:
            break
        length = math.sqrt(residual[pivot])
        column = [
            (cosines[i][pivot] - fsum(p * q for p, q in zip(points[i], points[pivot]))) / length
            for i in range(count)
        ]
        basis.append([
            (float(j == pivot) - fsum(p * q[j] for p, q in zip(points[pivot], basis))) / length
            for j in range(count)
        ])  # fmt: skip
        for i in range(count):
            points[i].append(column[i])
            residual[i] -= column[i] * column[i]
        residual[pivot] = 0.0
    return points, basis


def _dot(a: Vector, b: Vector) -> float:
    return fsum(p * q for p, q in zip(a, b))


def _karcher(points: list[Vector], max_iter: int, tol: float) -> Vector:
    """mergekit's iteration at equal weights, on the units' coordinates."""
    weight = 1.0 / len(points)
    mean = [fsum(weight * c for c in column) for column in zip(*points)]
    norm = math.sqrt(_dot(mean, mean))
    mean = list(points[0]) if norm < tol or norm == 0 else [m / norm for m in mean]
    for _ in range(max_iter):
        # log map of each unit at the mean: theta / sin(theta) * (u - cos(theta) * mean)
        tangent = [0.0] * len(mean)
        for u in points:
            dot = clip(_dot(mean, u))
            theta = math.acos(dot)
            if theta < tol or theta == 0:  # already at the mean: no contribution
                continue
            coef = theta / math.sin(theta) * weight
            tangent = [v + (p - dot * m) * coef for v, p, m in zip(tangent, u, mean)]
        step = math.sqrt(_dot(tangent, tangent))
        if step < tol or step == 0:
            break
        mean = [m * math.cos(step) + v * (math.sin(step) / step) for m, v in zip(mean, tangent)]
        length = math.sqrt(_dot(mean, mean))
        if length > tol:
            mean = [m / length for m in mean]
    return mean


def merge(inputs: MergeInputs) -> torch.Tensor:
    dtype = compute_dtype(inputs.tensors[0])
    tensors = [x.to(dtype) for x in inputs.tensors]
    if len(tensors) == 1:
        return tensors[0]
    facts = inputs.facts if inputs.facts is not None else gather_facts(ROUNDS, inputs)
    result = None
    for x, weight in zip(tensors, facts["weights"] or ()):
        if weight:  # an input out of the direction adds nothing
            term = x * weight
            result = term if result is None else result.add_(term)
    return torch.zeros_like(tensors[0]) if result is None else result


METHODS = (
    MergeMethod(
        name="karcher",
        merge=merge,
        params=(
            Param("max_iter", int, "shared", default=10, low=0, help="most gradient steps"),
            Param("tol", float, "shared", default=1e-5, low=0.0, help="convergence tolerance"),
        ),
        base="ignored",
        min_inputs=1,
        summary="Karcher mean of the directions on the hypersphere times the mean norm",
        locality="tensor",
        rounds=lambda shared: ROUNDS,
    ),
)
