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


def l1_rescale(original: list[float], trimmed: list[float]) -> list[float]:
    before = sum(abs(v) for v in original)
    after = sum(abs(v) for v in trimmed)
    if before < 1e-7 or after < 1e-7:
        return trimmed
    return [v * before / after for v in trimmed]


def family(base, tensors, weights, trims, elect, normalize, rescale, lam=1.0):
    """base + lam * combine(w_i * trim_i(x_i - base)), entry by entry in float64.

    trims[i] maps model i's flat fp32 delta (a list) to its trimmed list.
    """
    b = as_f32(base)
    deltas = []
    for tensor, trim in zip(tensors, trims):
        flat = (as_f32(tensor) - b).reshape(-1).tolist()  # fp32 delta, as the fast path
        trimmed = trim(flat)
        deltas.append(l1_rescale(flat, trimmed) if rescale else trimmed)
    out = []
    for j in range(b.numel()):
        vals = [w * d[j] for w, d in zip(weights, deltas)]
        if elect:
            positive = sum(vals) >= 0
            agree = [(v > 0) if positive else (v < 0) for v in vals]
            mixed = sum(v for v, a in zip(vals, agree) if a)
            divisor = sum(w for w, a in zip(weights, agree) if a) or 1.0
        else:
            mixed = sum(vals)
            divisor = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
        out.append((mixed / divisor if normalize else mixed) * lam)
    return b.double() + torch.tensor(out, dtype=torch.float64).reshape(b.shape)


def task_family(
    base, tensors, weights, densities=None, trim=False, elect=False, normalize=False, lam=1.0
):
    """base + lam * combine(w_i * topk(x_i - base)), entry by entry (topk when `trim`)."""
    densities = densities or [1.0] * len(tensors)
    trims = [magnitude_trim_list(d) if trim else list for d in densities]
    return family(base, tensors, weights, trims, elect, normalize, rescale=False, lam=lam)


def magnitude_trim_list(density: float):
    """Keep the k largest |v| of a flat list; among equal magnitudes the lowest index wins."""

    def trim(flat: list[float]) -> list[float]:
        k = keep_count(density, len(flat))
        order = sorted(range(len(flat)), key=lambda i: (-abs(flat[i]), i))
        keep = set(order[:k])
        return [v if i in keep else 0.0 for i, v in enumerate(flat)]

    return trim
