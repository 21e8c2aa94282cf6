"""The task-vector family: theta = base + lambda * combine_i(trim(x_i - base) * w_i).

One implementation, several registered names (mergekit's generalized task arithmetic): each
name only fixes the trim, whether signs are elected, and the defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from raymerge.methods import sparsify
from raymerge.methods.base import MergeInputs, MergeMethod, Param, compute_dtype

CPU_CHUNK = 1 << 16  # elements per chunk: the chunk's scratch stays in cache

# trim(delta, this model's parameters, inputs, the model's position among the inputs)
# -> the trimmed delta (may be `delta` itself)
Trim = Callable[[torch.Tensor, dict[str, Any], MergeInputs, int], torch.Tensor]


def trim_magnitude(
    delta: torch.Tensor, params: dict[str, Any], inputs: MergeInputs, position: int
) -> torch.Tensor:
    return sparsify.magnitude(delta, params["density"])


def merge(inputs: MergeInputs, trim: Trim | None, elect_sign: bool) -> torch.Tensor:
    base = inputs.base
    dtype = compute_dtype(base)
    base = base.to(dtype)
    others = inputs.others()
    if not others:
        return base
    weights = [params["weight"] for _, _, params in others]
    deltas = []
    for position, tensor, params in others:
        delta = torch.sub(tensor, base)  # mixed dtypes promote in one pass, no fp32 copy
        if trim is not None:
            trimmed = trim(delta, params, inputs, position)
            if inputs.shared["rescale"]:
                trimmed = sparsify.l1_rescale(delta, trimmed)
            delta = trimmed
        deltas.append(delta.mul_(params["weight"]))

    if elect_sign:
        mixed, divisor = _sum_agreeing(deltas, weights)
    else:
        mixed = _sum(deltas)
        divisor = sum(weights)
        if abs(divisor) < 1e-8:
            divisor = 1.0
    if inputs.shared["normalize"]:
        mixed.div_(divisor)
    if inputs.shared["lambda"] != 1:
        mixed.mul_(inputs.shared["lambda"])
    return mixed.add_(base)


def _sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total.add_(tensor)
    return total


def _sum_agreeing(
    deltas: list[torch.Tensor], weights: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES sign election by summed mass (a zero sum elects +), then the agreeing sum.

    Elementwise, so done in cache-sized chunks on CPUs (about twice as fast)."""
    flat = [d.reshape(-1) for d in deltas]
    mixed = torch.empty_like(flat[0])
    divisor = torch.empty_like(flat[0])
    step = CPU_CHUNK if flat[0].device.type == "cpu" else flat[0].numel()
    for lo in range(0, flat[0].numel(), max(step, 1)):
        chunk = [f[lo : lo + step] for f in flat]
        positive = _sum(chunk) >= 0
        out, den = mixed[lo : lo + step], divisor[lo : lo + step]
        out.zero_()
        den.zero_()
        for delta, weight in zip(chunk, weights):
            agrees = torch.where(positive, delta > 0, delta < 0)
            out.add_(delta * agrees)
            den.add_(agrees, alpha=weight)
    divisor[divisor == 0] = 1
    return mixed.reshape(deltas[0].shape), divisor.reshape(deltas[0].shape)


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
        Param(
            "int8_mask",
            bool,
            "shared",
            default=False,
            help="accepted for mergekit configs; memory only, no effect here",
        ),
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

    return MergeMethod(
        name=name,
        merge=merge_fn,
        params=family_params(default_normalize, default_rescale) + extra,
        base="required",
        summary=summary,
        elementwise=trim is None and not elect_sign,
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
