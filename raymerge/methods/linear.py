"""Weighted average of the inputs (model soups): sum(w_i * x_i) / sum(w_i)."""

from __future__ import annotations

from typing import Any

from raymerge.lazy import torch
from raymerge.methods.base import MergeInputs, MergeMethod, Param, compute_dtype


def merge(inputs: MergeInputs) -> torch.Tensor:
    first, *rest = inputs.tensors
    weights = [p["weight"] for p in inputs.per_input]
    # mixed-dtype add_ converts on the fly: no fp32 copy of each input
    result = first.to(compute_dtype(first), copy=True).mul_(weights[0])
    for tensor, weight in zip(rest, weights[1:]):
        result.add_(tensor, alpha=weight)
    if inputs.shared["normalize"]:
        result.div_(sum(weights))
    return result


def check_weights(shared: dict[str, Any], per_input: list[dict[str, Any]]) -> str | None:
    """Normalizing divides by the sum of weights: it must be positive and meaningful."""
    if not shared.get("normalize"):
        return None
    weights = [p["weight"] for p in per_input if "weight" in p]
    if any(w < 0 for w in weights):
        return (
            f"weights {weights} include a negative weight while normalize is true; "
            "use non-negative weights or set parameters.normalize: false"
        )
    if weights and sum(weights) == 0:
        return (
            f"weights {weights} sum to zero while normalize is true (division by zero); "
            "give at least one positive weight"
        )
    return None


METHODS = (
    MergeMethod(
        name="linear",
        merge=merge,
        params=(
            Param("weight", float, "input", help="this model's weight"),
            Param("normalize", bool, "shared", default=True, help="divide by the sum of weights"),
        ),
        base="ignored",
        summary="weighted average: sum(w_i x_i) / sum(w_i)",
        locality="elementwise",
        check=check_weights,
    ),
)
