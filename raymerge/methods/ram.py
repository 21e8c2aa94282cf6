"""RAM, Reinforced Agent Merging (arXiv:2601.13572): an entry changed by one model only keeps
that model's full change, instead of being diluted by the models that left it alone; entries
changed by several models take the mean of their changes. "Changed" means |x_i - base| > epsilon.

`ramplus_tl` (tensor-local RAM+) also boosts each model's unique entries by
lambda_i = 1 + r * clamp(shared_i / unique_i, 0, alpha), where shared_i and unique_i count the
entries of this tensor that model i changes together with others, or alone. Those counts are
whole-tensor facts: a tensor split into row ranges adds them up over blocks in one round.
"""

from __future__ import annotations

from raymerge.lazy import torch
from raymerge.methods.base import FactRound, MergeInputs, MergeMethod, Param


def merge(inputs: MergeInputs, boost: bool) -> torch.Tensor:
    base, deltas, changed, counts = _changes(inputs)
    if not deltas:
        return base
    unique = counts == 1
    overlap = counts > 1
    if not boost:
        scales = [1.0] * len(deltas)
    elif inputs.facts is None:  # the whole tensor is here: count over it at once
        scales = _boosts(_counts(changed, unique, overlap), {}, inputs)["boost"]
    else:
        scales = inputs.facts["boost"]
    unique_total = torch.zeros_like(base)
    overlap_total = torch.zeros_like(base)
    for delta, mask, scale in zip(deltas, changed, scales):
        unique_total.add_(delta * (mask & unique), alpha=scale)
        overlap_total.add_(delta * (mask & overlap))
    return base + unique_total + overlap_total / counts.clamp(min=1)


def _changes(inputs: MergeInputs) -> tuple[torch.Tensor, list, list, torch.Tensor]:
    """The base, the task vectors, where each changes an entry, and how many do there."""
    base, deltas = inputs.task_vectors()
    changed = [delta.abs() > inputs.shared["epsilon"] for delta in deltas]
    counts = torch.zeros_like(base, dtype=torch.int32)
    for mask in changed:
        counts += mask
    return base, deltas, changed, counts


def _counts(changed: list, unique: torch.Tensor, overlap: torch.Tensor) -> dict:
    """Entries each model changes alone, and together with others (ints: added over blocks)."""
    return {
        "unique": {str(i): int((mask & unique).sum()) for i, mask in enumerate(changed)},
        "shared": {str(i): int((mask & overlap).sum()) for i, mask in enumerate(changed)},
    }


def _count_block(inputs: MergeInputs, facts: dict) -> dict:
    _, _, changed, counts = _changes(inputs)
    return _counts(changed, counts == 1, counts > 1)


def _boosts(total: dict, facts: dict, inputs: MergeInputs) -> dict:
    """1 + r * clamp(shared / unique, 0, alpha) per model (mergekit's order); plain Python:
    this runs on the driver for a split tensor."""
    shared, epsilon = inputs.shared, inputs.shared["epsilon"]
    boosts = []
    for i in range(len(total.get("unique", {}))):
        unique_count, shared_count = total["unique"][str(i)], total["shared"][str(i)]
        if unique_count == 0:  # nothing to scale (mergekit may compute 0/0 here, to no effect)
            boosts.append(1.0)
            continue
        rho = shared_count / max(unique_count, epsilon)
        boosts.append(1.0 + shared["r"] * min(max(rho, 0.0), shared["alpha"]))
    return {**facts, "boost": boosts}


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
        rounds=lambda shared: (FactRound(_count_block, _boosts),),
    ),
)
