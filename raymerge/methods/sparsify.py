"""Trimming a task vector: keep the `density` fraction of its entries, chosen per method.

Every choice is deterministic: magnitude ties break toward the lowest flat index, and random
masks come from a generator seeded by the caller (from the seed and the tensor name).
"""

from __future__ import annotations

import torch


def keep_count(density: float, numel: int) -> int:
    """mergekit's count: int(density * n) with Python float truncation, at least one."""
    if density >= 1:
        return numel
    if density <= 0 or numel == 0:
        return 0
    return max(1, int(density * numel))


def top_k_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of a flat tensor; ties go to lower indices."""
    n = magnitude.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=magnitude.device)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=magnitude.device)
    # the k-th largest value is the (n - k + 1)-th smallest
    threshold = torch.kthvalue(magnitude, n - k + 1).values
    mask = magnitude > threshold
    missing = k - int(mask.sum())
    if missing > 0:
        at_threshold = magnitude == threshold
        mask |= at_threshold & (torch.cumsum(at_threshold, 0) <= missing)
    return mask


def magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = int(density * n) largest-magnitude entries (mergekit's `magnitude`)."""
    k = keep_count(density, delta.numel())
    if k == delta.numel():
        return delta
    flat = delta.reshape(-1)
    mask = top_k_mask(flat.abs(), k)
    return (flat * mask).reshape(delta.shape)


def l1_rescale(original: torch.Tensor, trimmed: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale the trimmed vector back to the original's L1 norm (mergekit's `rescale`)."""
    before = original.abs().sum()
    after = trimmed.abs().sum()
    if before < eps or after < eps:
        return trimmed
    return trimmed * (before / after)
