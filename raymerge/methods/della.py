"""DELLA (Deep et al., 2024): MagPrune drops task-vector entries at random, larger
magnitudes less often, then merges with or without TIES sign election; mergekit's `della`
and `della_linear`.

Keep probabilities run from density - epsilon to density + epsilon by |delta| rank within
each row; both ends must lie in (0, 1), which the plan checks before any weight is read.
Draws come from the counter-based generator keyed by (seed, tensor name, model position).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from raymerge.lazy import torch
from raymerge.methods import random as rng
from raymerge.methods import sparsify, task_arithmetic
from raymerge.methods.base import MergeInputs, Param

EPSILON = Param(
    "epsilon",
    float,
    "non_base",
    default=0.15,
    low=0.0,
    high=1.0,
    help="half-width of the keep-probability range around density",
)


def trim_magprune(
    delta: torch.Tensor, params: dict[str, Any], inputs: MergeInputs, position: int
) -> torch.Tensor:
    stream = rng.key(inputs.seed, inputs.name, position)
    return sparsify.della_magprune(
        delta, params["density"], params["epsilon"], stream, offset=inputs.element_start
    )


MAGPRUNE = task_arithmetic.Trim(trim_magprune, "rows")


def check_epsilon(shared: dict[str, Any], per_input: list[dict[str, Any]]) -> str | None:
    """mergekit fails mid-merge when density +/- epsilon leaves (0, 1); refuse it at plan time."""
    for i, params in enumerate(per_input):
        if "epsilon" not in params:
            continue  # the base model
        density, epsilon = params["density"], params["epsilon"]
        if not 0 < density < 1:
            continue  # nothing is drawn: all kept (density >= 1) or none (density <= 0)
        if density - epsilon <= 0 or density + epsilon >= 1:
            return (
                f"input {i}: density {density:g} and epsilon {epsilon:g} give keep "
                f"probabilities [{density - epsilon:g}, {density + epsilon:g}], which must lie "
                f"inside (0, 1); use epsilon < {min(density, 1 - density):g} for this density"
            )
    return None


METHODS = tuple(
    dataclasses.replace(method, check=check_epsilon)
    for method in (
        task_arithmetic.make(
            "della",
            "base + lambda * sign-agreeing mean of w_i magprune(x_i - base)",
            trim=MAGPRUNE,
            elect_sign=True,
            default_normalize=True,
            default_rescale=True,
            extra=(EPSILON,),
        ),
        task_arithmetic.make(
            "della_linear",
            "base + lambda * sum(w_i magprune(x_i - base))",
            trim=MAGPRUNE,
            elect_sign=False,
            default_normalize=False,
            default_rescale=True,
            extra=(EPSILON,),
        ),
    )
)
