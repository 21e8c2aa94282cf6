"""RAM, Reinforced Agent Merging (arXiv:2601.13572): an entry changed by one model only keeps
that model's full change, instead of being diluted by the models that left it alone; entries
changed by several models take the mean of their changes. "Changed" means |x_i - base| > epsilon.

`ramplus_tl` (tensor-local RAM+) also boosts each model's unique entries by
lambda_i = 1 + r * clamp(shared_i / unique_i, 0, alpha), where shared_i and unique_i count the
entries of this tensor that model i changes together with others, or alone.
"""

from __future__ import annotations

from raymerge.lazy import torch
from raymerge.methods.base import MergeInputs, MergeMethod, Param


def merge(inputs: MergeInputs, boost: bool) -> torch.Tensor:
    base, deltas = inputs.task_vectors()
    if not deltas:
        return base
    epsilon = inputs.shared["epsilon"]
    changed = [delta.abs() > epsilon for delta in deltas]
    counts = torch.zeros_like(base, dtype=torch.int32)
    for mask in changed:
        counts += mask
    unique = counts == 1
    overlap = counts > 1
    unique_total = torch.zeros_like(base)
    overlap_total = torch.zeros_like(base)
    for delta, mask in zip(deltas, changed):
        scale = _boost(mask, unique, overlap, inputs.shared, epsilon) if boost else 1.0
        unique_total.add_(delta * (mask & unique), alpha=scale)
        overlap_total.add_(delta * (mask & overlap))
    return base + unique_total + overlap_total / counts.clamp(min=1)


def _boost(mask: torch.Tensor, unique: torch.Tensor, overlap: torch.Tensor, shared, epsilon):
    """1 + r * clamp(shared / unique, 0, alpha), counts over this tensor (mergekit's order)."""
    unique_count = int((mask & unique).sum())
    if unique_count == 0:
        return 1.0  # no unique entry to scale (mergekit may compute 0/0 here, to no effect)
    rho = int((mask & overlap).sum()) / max(unique_count, epsilon)
    return 1.0 + shared["r"] * min(max(rho, 0.0), shared["alpha"])


def ram(inputs: MergeInputs) -> torch.Tensor:
    return merge(inputs, boost=False)


def ramplus_tl(inputs: MergeInputs) -> torch.Tensor:
    return merge(inputs, boost=True)


EPSILON = Param(
    "epsilon",
    float,
    "shared",
    default=1e-5,
    low=0.0,
    help="a model changes an entry when |x - base| exceeds this",
)

METHODS = (
    MergeMethod(
        name="ram",
        merge=ram,
        params=(EPSILON,),
        base="required",
        summary="base + per entry: the only change, or the mean of several models' changes",
        locality="elementwise",
    ),
    MergeMethod(
        name="ramplus_tl",
        merge=ramplus_tl,
        params=(
            Param("r", float, "shared", default=0.1, help="strength of the unique-entry boost"),
            Param("alpha", float, "shared", default=0.2, help="cap on the shared/unique ratio"),
            EPSILON,
        ),
        base="required",
        summary="ram; unique changes scaled by 1 + r clamp(shared/unique, 0, alpha)",
    ),
)
