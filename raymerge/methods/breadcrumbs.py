"""Model Breadcrumbs (Davari & Belilovsky, 2023): drop both the largest outliers and the
smallest entries of each task vector; mergekit's `breadcrumbs` and `breadcrumbs_ties`.

Per tensor: the int(gamma * n) largest |delta| go, then the smallest, leaving int(density *
n). Equal magnitudes are ranked by flat index, so the kept set never depends on sort order.
"""

from __future__ import annotations

from typing import Any

from raymerge.lazy import torch
from raymerge.methods import sparsify, task_arithmetic
from raymerge.methods.base import MergeInputs, Param

GAMMA = Param(
    "gamma",
    float,
    "non_base",
    default=0.01,
    low=0.0,
    high=1.0,
    help="fraction of the largest-magnitude entries removed as outliers",
)


def trim_outliers(
    delta: torch.Tensor, params: dict[str, Any], inputs: MergeInputs, position: int
) -> torch.Tensor:
    return sparsify.magnitude_outliers(delta, params["density"], params["gamma"])


OUTLIERS = task_arithmetic.Trim(trim_outliers, "tensor")


METHODS = (
    task_arithmetic.make(
        "breadcrumbs",
        "base + lambda * sum(w_i breadcrumbs(x_i - base))",
        trim=OUTLIERS,
        elect_sign=False,
        default_normalize=False,
        default_rescale=False,
        extra=(GAMMA,),
    ),
    task_arithmetic.make(
        "breadcrumbs_ties",
        "base + lambda * sum of sign-agreeing w_i breadcrumbs(x_i - base)",
        trim=OUTLIERS,
        elect_sign=True,
        default_normalize=False,
        default_rescale=False,
        extra=(GAMMA,),
    ),
)
