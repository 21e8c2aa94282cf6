"""multislerp: a weighted mean direction on the hypersphere, scaled by the weighted mean norm.

mergekit's algorithm: project each (task) vector x_i to the unit sphere, take the
normalized weighted mean m of the unit vectors, project the unit vectors to the tangent
space at m, average there and map back with the exponential map, then scale by
sum(w_i |x_i|). The tangent step is an identity: the weighted sum of the tangent vectors is
M - (M.m) m = 0 for M = sum(w_i u_i), m = M/|M| (mergekit's exp map at |0| + eps is
m up to fp32 rounding), so it is left out here. Each tensor is one vector.
"""

from __future__ import annotations

from typing import Any

from raymerge.lazy import torch
from raymerge.methods.base import MergeInputs, MergeMethod, Param, compute_dtype
from raymerge.methods.spherical import non_base_weights, normalize


def multislerp(
    tensors: list[torch.Tensor], weights: list[float], normalize_weights: bool, eps: float
) -> torch.Tensor:
    """Merge same-shape tensors of the compute dtype; one tensor is returned as it is."""
    if len(tensors) == 1:
        return tensors[0]
    if normalize_weights:
        total = sum(weights)
        weights = [w / total for w in weights]
    mean = torch.zeros_like(tensors[0])
    scale = 0.0
    for x, w in zip(tensors, weights):
        unit, norm = normalize(x, eps, "shift")
        mean.add_(unit.mul_(w))
        scale = scale + w * norm
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm.item() < eps:
        # the unit vectors cancel (a and -a at equal weights, all x_i = 0): the weighted
        # sum, as mergekit for two inputs (for three or more mergekit raises ValueError)
        return sum(w * x for x, w in zip(tensors, weights))
    return mean.mul_(scale / mean_norm)


def merge(inputs: MergeInputs) -> torch.Tensor:
    others = inputs.others()
    if not others:
        raise ValueError("multislerp needs at least one model besides the base")
    dtype = compute_dtype(others[0][1])
    if len(others) == 1:
        return others[0][1].to(dtype)  # as mergekit: the model itself, base or not
    base = None if inputs.base is None else inputs.base.to(dtype)
    tensors = [x.to(dtype) if base is None else x.to(dtype) - base for _, x, _ in others]
    weights = [p["weight"] for _, _, p in others]
    result = multislerp(tensors, weights, inputs.shared["normalize_weights"], inputs.shared["eps"])
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
    ),
)
