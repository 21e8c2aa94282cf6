"""Slow, obvious reference merges, written from the specs in docs/methods.md.

Element by element where it matters (trim selection, sign election), in float64 where
arithmetic is involved, so a faster implementation has something independent to agree with.
"""

from __future__ import annotations

import torch


def as_f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def linear(tensors, weights, normalize=True):
    total = sum(w * as_f32(t).double() for t, w in zip(tensors, weights))
    return total / sum(weights) if normalize else total


def keep_count(density: float, n: int) -> int:
    if density >= 1:
        return n
    if density <= 0 or n == 0:
        return 0
    return max(1, int(density * n))


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k largest |delta|; among equal magnitudes the lowest flat index wins."""
    flat = delta.reshape(-1).tolist()
    k = keep_count(density, len(flat))
    order = sorted(range(len(flat)), key=lambda i: (-abs(flat[i]), i))
    keep = set(order[:k])
    return torch.tensor(
        [v if i in keep else 0.0 for i, v in enumerate(flat)], dtype=torch.float64
    ).reshape(delta.shape)


def task_family(
    base, tensors, weights, densities=None, trim=False, elect=False, normalize=False, lam=1.0
):
    """base + lam * combine(w_i * trim(x_i - base)), computed entry by entry."""
    b = as_f32(base)
    deltas = []
    for t, d in zip(tensors, densities or [1.0] * len(tensors)):
        delta = as_f32(t) - b  # same fp32 delta as the fast path: selection must match
        delta = magnitude_trim(delta, d) if trim else delta.double()
        deltas.append(delta.reshape(-1).tolist())
    n = b.numel()
    out = []
    for j in range(n):
        vals = [w * dl[j] for w, dl in zip(weights, deltas)]
        if elect:
            positive = sum(vals) >= 0
            agree = [(v > 0) if positive else (v < 0) for v in vals]
            mixed = sum(v for v, a in zip(vals, agree) if a)
            divisor = sum(w for w, a in zip(weights, agree) if a) or 1.0
        else:
            mixed = sum(vals)
            divisor = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
        if normalize:
            mixed /= divisor
        out.append(mixed * lam)
    return b.double() + torch.tensor(out, dtype=torch.float64).reshape(b.shape)
