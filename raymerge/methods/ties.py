"""TIES: trim each task vector to its top-k magnitudes, elect a sign per entry by summed
mass, and average only the entries that agree with it (Yadav et al., 2023).

`density_scope: tensor` (the default) trims per tensor, as mergekit does, keeping exactly
k = int(density * n) entries; magnitude ties break toward the lowest flat index so output
never depends on sort order. `density_scope: global` trims over the whole model as the paper
does: a prepare step (raymerge/global_topk.py) finds each model's exact threshold first.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from raymerge.lazy import torch
from raymerge.methods import selection, sparsify, task_arithmetic
from raymerge.methods.base import CPU_CHUNK, FactRound, MergeInputs, Param


def _group_of(shared: dict[str, Any]) -> selection.GroupOf:
    if shared["density_scope"] == "global":
        return selection.model_group
    return selection.tensor_group


def magnitude_trim(
    delta: torch.Tensor, params: dict[str, Any], inputs: MergeInputs, position: int
) -> torch.Tensor | None:
    """The entries of the k = int(density * n) largest magnitudes of the group (the tensor,
    or the model's whole task vector), as found by the selection rounds."""
    if params["density"] >= 1:
        return None
    if inputs.facts is None:  # the whole tensor is here: select over it at once
        # fp32 magnitudes, as the rounds see them; without rescale nothing reads delta
        # again (the combine starts from the inputs), so |delta| may take its place
        rescale = inputs.shared.get("rescale") or delta.dtype != torch.float32
        magnitude = (delta.float().abs() if rescale else delta.abs_()).reshape(-1)
        k = sparsify.keep_count(params["density"], magnitude.numel())
        return sparsify.top_k_mask(magnitude, k, non_negative=True).reshape(delta.shape)
    group = _group_of(inputs.shared)(inputs, position)
    return selection.keep_mask(delta, inputs.facts[group], inputs)


def magnitude_cuts(inputs: MergeInputs, others: list, dtype: torch.dtype) -> list:
    """magnitude_trim's selection over a whole tensor, as rules found chunk by chunk
    (sparsify.top_k_cuts): what it keeps, without a task vector or mask of full size."""
    base = inputs.base.reshape(-1)
    models = [tensor.reshape(-1) for _, tensor, _ in others]
    counts = [sparsify.keep_count(params["density"], base.numel()) for _, _, params in others]
    chunk: dict[tuple[int, int], torch.Tensor] = {}  # the base's chunk, shared by the models

    def keys(i: int, lo: int, hi: int) -> torch.Tensor:
        if (lo, hi) not in chunk:
            chunk.clear()
            chunk[lo, hi] = base[lo:hi].to(dtype)
        delta = task_arithmetic.trim_delta(models[i][lo:hi], chunk[lo, hi])
        return sparsify.magnitude_bits(delta)

    cuts = sparsify.top_k_cuts(keys, counts, base.numel(), CPU_CHUNK)
    return [None if params["density"] >= 1 else cut for (_, _, params), cut in zip(others, cuts)]


def magnitude_rounds(shared: dict[str, Any]) -> tuple[FactRound, ...]:
    return selection.rounds(_group_of(shared))


MAGNITUDE = task_arithmetic.Trim(magnitude_trim, "tensor", magnitude_rounds, magnitude_cuts)


def spans_model(shared: dict[str, Any]) -> bool:
    return shared["density_scope"] == "global"


def one_density_per_model(tensors: list[tuple[tuple[int, ...], dict, tuple[dict, ...]]]):
    """density_scope: global selects over a model's whole task vector: one density each."""
    seen: dict[int, float] = {}
    for models, shared, per_input in tensors:
        if not spans_model(shared):
            continue
        for model, params in zip(models, per_input):
            density = params.get("density")
            if density is None:
                continue  # the base
            if seen.setdefault(model, density) != density:
                return (
                    f"density_scope: global needs one density per model, but input {model} "
                    f"has density {seen[model]} on some tensors and {density} on others; give "
                    "that model a single density"
                )
    return None


DENSITY_SCOPE = Param(
    "density_scope", str, "shared", default="tensor", choices=("tensor", "global"),
    help="trim each tensor (mergekit) or each model's whole task vector (the TIES paper)",
)  # fmt: skip

METHODS = (
    task_arithmetic.make(
        "ties",
        "base + lambda * disjoint_mean_i(topk(w_i (x_i - base)))",
        trim=MAGNITUDE,
        elect_sign=True,
        default_normalize=True,
        default_rescale=False,
        extra=(DENSITY_SCOPE,),
    ),
)
METHODS = (
    dataclasses.replace(METHODS[0], whole_model=spans_model, check_plan=one_density_per_model),
)
