"""Exact order statistics over a group of blocks, by histograms of float bits.

A group is what one selection ranks: one model's share of a tensor (TIES, breadcrumbs), a
model's whole task vector (TIES `density_scope: global`), one tensor's scores (sce,
arcee_fusion). No worker needs to hold a group. Every value gets an integer key that sorts
like it (fp32: 32 bits, fp64: 64; -0.0 keys as 0.0), and a `Pick` asks for the `count`
largest (`top`) or smallest (`bottom`) entries of a group:

1. every block returns a histogram of the keys' top 16 bits; the count-th entry from the
   pick's side lies in the bin where the count from that side reaches `count`;
2. a histogram of the next 16 bits inside that bin (once for fp32, three times for fp64)
   narrows it down to the exact key T;
3. if only some of the entries equal to T fit, every block counts them, and they are handed
   out in (tensor name, block) order, first entries of a block first: the lowest flat
   positions win, as a stable sort (either way) would choose.

So the kept set is exactly a stable sort's, whether a tensor is merged whole or in row
ranges and whatever order the blocks are counted in. A `value` pick stops at T: an exact
order statistic (a quantile), with no mask.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from raymerge.lazy import torch
from raymerge.methods.base import FactRound, MergeInputs, add_stats
from raymerge.methods.sparsify import keep_count, magnitude_bits, split

DIGIT, BINS = 16, 1 << 16
KEEP_ALL, KEEP_NONE = "all", "none"
FLIP = {32: 0x7FFFFFFF, 64: 0x7FFFFFFFFFFFFFFF}

# (inputs, position) -> the group the position's entries are selected in
GroupOf = Callable[[MergeInputs, int], str]
# source(one block's inputs, wanted) -> an Offer (group, flat keys, extra stats) for each group
# `wanted` accepts; the extra stats (added up over blocks, see FactRound) reach the picks
Wanted = Callable[[str], bool]
Offer = tuple[str, "torch.Tensor", dict]
Source = Callable[[MergeInputs, Wanted], Iterable[Offer]]


@dataclass(frozen=True)
class Pick:
    side: str  # "top": the `count` largest entries; "bottom": the `count` smallest
    count: int
    value: bool = False  # only the count-th key from `side` (1 <= count <= n), no mask


# picks(group, its totals: "numel" and the extra stats, inputs) -> {fact name: Pick}
Picks = Callable[[str, dict, MergeInputs], dict[str, Pick]]


def magnitude_keys(magnitude: torch.Tensor) -> torch.Tensor:
    """Keys of a non-negative tensor in its own precision: fp64 bits, else fp32 bits."""
    wide = magnitude.dtype == torch.float64
    flat = magnitude.reshape(-1) if wide else magnitude.float().reshape(-1)
    return flat.view(torch.int64 if wide else torch.int32)


def order_keys(values: torch.Tensor) -> torch.Tensor:
    """Keys of any values: a negative float's value bits flipped, plus one (-0.0 keys 0)."""
    bits = magnitude_keys(values)
    return torch.where(bits < 0, (bits ^ FLIP[8 * bits.element_size()]) + 1, bits)


def key_value(key: int, width: int) -> float:
    """The float an order key stands for (+0.0 for 0): numpy only, it runs on the driver."""
    bits = key if key >= 0 else (key - 1) ^ FLIP[width]
    ints, floats = (np.int32, np.float32) if width == 32 else (np.int64, np.float64)
    return float(np.array(bits, dtype=ints).view(floats))


def tensor_group(inputs: MergeInputs, position: int) -> str:
    return f"{inputs.name}|{position}"


def model_group(inputs: MergeInputs, position: int) -> str:
    return f"model {inputs.model(position)}"


def one_value(total: dict, name: str, group: str) -> float:
    """The one value a group's blocks reported under `name` (as {repr(value): count})."""
    values = total[name]
    if len(values) != 1:
        raise ValueError(f"{group}: one {name} per selection group, got {sorted(values)}")
    return float(next(iter(values)))


def rounds(group_of: GroupOf) -> tuple[FactRound, ...]:
    """TIES: the k = int(density * n) largest magnitudes of every position's group whose
    density is below 1 (fact name: the group)."""

    def source(inputs: MergeInputs, wanted: Wanted) -> Iterator[Offer]:
        base = inputs.base.float()
        for position, tensor, params in inputs.others():
            group = group_of(inputs, position)
            if params["density"] < 1 and wanted(group):
                density = {"density": {repr(params["density"]): 1}}
                yield group, magnitude_bits(tensor.float() - base).reshape(-1), density

    def picks(group: str, total: dict, inputs: MergeInputs) -> dict[str, Pick]:
        return {group: Pick("top", keep_count(one_value(total, "density", group), total["numel"]))}

    return select_rounds(source, picks)


def select_rounds(source: Source, picks: Picks, signed: bool = False) -> tuple[FactRound, ...]:
    """The rounds that resolve every pick of the groups `source` offers; `signed`: keys may
    be negative (else the top histogram needs half the bins)."""
    offset = BINS // 2 if signed else 0  # the top digit's bin: (key >> (width - 16)) + offset

    def pending(facts: dict, step: str | int) -> dict[str, dict]:
        return {k: f for k, f in facts.items() if isinstance(f, dict) and f.get("step") == step}

    def high(inputs: MergeInputs, facts: dict) -> dict:
        stats: dict = {"numel": {}, "high": {}, "width": {}, "extra": {}}
        for group, keys, extra in source(inputs, lambda _: True):
            top = keys >> (8 * keys.element_size() - DIGIT)
            top, bins = (top + offset, BINS) if signed else (top, BINS // 2)
            counts = torch.bincount(top, minlength=bins)
            _add(stats, "numel", group, keys.numel())
            _add(stats, "high", group, counts.cpu().numpy().astype(np.int64))
            _add(stats, "width", group, {str(8 * keys.element_size()): 1})
            _add(stats, "extra", group, extra)
        return stats

    def reduce_high(total: dict, facts: dict, inputs: MergeInputs) -> dict:
        facts = dict(facts)
        for group, numel in total.get("numel", {}).items():
            width = int(next(iter(total["width"][group])))  # a group's keys share one dtype
            totals = {"numel": numel, **total["extra"][group]}
            for name, pick in picks(group, totals, inputs).items():
                if not pick.value and pick.count >= numel:
                    facts[name] = KEEP_ALL
                elif not pick.value and pick.count <= 0:
                    facts[name] = KEEP_NONE
                else:
                    state = {"of": group, "side": pick.side, "value": pick.value, "step": 0}
                    state |= {"width": width, "prefix": 0, "need": pick.count}
                    facts[name] = _descend(state, total["high"][group], offset)
        return facts

    def histogram(inputs: MergeInputs, facts: dict, step: int) -> dict:
        todo, stats, seen = pending(facts, step), {"digit": {}}, {}
        for group, keys, _ in source(inputs, {f["of"] for f in todo.values()}.__contains__):
            for name, fact in todo.items():
                shift = fact["width"] - DIGIT * (step + 1)
                cache = (group, shift, fact["prefix"])
                if fact["of"] == group and cache not in seen:
                    inside = keys[(keys >> (shift + DIGIT)) == fact["prefix"]]
                    inside = (inside >> shift if shift else inside) & (BINS - 1)
                    seen[cache] = torch.bincount(inside, minlength=BINS).cpu().numpy()
                if fact["of"] == group:
                    _add(stats, "digit", name, seen[cache].astype(np.int64))
        return stats

    def reduce_digit(total: dict, facts: dict, inputs: MergeInputs) -> dict:
        facts = dict(facts)
        for name, counts in total.get("digit", {}).items():
            facts[name] = _descend(facts[name], counts, 0)
        return facts

    def ties(inputs: MergeInputs, facts: dict) -> dict:
        todo, stats = pending(facts, "ties"), {"ties": {}}
        for group, keys, _ in source(inputs, {f["of"] for f in todo.values()}.__contains__):
            for name, fact in todo.items():
                if fact["of"] == group:
                    count = int((keys == fact["threshold"]).sum())
                    where = (inputs.name, inputs.blocks()[0][0], count)
                    stats["ties"].setdefault(name, []).append(where)
        return stats

    def steps(step: int | str) -> Callable[[dict], bool]:
        return lambda facts: bool(pending(facts, step))

    # the second 16 bits; fp64 keys take two more
    digits = tuple(FactRound(partial(histogram, step=s), reduce_digit, steps(s)) for s in (1, 2, 3))
    return (FactRound(high, reduce_high), *digits, FactRound(ties, _reduce_ties, steps("ties")))


def _add(stats: dict, section: str, group: str, value: Any) -> None:
    add_stats(stats[section], {group: value})


def _descend(state: dict, counts: np.ndarray, offset: int) -> Any:
    """Narrow a pick down by one more 16-bit digit, given the digit's histogram."""
    if state["side"] == "top":
        bin_, before = split(counts, state["need"])
    else:
        reverse, before = split(counts[::-1], state["need"])
        bin_ = len(counts) - 1 - reverse
    prefix = (state["prefix"] << DIGIT) | bin_ if state["step"] else bin_ - offset
    need = state["need"] - before
    if DIGIT * (state["step"] + 1) < state["width"]:
        return {**state, "step": state["step"] + 1, "prefix": prefix, "need": need}
    if state["value"]:
        return {"threshold": prefix, "value": key_value(prefix, state["width"])}
    side = {} if state["side"] == "top" else {"side": state["side"]}
    if need < int(counts[bin_]):
        return {"threshold": prefix, "take": need, "of": state["of"], "step": "ties", **side}
    return {"threshold": prefix, "quota": KEEP_ALL, **side}


def _reduce_ties(total: dict, facts: dict, inputs: MergeInputs | None) -> dict:
    """Hand the ties at the threshold out in (tensor name, block) order."""
    from raymerge.mapping import natural_key  # not at import time: mapping imports methods

    facts = dict(facts)
    for name, counts in total.get("ties", {}).items():
        fact, take = facts[name], facts[name]["take"]
        quota: dict[str, dict[str, int]] = {}
        for tensor, block, count in sorted(counts, key=lambda c: (natural_key(c[0]), c[1])):
            quota.setdefault(tensor, {})[str(block)] = min(count, take)
            take -= min(count, take)
        side = {"side": fact["side"]} if "side" in fact else {}
        facts[name] = {"threshold": fact["threshold"], "quota": quota, **side}
    return facts


def mask(keys: torch.Tensor, fact: Any, inputs: MergeInputs, row_elements: int) -> torch.Tensor:
    """The entries (flat `keys` of the rows held) that a pick's fact keeps."""
    if fact in (KEEP_ALL, KEEP_NONE):
        return torch.full(keys.shape, fact == KEEP_ALL, dtype=torch.bool, device=keys.device)
    threshold, quota = fact["threshold"], fact["quota"]
    keep = keys < threshold if fact.get("side") == "bottom" else keys > threshold
    if quota == KEEP_ALL:
        return keep.logical_or_(keys == threshold)
    mine = quota.get(inputs.name, {})
    for block, lo, hi in inputs.blocks():
        take = mine.get(str(block), 0)
        if take:
            piece = slice(lo * row_elements, hi * row_elements)
            equal = (keys[piece] == threshold).nonzero().squeeze(1)[:take]
            keep[piece][equal] = True
    return keep


def keep_mask(delta: torch.Tensor, fact: Any, inputs: MergeInputs) -> torch.Tensor | None:
    """The entries of the rows held that a TIES group's selection keeps (None: all)."""
    if fact == KEEP_ALL:
        return None
    row_elements = delta.numel() // max(1, delta.shape[0]) if delta.dim() > 1 else 1
    keys = magnitude_bits(delta).reshape(-1)
    return mask(keys, fact, inputs, row_elements).reshape(delta.shape)
