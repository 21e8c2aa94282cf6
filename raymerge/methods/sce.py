"""SCE (Wan et al., 2024, FuseChat): Select the entries where the task vectors vary most
across models, Calculate each model's weight from its task vector's energy, Erase the entries
whose sign disagrees with the elected one, then take the weighted mean of what remains.

As mergekit 0.1.5 does it:
1. τᵢ = xᵢ − base. With select_topk < 1, keep in every τᵢ the k entries of largest variance
   across models (population variance), k = int(nonzero · select_topk) where nonzero counts the
   entries that vary at all, multiplied in float32 as torch does there; k = 0 keeps none.
2. wᵢ = mean(τᵢ²) / Σⱼ mean(τⱼ²), or 1/N when that sum is below 1e-6.
3. Elected sign: + where Σᵢ τᵢ ≥ 0; τᵢ agrees where its sign equals it (zeros never agree).
4. base + Σᵢ wᵢ τᵢ aggᵢ / max(Σᵢ wᵢ aggᵢ, 1e-6).

Steps 1 and 2 need the whole tensor. A whole one selects at once; a split one gathers the
same facts in rounds over blocks of rows: the exact top-k of selection.py (the same set), then
each model's sum of squares. Both sum those in float64 per block and add the blocks with
math.fsum, so a tensor split into row ranges merges to the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from raymerge.lazy import torch
from raymerge.methods import selection, sparsify, task_arithmetic
from raymerge.methods.base import FactRound, MergeInputs, MergeMethod, Param, float_sum, rows_of

GROUP = "variance"


def merge(inputs: MergeInputs) -> torch.Tensor:
    base, deltas = inputs.task_vectors()
    if not deltas:
        return base
    facts, select_topk = inputs.facts, inputs.shared["select_topk"]
    if select_topk < 1:  # a whole tensor (no facts) selects over itself at once
        kept = select_mask(deltas, select_topk) if facts is None else _kept(inputs, deltas, facts)
        deltas = [delta.mul_(kept) for delta in deltas]
    if facts is None:  # the same per-block sums as the energy round
        facts = _weights(_energy_sums(inputs, deltas), {}, inputs)
    positive = _total(deltas) >= 0
    merged = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for delta, weight in zip(deltas, facts["weights"]):
        agrees = torch.where(positive, delta > 0, delta < 0)
        merged.add_(delta * agrees, alpha=weight)
        divisor.add_(agrees, alpha=weight)
    return merged.div_(divisor.clamp_(min=1e-6)).add_(base)


def rounds(shared: dict[str, Any]) -> tuple[FactRound, ...]:
    """For a split tensor: the variance top-k (when it selects), then the energy weights."""
    select = 0 < shared["select_topk"] < 1
    top_k = selection.select_rounds(_variances, _top_k, signed=True) if select else ()
    return top_k + (FactRound(_energies, _weights),)


def select_mask(deltas: list[torch.Tensor], select_topk: float) -> torch.Tensor:
    """The entries of largest variance across models; ties go to the lowest flat index."""
    if select_topk <= 0:
        return torch.zeros_like(deltas[0], dtype=torch.bool)
    magnitude, varies = _variance(deltas)
    k = _count(varies, select_topk)
    return sparsify.top_k_mask(magnitude.reshape(-1), k).reshape(deltas[0].shape)


def _variance(deltas: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Each entry's population variance across models, -1 where all models agree (so those
    rank below all others and the k picked always vary), and how many entries vary."""
    mean = _total(deltas).div_(len(deltas))
    variance = torch.zeros_like(mean)
    for delta in deltas:
        # one rounding per elementwise op (no fused multiply-add): the same bits on any device
        diff = delta - mean
        variance += diff * diff
    variance.div_(len(deltas))
    varies = torch.zeros_like(mean, dtype=torch.bool)
    for delta in deltas[1:]:
        varies |= delta != deltas[0]
    return torch.where(varies, variance, -1.0), int(varies.sum())


def _count(varies: int, select_topk: float) -> int:
    """mergekit's int(count_nonzero(var) * select_topk): an int64 tensor times a float is
    float32 there (numpy here: this also runs on the driver)."""
    return int(np.float32(varies) * np.float32(select_topk))


def _variances(inputs: MergeInputs, wanted: selection.Wanted) -> Iterator[selection.Offer]:
    if wanted(GROUP) and inputs.others():
        magnitude, varies = _variance(inputs.task_vectors()[1])
        yield GROUP, selection.order_keys(magnitude), {"varies": varies}


def _top_k(group: str, total: dict, inputs: MergeInputs) -> dict[str, selection.Pick]:
    return {GROUP: selection.Pick("top", _count(total["varies"], inputs.shared["select_topk"]))}


def _kept(inputs: MergeInputs, deltas: list[torch.Tensor], facts: dict) -> torch.Tensor:
    """The selected entries of the rows held, from a split tensor's facts."""
    if inputs.shared["select_topk"] <= 0:
        return torch.zeros_like(deltas[0], dtype=torch.bool)
    keys = selection.order_keys(_variance(deltas)[0])
    kept = selection.mask(keys, facts[GROUP], inputs, rows_of(inputs.full_shape)[1])
    return kept.reshape(deltas[0].shape)


def _energies(inputs: MergeInputs, facts: dict) -> dict:
    _, deltas = inputs.task_vectors()
    if deltas and inputs.shared["select_topk"] < 1:
        kept = _kept(inputs, deltas, facts)
        deltas = [delta.mul_(kept) for delta in deltas]
    return _energy_sums(inputs, deltas)


def _energy_sums(inputs: MergeInputs, deltas: list[torch.Tensor]) -> dict:
    """Each model's sum of squares over every block of rows held, in float64."""
    step = rows_of(inputs.full_shape)[1]
    sums: dict = {}
    for i, delta in enumerate(deltas):
        flat = delta.reshape(-1)
        sums[str(i)] = [
            float_sum(flat[lo * step : hi * step].double().square())
            for _, lo, hi in inputs.blocks()
        ]
    return {"energy": sums}


def _weights(total: dict, facts: dict, inputs: MergeInputs) -> dict:
    """Each model's share of the mean squared task vector; uniform when all are (near) zero."""
    sums = total.get("energy", {})
    energies = [math.fsum(sums[str(i)]) / max(1, inputs.numel) for i in range(len(sums))]
    energy = sum(energies)
    if abs(energy) < 1e-6:
        return {**facts, "weights": [1.0 / max(1, len(energies))] * len(energies)}
    return {**facts, "weights": [e / energy for e in energies]}


def _total(tensors: list[torch.Tensor]) -> torch.Tensor:
    return sum(tensors[1:], tensors[0].clone())


METHODS = (
    MergeMethod(
        name="sce",
        merge=merge,
        params=(
            task_arithmetic.INT8_MASK,
            Param(
                "select_topk",
                float,
                "shared",
                default=1.0,
                low=0.0,
                high=1.0,
                help="fraction of the varying entries kept, by variance across models",
            ),
        ),
        base="required",
        summary="base + weighted mean of sign-agreeing, variance-selected task vectors",
        rounds=rounds,
    ),
)
