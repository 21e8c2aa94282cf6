"""Model Breadcrumbs (Davari & Belilovsky, 2023): drop both the largest outliers and the
smallest entries of each task vector; mergekit's `breadcrumbs` and `breadcrumbs_ties`.

Per tensor: the int(gamma * n) largest |delta| go, then the smallest, leaving int(density *
n): the entries whose rank in ascending (|delta|, flat index) order lies in [bottom, bottom +
keep). That is two exact lowest-r selections (selection.py), so a tensor split into row
ranges keeps the same entries; ranks follow the compute dtype's magnitudes (fp64 stays fp64).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from raymerge.lazy import torch
from raymerge.methods import selection, sparsify, task_arithmetic
from raymerge.methods.base import FactRound, MergeInputs, Param, compute_dtype, rows_of

GAMMA = Param(
    "gamma",
    float,
    "non_base",
    default=0.01,
    low=0.0,
    high=1.0,
    help="fraction of the largest-magnitude entries removed as outliers",
)


def _counts(density: float, gamma: float, n: int) -> tuple[int, int]:
    """(first rank kept, entries kept), mergekit's: keep int(density n), dropping int(gamma n)
    outliers at most."""
    keep = int(density * n) if density > 0 else 0
    return max(0, n - keep - int(gamma * n)), keep


def _magnitudes(inputs: MergeInputs, wanted: selection.Wanted) -> Iterator[selection.Offer]:
    """Each trimmed position's |delta| keys, with its density and gamma."""
    dtype = compute_dtype(inputs.base)
    base = inputs.base.to(dtype)
    for position, tensor, params in inputs.others():
        group = selection.tensor_group(inputs, position)
        if params["density"] < 1 and wanted(group):
            magnitude = tensor.to(dtype, copy=True).sub_(base).abs_()
            trim = {name: {repr(params[name]): 1} for name in ("density", "gamma")}
            yield group, selection.magnitude_keys(magnitude), trim


def _ranks(group: str, total: dict, inputs: MergeInputs) -> dict[str, selection.Pick]:
    """Ranks [bottom, bottom + keep) are the lowest bottom + keep less the lowest bottom."""
    density = selection.one_value(total, "density", group)
    bottom, keep = _counts(density, selection.one_value(total, "gamma", group), total["numel"])
    below, upto = (bottom, bottom + keep) if keep else (0, 0)  # nothing kept: no search
    return {f"{group} below": selection.Pick("bottom", below),
            f"{group} upto": selection.Pick("bottom", upto)}  # fmt: skip


def rank_rounds(shared: dict[str, Any]) -> tuple[FactRound, ...]:
    return selection.select_rounds(_magnitudes, _ranks)


def trim_outliers(
    delta: torch.Tensor, params: dict[str, Any], inputs: MergeInputs, position: int
) -> torch.Tensor | None:
    """The mask of the entries kept in the rows held (None: all of them)."""
    if params["density"] >= 1:
        return None
    magnitude = delta.abs().reshape(-1)
    if inputs.facts is None:  # the whole tensor is here: select over it at once
        bottom, keep = _counts(params["density"], params["gamma"], magnitude.numel())
        kept = sparsify.rank_range_mask(magnitude, bottom, bottom + keep)
        return kept.reshape(delta.shape)
    group = selection.tensor_group(inputs, position)
    keys, row_elements = selection.magnitude_keys(magnitude), rows_of(inputs.full_shape)[1]
    upto = selection.mask(keys, inputs.facts[f"{group} upto"], inputs, row_elements)
    below = selection.mask(keys, inputs.facts[f"{group} below"], inputs, row_elements)
    return upto.logical_and_(below.logical_not_()).reshape(delta.shape)


OUTLIERS = task_arithmetic.Trim(trim_outliers, "tensor", rank_rounds)


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
