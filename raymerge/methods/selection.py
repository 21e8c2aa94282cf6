"""Exact top-k of |task vector| over a group of blocks, by histograms of fp32 magnitude bits.

A group is one model's share of one tensor (TIES per tensor, mergekit's default) or one
model's whole task vector (`density_scope: global`, the TIES paper). No worker needs to hold
a group: for non-negative floats, bit order is value order, so

1. every block returns a histogram of the top 16 bits; the group's k-th largest value lies
   in the bucket where the count from the top reaches k;
2. a histogram of the low 16 bits inside that bucket gives the exact value T;
3. if only some of the entries equal to T fit in k, every block counts them, and they are
   handed out in (tensor name, block) order, first entries of a block first: the lowest flat
   positions win, as a stable sort would choose.

So exactly k = int(density * n) entries are kept, identically whether a tensor is merged
whole or in row ranges, and whatever order the blocks are counted in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from raymerge.lazy import torch
from raymerge.methods.base import FactRound, MergeInputs
from raymerge.methods.sparsify import keep_count, split

HIGH_BINS = 1 << 15  # magnitudes have no sign bit: bits >> 16 < 2^15
LOW_BINS = 1 << 16
KEEP_ALL, KEEP_NONE = "all", "none"

# (inputs, position) -> the group the position's entries are selected in
GroupOf = Callable[[MergeInputs, int], str]


def magnitude_bits(delta: torch.Tensor) -> torch.Tensor:
    """|delta| as fp32 int32 bit patterns (flat); the selection compares these."""
    return delta.float().abs().view(torch.int32).reshape(-1) & 0x7FFFFFFF


def tensor_group(inputs: MergeInputs, position: int) -> str:
    return f"{inputs.name}|{position}"


def model_group(inputs: MergeInputs, position: int) -> str:
    return f"model {inputs.model(position)}"


def rounds(group_of: GroupOf) -> tuple[FactRound, ...]:
    """The three rounds, for every non-base position whose density is below 1."""

    def each(inputs: MergeInputs, facts: dict, wanted: Callable[[Any], bool]):
        base = inputs.base.float()
        for position, tensor, params in inputs.others():
            group = group_of(inputs, position)
            if wanted(facts.get(group)) and params["density"] < 1:
                yield group, params, magnitude_bits(tensor.float() - base)

    def high(inputs: MergeInputs, facts: dict) -> dict:
        stats: dict = {"numel": {}, "high": {}, "density": {}}
        for group, params, bits in each(inputs, facts, lambda _: True):
            stats["numel"][group] = stats["numel"].get(group, 0) + bits.numel()
            counts = torch.bincount(bits >> 16, minlength=HIGH_BINS).cpu().numpy()
            stats["high"][group] = stats["high"].get(group, 0) + counts.astype(np.int64)
            stats["density"][group] = {repr(params["density"]): 1}
        return stats

    def low(inputs: MergeInputs, facts: dict) -> dict:
        stats: dict = {"low": {}}
        for group, _, bits in each(inputs, facts, lambda f: isinstance(f, dict) and "bucket" in f):
            inside = bits[(bits >> 16) == facts[group]["bucket"]] & 0xFFFF
            counts = torch.bincount(inside, minlength=LOW_BINS).cpu().numpy().astype(np.int64)
            stats["low"][group] = stats["low"].get(group, 0) + counts
        return stats

    def ties(inputs: MergeInputs, facts: dict) -> dict:
        stats: dict = {"ties": {}}
        for group, _, bits in each(inputs, facts, lambda f: isinstance(f, dict) and "take" in f):
            stats["ties"].setdefault(group, []).append(
                (inputs.name, inputs.blocks()[0][0], int((bits == facts[group]["threshold"]).sum()))
            )
        return stats

    return (
        FactRound(high, _reduce_high),
        FactRound(low, _reduce_low, needed=lambda facts: _any(facts, "bucket")),
        FactRound(ties, _reduce_ties, needed=lambda facts: _any(facts, "take")),
    )


def _any(facts: dict, key: str) -> bool:
    return any(isinstance(f, dict) and key in f for f in facts.values())


def _reduce_high(total: dict, facts: dict, inputs: MergeInputs) -> dict:
    facts = dict(facts)
    for group, numel in total.get("numel", {}).items():
        densities = total["density"][group]
        if len(densities) != 1:
            raise ValueError(f"{group}: one density per selection group, got {sorted(densities)}")
        k = keep_count(float(next(iter(densities))), numel)
        if k >= numel:
            facts[group] = KEEP_ALL
        elif k == 0:
            facts[group] = KEEP_NONE
        else:
            bucket, above = split(total["high"][group], k)
            facts[group] = {"k": k, "bucket": bucket, "above": above}
    return facts


def _reduce_low(total: dict, facts: dict, inputs: MergeInputs) -> dict:
    facts = dict(facts)
    for group, low in total.get("low", {}).items():
        fact = facts[group]
        value, greater = split(low, fact["k"] - fact["above"])
        threshold = (fact["bucket"] << 16) | value
        take = fact["k"] - fact["above"] - greater
        if take < int(low[value]):
            facts[group] = {"threshold": threshold, "take": take}
        else:
            facts[group] = {"threshold": threshold, "quota": KEEP_ALL}
    return facts


def _reduce_ties(total: dict, facts: dict, inputs: MergeInputs) -> dict:
    """Hand the ties at the threshold out in (tensor name, block) order."""
    from raymerge.mapping import natural_key  # not at import time: mapping imports methods

    facts = dict(facts)
    for group, counts in total.get("ties", {}).items():
        take = facts[group]["take"]
        quota: dict[str, dict[str, int]] = {}
        for name, block, count in sorted(counts, key=lambda c: (natural_key(c[0]), c[1])):
            quota.setdefault(name, {})[str(block)] = min(count, take)
            take -= min(count, take)
        facts[group] = {"threshold": facts[group]["threshold"], "quota": quota}
    return facts


def keep_mask(delta: torch.Tensor, fact: Any, inputs: MergeInputs) -> torch.Tensor | None:
    """The entries of the rows held that the group's selection keeps (None: all of them)."""
    if fact == KEEP_ALL:
        return None
    if fact == KEEP_NONE:
        return torch.zeros(delta.shape, dtype=torch.bool, device=delta.device)
    bits = magnitude_bits(delta)
    threshold = fact["threshold"]
    keep = bits > threshold
    quota = fact["quota"]
    if quota == KEEP_ALL:
        keep |= bits == threshold
        return keep.reshape(delta.shape)
    mine = quota.get(inputs.name, {})
    row_elements = delta.numel() // max(1, delta.shape[0]) if delta.dim() > 1 else 1
    for block, lo, hi in inputs.blocks():
        take = mine.get(str(block), 0)
        if take:
            piece = slice(lo * row_elements, hi * row_elements)
            equal = (bits[piece] == threshold).nonzero().squeeze(1)[:take]
            keep[piece][equal] = True
    return keep.reshape(delta.shape)
