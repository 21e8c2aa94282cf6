"""TIES: trim each task vector to its top-k magnitudes, elect a sign per entry by summed
mass, and average only the entries that agree with it (Yadav et al., 2023).

`density_scope: tensor` (the default) trims per tensor, as mergekit does, keeping exactly
k = int(density * n) entries; magnitude ties break toward the lowest flat index so output
never depends on sort order. `density_scope: global` trims over the whole model as the paper
does: a prepare step (raymerge/global_topk.py) finds each model's exact threshold first.
"""

from __future__ import annotations

from typing import Any

import torch

from raymerge.methods import sparsify, task_arithmetic
from raymerge.methods.base import MergeInputs, Param


def trim(
    delta: torch.Tensor, params: dict[str, Any], inputs: MergeInputs, position: int
) -> torch.Tensor | None:
    if inputs.shared["density_scope"] == "global":
        return sparsify.threshold_trim(delta, params["_threshold"], params["_ties"])
    return sparsify.magnitude_mask(delta, params["density"])


DENSITY_SCOPE = Param(
    "density_scope", str, "shared", default="tensor", choices=("tensor", "global"),
    help="trim each tensor (mergekit) or each model's whole task vector (the TIES paper)",
)  # fmt: skip

METHODS = (
    task_arithmetic.make(
        "ties",
        "base + lambda * disjoint_mean_i(topk(w_i (x_i - base)))",
        trim=trim,
        elect_sign=True,
        default_normalize=True,
        default_rescale=False,
        extra=(DENSITY_SCOPE,),
    ),
)
