"""The task-vector family: theta = base + lambda * combine_i(trim(x_i - base) * w_i).

One implementation, several registered names (mergekit's generalized task arithmetic): each
name only fixes the trim, whether signs are elected, and the defaults.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from raymerge.lazy import torch
from raymerge.methods.base import (
    CPU_CHUNK,
    SUM_CHUNK,
    FactRound,
    Locality,
    MergeInputs,
    MergeMethod,
    Param,
    compute_dtype,
    float_sum,
    rows_of,
)  # fmt: skip
from raymerge.methods.sparsify import TopCut, magnitude_bits

# apply(delta, this model's parameters, inputs, the model's position among the inputs)
# -> the trimmed delta, or the boolean mask of the entries kept (None: all), which saves
# two passes over the tensor. A trim may write into `delta` only without `rescale` (then
# nothing reads it afterwards: the combine starts from the inputs). With `inputs.facts` None
# the rows held are the whole tensor (a trim may select over them directly); otherwise the
# trim's rounds have gathered what it needs of the whole tensor into the facts.
TrimFn = Callable[["torch.Tensor", dict[str, Any], MergeInputs, int], "torch.Tensor | None"]
# cuts(inputs, others, compute dtype) -> per non-base input, None (keep all) or the rule
# (sparsify.TopCut) that says what its trim keeps, found chunk by chunk: a whole tensor's
# trim on a CPU without a full-size task vector or mask
CutsFn = Callable[[MergeInputs, list, "torch.dtype"], list]
L1_EPS = 1e-7


@dataclass(frozen=True)
class Trim:
    """How one family member trims a task vector: what one call needs to see (`locality`),
    the fact rounds that select entries over a split tensor (or a model) first, and
    optionally the same selection as rules found chunk by chunk (`cuts`)."""

    apply: TrimFn
    locality: Locality
    rounds: Callable[[dict[str, Any]], tuple[FactRound, ...]] | None = None
    cuts: CutsFn | None = None


def merge(inputs: MergeInputs, trim: Trim | None, elect_sign: bool) -> torch.Tensor:
    base = inputs.base
    dtype = compute_dtype(base)
    others = inputs.others()
    if not others:
        return base.to(dtype)
    if trim is not None and trim.cuts is not None and inputs.facts is None and (
        base.device.type == "cpu"
    ):
        masks = trim.cuts(inputs, others, dtype)
        factors = [None] * len(others)
        if inputs.shared.get("rescale"):
            factors = [_cut_factor(inputs, tensor, cut, dtype)
                       for (_, tensor, _), cut in zip(others, masks)]  # fmt: skip
        return _combine(inputs, others, masks, factors, elect_sign, dtype)
    # one model at a time: what its trim keeps, and its rescale factor
    masks, factors = [], []
    for position, tensor, params in others:
        mask, factor = None, None
        if trim is not None:
            delta = tensor.to(dtype, copy=True).sub_(base)  # mixed dtypes: no fp32 base copy
            kept = trim.apply(delta, params, inputs, position)
            mask = kept if kept is None or kept.dtype == torch.bool else kept != 0
            if inputs.shared.get("rescale"):
                factor = _factor(inputs, delta, kept, f"{inputs.name}|{position}")
            del delta, kept
        masks.append(mask)
        factors.append(factor)
    return _combine(inputs, others, masks, factors, elect_sign, dtype)


def _factor(inputs: MergeInputs, delta, kept, group: str) -> float | None:
    """The L1 rescale factor: gathered by the rescale round for a split tensor, computed
    here from the same per-block sums for a whole one (so both give the same bits)."""
    if inputs.facts is not None:
        return inputs.facts[f"rescale {group}"]
    before, after = [], []
    for _, lo, hi in inputs.blocks():
        b, a = _block_l1(delta[lo:hi], None if kept is None else kept[lo:hi])
        before.append(b)
        after.append(a)
    return _ratio(before, after)


def _cut_factor(inputs: MergeInputs, tensor, cut: TopCut | None, dtype) -> float | None:
    """`_factor` for a trim given as a rule: the same per-block sums, SUM_CHUNK elements at
    a time from each block's start, as float_sum adds them up (so the same bits)."""
    if cut is None:
        return None
    model, base = tensor.reshape(-1), inputs.base.reshape(-1)
    width = rows_of(inputs.full_shape)[1]
    before, after = [], []
    for _, lo, hi in inputs.blocks():
        total_before = total_after = 0.0
        for start in range(lo * width, min(hi * width, model.numel()), SUM_CHUNK):
            end = min(start + SUM_CHUNK, hi * width, model.numel())
            delta = trim_delta(model[start:end], base[start:end].to(dtype))
            magnitude = delta.abs()
            total_before += float(magnitude.sum(dtype=torch.float64))
            kept = magnitude * cut.mask(magnitude_bits(delta), start)
            total_after += float(kept.sum(dtype=torch.float64))
        before.append(total_before)
        after.append(total_after)
    return _ratio(before, after)


def trim_delta(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """model - base as a trim sees it: the model first brought to base's (compute) dtype."""
    if torch.promote_types(model.dtype, base.dtype) != base.dtype:
        model = model.to(base.dtype)
    return torch.sub(model, base)


def _block_l1(delta, kept) -> tuple[float, float]:
    """sum |delta| and sum |trimmed delta| over one block, in float64."""
    before = float_sum(delta.abs())
    if kept is None:
        return before, before
    if kept.dtype == torch.bool:
        return before, float_sum(delta.abs() * kept)
    return before, float_sum(kept.abs())


def _ratio(before: list[float], after: list[float]) -> float | None:
    total_before, total_after = math.fsum(before), math.fsum(after)
    if total_before < L1_EPS or total_after < L1_EPS:
        return None
    return total_before / total_after


def family_rounds(trim: Trim, shared: dict[str, Any]) -> tuple[FactRound, ...]:
    """For a split tensor: the trim's selection rounds, then (with `rescale`) one round for
    the L1 norms of each task vector before and after trimming."""
    rounds = trim.rounds(shared) if trim.rounds is not None else ()
    if shared.get("rescale"):
        rounds += (FactRound(_l1_block(trim), _l1_reduce),)
    return rounds


def _l1_block(trim: Trim):
    def block(inputs: MergeInputs, facts: dict) -> dict:
        inputs = dataclasses.replace(inputs, facts=facts)
        dtype = compute_dtype(inputs.base)
        stats: dict = {}
        for position, tensor, params in inputs.others():
            delta = tensor.to(dtype, copy=True).sub_(inputs.base)
            before, after = _block_l1(delta, trim.apply(delta, params, inputs, position))
            stats[f"l1 {inputs.name}|{position}"] = [before]
            stats[f"kept {inputs.name}|{position}"] = [after]
        return stats

    return block


def _l1_reduce(total: dict, facts: dict, inputs: MergeInputs) -> dict:
    facts = dict(facts)
    for key, values in total.items():
        if key.startswith("l1 "):
            group = key[3:]
            facts[f"rescale {group}"] = _ratio(values, total[f"kept {group}"])
    return facts


def _combine(
    inputs: MergeInputs, others: list, masks: list, factors: list, elect_sign: bool,
    dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """base + lambda * (sign-agreeing or plain) sum of w_i * trimmed task vectors, computed
    in cache-sized chunks on CPUs from the inputs and the trim masks: no full-size fp32
    copies of the task vectors."""
    base = inputs.base.reshape(-1)
    weights = [params["weight"] for _, _, params in others]
    models = [tensor.reshape(-1) for _, tensor, _ in others]
    flat_masks = [m if m is None or isinstance(m, TopCut) else m.reshape(-1) for m in masks]
    normalize, lam = inputs.shared["normalize"], inputs.shared["lambda"]
    out = torch.empty(base.shape, dtype=dtype, device=base.device)
    step = CPU_CHUNK if base.device.type == "cpu" else max(base.numel(), 1)
    for lo in range(0, base.numel(), step):
        b = base[lo : lo + step].to(dtype)
        deltas = []
        for model, mask, factor, weight in zip(models, flat_masks, factors, weights):
            piece = model[lo : lo + step]
            delta = torch.sub(piece, b)  # a new fp32 tensor, never the input
            keep = None if mask is None else _kept(mask, piece, delta, b, lo)
            if factor is not None:
                delta.mul_(factor)
            delta.mul_(weight)
            deltas.append(delta if keep is None else delta.mul_(keep))
        if elect_sign:
            mixed = _sum_agreeing(deltas, weights, normalize)
        else:
            mixed = _sum(deltas)
            if normalize:
                divisor = sum(weights)
                mixed.div_(divisor if abs(divisor) >= 1e-8 else 1.0)
        if lam != 1:
            mixed.mul_(lam)
        out[lo : lo + step] = mixed.add_(b)
    return out.reshape(inputs.base.shape)


def _kept(mask, piece: torch.Tensor, delta: torch.Tensor, base: torch.Tensor, lo: int):
    """The chunk's kept entries: a slice of a mask, or what a TopCut keeps of the trim's
    magnitudes (from `delta`, unless the model's dtype made it wider than the trim's)."""
    if not isinstance(mask, TopCut):
        return mask[lo : lo + piece.numel()]
    trimmed = delta if delta.dtype == base.dtype else trim_delta(piece, base)
    return mask.mask(magnitude_bits(trimmed), lo)


def _sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors added in order, into a new tensor."""
    if len(tensors) == 1:
        return tensors[0].clone()
    total = torch.add(tensors[0], tensors[1])
    for tensor in tensors[2:]:
        total.add_(tensor)
    return total


def _sum_agreeing(
    deltas: list[torch.Tensor], weights: list[float], normalize: bool
) -> torch.Tensor:
    """TIES sign election by summed mass (a zero sum elects +), then the sum of the agreeing
    entries, divided by their weights' sum (1 where none agree) when normalizing.

    With s = +1 or -1 the elected sign, the agreeing sum is s * sum_i relu(s * d_i): three
    cheap ops per model instead of a select."""
    sign = torch.where(_sum(deltas) >= 0, 1.0, -1.0).to(deltas[0].dtype)
    mixed = torch.zeros_like(deltas[0])
    divisor = torch.zeros_like(deltas[0]) if normalize else None
    for delta, weight in zip(deltas, weights):
        aligned = delta.mul_(sign)  # the caller's scratch: safe to overwrite
        if divisor is not None:
            divisor.add_(aligned > 0, alpha=weight)
        mixed.add_(aligned.clamp_min_(0))
    mixed.mul_(sign)
    if divisor is not None:
        mixed.div_(divisor.masked_fill_(divisor == 0, 1))
    return mixed


INT8_MASK = Param(
    "int8_mask", bool, "shared", default=False,
    help="accepted for mergekit configs; memory only, no effect here",
)  # fmt: skip


def family_params(default_normalize: bool, default_rescale: bool) -> tuple[Param, ...]:
    return (
        Param("weight", float, "non_base", help="this model's weight"),
        Param(
            "density",
            float,
            "non_base",
            default=1.0,
            low=0.0,
            high=1.0,
            help="fraction of the task vector kept",
        ),
        Param(
            "normalize",
            bool,
            "shared",
            default=default_normalize,
            help="divide by the sum of (agreeing) weights",
        ),
        Param(
            "rescale",
            bool,
            "shared",
            default=default_rescale,
            help="rescale a trimmed task vector to its original L1 norm",
        ),
        Param("lambda", float, "shared", default=1.0, help="scale of the merged task vector"),
        INT8_MASK,
    )


def make(
    name: str,
    summary: str,
    trim: Trim | None,
    elect_sign: bool,
    default_normalize: bool,
    default_rescale: bool,
    extra: tuple[Param, ...] = (),
) -> MergeMethod:
    def merge_fn(inputs: MergeInputs) -> torch.Tensor:
        return merge(inputs, trim, elect_sign)

    rounds = None  # a trim that needs the whole tensor and has no rounds cannot be split
    if trim is not None and (trim.rounds is not None or trim.locality != "tensor"):

        def rounds(shared: dict[str, Any]) -> tuple[FactRound, ...]:
            return family_rounds(trim, shared)

    return MergeMethod(
        name=name,
        merge=merge_fn,
        params=family_params(default_normalize, default_rescale) + extra,
        base="required",
        summary=summary,
        locality="elementwise" if trim is None else trim.locality,
        rounds=rounds,
        # one model at a time: its fp32 delta and |delta| (or trimmed copy), plus every
        # model's boolean mask (a quarter word each); the combine runs in small chunks
        scratch=None if trim is None else (lambda n: 3 + n / 4),
    )


METHODS = (
    make(
        "task_arithmetic",
        "base + lambda * sum(w_i (x_i - base))",
        trim=None,
        elect_sign=False,
        default_normalize=False,
        default_rescale=False,
    ),
)
