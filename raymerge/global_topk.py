"""TIES as the paper trims: each task vector's top-k magnitudes over the whole model.

No single machine holds a 70B task vector, so the exact k-th largest |x - base| of each model
is found by map-reduce over the plan's parts, on the fp32 bit patterns of the magnitudes
(for non-negative floats, bit order is value order):

1. every part returns a histogram of the top 16 bits; the driver finds the bucket holding
   the k-th largest value;
2. a histogram of the low 16 bits inside that bucket gives the exact value T;
3. if only some of the entries equal to T fit in k, every part counts them per tensor, and
   the driver hands them out in the model's flattened order (tensors in name order, then
   flat index): the lowest positions win, as in per-tensor trimming.

So exactly k = int(density * n) entries of each model are kept, where n counts the entries
of every tensor the model contributes to. The merge then keeps |tau| > T, plus the first
`ties` entries equal to T (sparsify.threshold_trim).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch

from raymerge.errors import ConfigError
from raymerge.mapping import natural_key
from raymerge.methods.sparsify import KEEP_ALL, keep_count, split
from raymerge.plan import OutputTensor, Part

HIGH_BINS = 1 << 15  # magnitudes have no sign bit: bits >> 16 < 2^15
LOW_BINS = 1 << 16


def participates(tensor: OutputTensor) -> bool:
    return tensor.op == "merge" and tensor.shared.get("density_scope") == "global"


def magnitude_bits(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|x - base| in fp32, as int32 bit patterns (flat)."""
    return (x.float() - base.float()).abs().view(torch.int32).reshape(-1) & 0x7FFFFFFF


def accumulate(partial: dict, tensor: OutputTensor, inputs: list[torch.Tensor], request: dict):
    """Add one tensor's share of the requested round to `partial` (keyed by input model)."""
    base = inputs[tensor.base]
    for position, source in enumerate(tensor.sources):
        if position == tensor.base:
            continue
        model, bits = source.input, magnitude_bits(inputs[position], base)
        if request["round"] == 1:
            counts = torch.bincount(bits >> 16, minlength=HIGH_BINS)
        elif request["round"] == 2:
            bucket = request["bucket"].get(model)
            if bucket is None:
                continue
            counts = torch.bincount(bits[(bits >> 16) == bucket] & 0xFFFF, minlength=LOW_BINS)
        else:
            value = request["value"].get(model)
            if value is not None:
                partial.setdefault(model, {})[tensor.name] = int((bits == value).sum())
            continue
        counts = counts.cpu().numpy().astype(np.int64)
        partial[model] = partial[model] + counts if model in partial else counts


@dataclasses.dataclass
class ModelTopK:
    total: int = 0
    density: float | None = None
    k: int = 0
    bucket: int | None = None
    above: int = 0
    threshold: float = 0.0
    take: int = KEEP_ALL  # entries equal to the threshold to keep, over the whole model
    ties: dict[str, int] = dataclasses.field(default_factory=dict)


MapParts = Callable[[list[Part], dict], dict]


def thresholds(plan_tensors: list[OutputTensor], map_parts: MapParts, parts: list[Part],
               source: str) -> dict[int, ModelTopK]:  # fmt: skip
    """Each model's exact global threshold; `map_parts(parts, request)` sums partials."""
    models = _models(plan_tensors, source)
    for model in models.values():
        model.k = keep_count(model.density, model.total)
    open_models = {m for m, t in models.items() if 0 < t.k < t.total}
    for m in set(models) - open_models:  # keep none, or all
        models[m].threshold, models[m].take = (float("inf"), 0) if models[m].k == 0 else (-1.0, 0)
    if not open_models:
        return models
    high = map_parts(parts, {"round": 1})
    for m in open_models:
        models[m].bucket, models[m].above = split(high[m], models[m].k)
    low = map_parts(parts, {"round": 2, "bucket": {m: models[m].bucket for m in open_models}})
    tied = {}
    for m in open_models:
        model = models[m]
        value, greater = split(low[m], model.k - model.above)
        bits = (model.bucket << 16) | value
        model.threshold = float(np.array([bits], dtype=np.int32).view(np.float32)[0])
        model.take = model.k - model.above - greater
        if model.take < int(low[m][value]):
            tied[m] = bits
        else:
            model.take = KEEP_ALL
    if tied:
        counts = map_parts(parts, {"round": 3, "value": tied})
        for m in tied:
            models[m].ties = _hand_out(counts[m], models[m].take)
    return models


def _models(plan_tensors: list[OutputTensor], source: str) -> dict[int, ModelTopK]:
    models: dict[int, ModelTopK] = defaultdict(ModelTopK)
    for tensor in plan_tensors:
        if not participates(tensor):
            continue
        for position, src in enumerate(tensor.sources):
            if position == tensor.base:
                continue
            model = models[src.input]
            density = tensor.per_input[position]["density"]
            if model.density is not None and density != model.density:
                raise ConfigError(
                    f"{source}: density_scope: global needs one density per model, but input "
                    f"{src.input} has density {model.density} on some tensors and {density} on "
                    f"{tensor.name!r}; give that model a single density"
                )
            model.density = density
            model.total += int(np.prod(tensor.shape))
    return dict(models)


def _hand_out(counts: dict[str, int], take: int) -> dict[str, int]:
    """Ties at the threshold go to the earliest tensors in name order."""
    ties = {}
    for name in sorted(counts, key=natural_key):
        ties[name] = min(counts[name], take)
        take -= ties[name]
    return ties


def patch(part: Part, models: dict[int, ModelTopK]) -> Part:
    """Give every participating tensor its models' threshold and share of the ties."""
    tensors = []
    for tensor in part.tensors:
        if participates(tensor):
            per_input = list(tensor.per_input)
            for position, src in enumerate(tensor.sources):
                if position != tensor.base:
                    model = models[src.input]
                    ties = model.ties.get(tensor.name, 0) if model.ties else model.take
                    per_input[position] = {
                        **per_input[position],
                        "_threshold": model.threshold,
                        "_ties": ties,
                    }
            tensor = dataclasses.replace(tensor, per_input=tuple(per_input))
        tensors.append(tensor)
    return dataclasses.replace(part, tensors=tuple(tensors))
