"""multislerp: a weighted mean direction on the hypersphere, scaled by the weighted mean norm.

mergekit's algorithm: project each (task) vector x_i to the unit sphere, take the
normalized weighted mean m of the unit vectors, project the unit vectors to the tangent
space at m, average there and map back with the exponential map, then scale by
sum(w_i |x_i|). The tangent step is an identity: the weighted sum of the tangent vectors is
M - (M.m) m = 0 for M = sum(w_i u_i), m = M/|M| (mergekit's exp map at |0| + eps is
m up to fp32 rounding), so it is left out here. Each tensor is one vector.

Two fact rounds give the whole-tensor norms, each summed over blocks in fp64 and exactly
across them: first |x_i|, then |M| of M computed element by element as the merge computes
it, so the result has the mean norm even where the unit vectors nearly cancel.
"""

from __future__ import annotations

import math
from typing import Any

from raymerge.lazy import torch
from raymerge.methods.base import (
    FactRound,
    MergeInputs,
    MergeMethod,
    Param,
    compute_dtype,
    gather_facts,
)  # fmt: skip
from raymerge.methods.spherical import dots, fsum, non_base_weights, row_chunks


def _vectors(inputs: MergeInputs) -> tuple[list[torch.Tensor], list[float], torch.Tensor | None]:
    """The (task) vectors in the compute dtype, their weights (normalized if asked), the base."""
    others = inputs.others()
    dtype = compute_dtype(others[0][1])
    base = None if inputs.base is None else inputs.base.to(dtype)
    vectors = [x.to(dtype) if base is None else x.to(dtype) - base for _, x, _ in others]
    weights = [p["weight"] for _, _, p in others]
    if inputs.shared["normalize_weights"]:
        total = sum(weights)
        weights = [w / total for w in weights]
    return vectors, weights, base


def _direction(vectors: list[torch.Tensor], weights: list[float], norms: list[float],
               eps: float) -> torch.Tensor:  # fmt: skip
    """M = sum(w_i x_i / (|x_i| + eps)), the norms rounded to the compute dtype first."""
    mean = torch.zeros_like(vectors[0])
    for x, w, norm in zip(vectors, weights, norms):
        divisor = torch.tensor(norm, dtype=x.dtype, device=x.device) + eps
        mean.add_((x / divisor).mul_(w))
    return mean


def _squares(inputs: MergeInputs, facts: dict) -> dict:
    count = len(inputs.others())
    if count < 2:
        return {}
    parts = (_vectors(part)[0] for part in row_chunks(inputs))
    return {"squares": [dots(parts, [(i, i) for i in range(count)])]}


def _norms(total: dict, facts: dict, inputs: MergeInputs) -> dict:
    if "squares" not in total:
        return {}
    return {"norms": [math.sqrt(fsum(column)) for column in zip(*total["squares"])]}


def _mean_square(inputs: MergeInputs, facts: dict) -> dict:
    def mean(part: MergeInputs) -> list[torch.Tensor]:
        vectors, weights, _ = _vectors(part)
        return [_direction(vectors, weights, facts["norms"], inputs.shared["eps"])]

    return {"mean": dots(map(mean, row_chunks(inputs)), [(0, 0)])}


def _mean_norm(total: dict, facts: dict, inputs: MergeInputs) -> dict:
    return facts | {"mean_norm": math.sqrt(fsum(total["mean"]))}


ROUNDS = (
    FactRound(_squares, _norms),
    FactRound(_mean_square, _mean_norm, needed=lambda facts: "norms" in facts),
)


def merge(inputs: MergeInputs) -> torch.Tensor:
    others = inputs.others()
    if not others:
        raise ValueError("multislerp needs at least one model besides the base")
    if len(others) == 1:
        return others[0][1].to(compute_dtype(others[0][1]))  # as mergekit: the model itself
    facts = inputs.facts if inputs.facts is not None else gather_facts(ROUNDS, inputs)
    vectors, weights, base = _vectors(inputs)
    eps, mean_norm = inputs.shared["eps"], facts["mean_norm"]
    if mean_norm < eps or mean_norm == 0:
        # the unit vectors cancel (a and -a at equal weights, all x_i = 0): the weighted
        # sum, as mergekit for two inputs (for three or more mergekit raises ValueError)
        result = sum(w * x for x, w in zip(vectors, weights))
    else:
        scale = fsum(w * norm for w, norm in zip(weights, facts["norms"]))
        result = _direction(vectors, weights, facts["norms"], eps).mul_(scale / mean_norm)
    return result if base is None else result.add_(base)


def check(shared: dict[str, Any], per_input: list[dict[str, Any]]) -> str | None:
    weights = non_base_weights(per_input)
    if not weights:
        return "multislerp needs at least one model besides the base_model"
    if shared.get("normalize_weights") and len(weights) > 1 and sum(weights) == 0:
        return (
            f"weights {weights} sum to zero while normalize_weights is true (division by "
            "zero); change a weight or set parameters.normalize_weights: false"
        )
    return None


METHODS = (
    MergeMethod(
        name="multislerp",
        merge=merge,
        params=(
            Param("weight", float, "non_base", help="this model's weight"),
            Param(
                "normalize_weights",
                bool,
                "shared",
                default=True,
                help="divide the weights by their sum",
            ),
            Param("eps", float, "shared", default=1e-8, low=0.0, help="norm guard"),
        ),
        base="optional",
        min_inputs=1,
        summary="weighted mean direction on the hypersphere times the weighted mean norm",
        check=check,
        locality="tensor",
        rounds=lambda shared: ROUNDS,
    ),
)
