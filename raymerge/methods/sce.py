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
"""

from __future__ import annotations

from raymerge.lazy import torch
from raymerge.methods import sparsify, task_arithmetic
from raymerge.methods.base import MergeInputs, MergeMethod, Param


def merge(inputs: MergeInputs) -> torch.Tensor:
    base, deltas = inputs.task_vectors()
    if not deltas:
        return base
    select_topk = inputs.shared["select_topk"]
    if select_topk < 1:
        mask = select_mask(deltas, select_topk)
        deltas = [delta.mul_(mask) for delta in deltas]

    weights = energy_weights(deltas)
    positive = _total(deltas) >= 0
    merged = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for delta, weight in zip(deltas, weights):
        agrees = torch.where(positive, delta > 0, delta < 0)
        merged.add_(delta * agrees, alpha=weight)
        divisor.add_(agrees, alpha=weight)
    return merged.div_(divisor.clamp_(min=1e-6)).add_(base)


def select_mask(deltas: list[torch.Tensor], select_topk: float) -> torch.Tensor:
    """The entries of largest variance across models; ties go to the lowest flat index."""
    if select_topk <= 0:
        return torch.zeros_like(deltas[0], dtype=torch.bool)
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
    # mergekit's int(count_nonzero(var) * select_topk): an int64 tensor times a float is float32
    k = int(torch.tensor(int(varies.sum()), dtype=torch.float32) * select_topk)
    # entries that do not vary rank below all others, so the k picked always vary
    magnitude = torch.where(varies, variance, -1.0).reshape(-1)
    return sparsify.top_k_mask(magnitude, k).reshape(mean.shape)


def energy_weights(deltas: list[torch.Tensor]) -> list[float]:
    """Each model's share of the mean squared task vector; uniform when all are (near) zero."""
    energies = [float(delta.square().mean()) for delta in deltas]
    total = sum(energies)
    if abs(total) < 1e-6:
        return [1.0 / len(deltas)] * len(deltas)
    return [energy / total for energy in energies]


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
    ),
)
