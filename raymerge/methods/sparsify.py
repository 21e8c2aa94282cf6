"""Trimming a task vector: keep the `density` fraction of its entries, chosen per method.

Every choice is deterministic: magnitude ties break by flat index, and random masks come from
the counter-based generator in `random`, on a stream the caller derives from (seed, tensor
name, model position), so they are the same on any worker and any device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from raymerge.lazy import torch
from raymerge.methods import random as rng

RADIX_CHUNK = 1 << 22  # elements per histogram step: 16 MB of int32 temporaries


def keep_count(density: float, numel: int) -> int:
    """mergekit's count: int(density * n) with Python float truncation, at least one."""
    if density >= 1:
        return numel
    if density <= 0 or numel == 0:
        return 0
    return max(1, int(density * numel))


def top_k_mask(magnitude: torch.Tensor, k: int, non_negative: bool = False) -> torch.Tensor:
    """Boolean mask of the k largest entries of a flat tensor; ties go to lower indices.
    `non_negative` promises no negative entries (|x|), which saves a pass."""
    n = magnitude.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=magnitude.device)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=magnitude.device)
    if magnitude.is_cuda:  # kthvalue is slow on CUDA; a stable sort keeps the same tie-break
        order = torch.sort(magnitude, descending=True, stable=True).indices[:k]
        mask = torch.zeros(n, dtype=torch.bool, device=magnitude.device)
        mask[order] = True
        return mask
    if magnitude.dtype == torch.float32:
        keys = magnitude.view(torch.int32) if non_negative else _order_keys(magnitude)
        threshold, ties_over = _radix_select(keys, k, non_negative)
    else:  # the k-th largest value is the (n - k + 1)-th smallest
        keys = magnitude
        threshold = torch.kthvalue(magnitude, n - k + 1).values
        ties_over = int((magnitude >= threshold).sum()) - k
    mask = keys >= threshold
    if ties_over > 0:  # more entries equal the threshold than fit: drop the last ones
        equal = (keys == threshold).nonzero().squeeze(1)
        mask[equal[equal.numel() - ties_over :]] = False
    return mask


KEY_MAX = 0x7FFFFFFF  # the largest fp32 magnitude key (a NaN's)
HIGH_BINS, LOW_BINS = 1 << 15, 1 << 16  # a non-negative int32 key: 15 high bits, 16 low


def magnitude_bits(delta: torch.Tensor) -> torch.Tensor:
    """|delta| as fp32 bit patterns (int32 >= 0, ordered as the magnitudes are; NaNs
    highest), in delta's shape; delta itself is left as it is."""
    wide = delta if delta.dtype == torch.float32 else delta.float()
    return wide.view(torch.int32).bitwise_and(KEY_MAX)


@dataclass(frozen=True)
class TopCut:
    """The k largest keys of a flat tensor as a rule instead of a mask (a mask costs a byte
    per entry, a 70B embedding's a gigabyte): keys above `threshold` are kept, and keys equal
    to it at flat positions below `ties_end` (the lowest positions, as a stable sort would
    keep them)."""

    threshold: int
    ties_end: int

    def mask(self, keys: torch.Tensor, start: int) -> torch.Tensor:
        """Which of `keys` (those of flat positions start, start + 1, ...) are kept."""
        if self.ties_end >= start + keys.numel():
            return keys >= self.threshold
        mask = keys > self.threshold
        if self.ties_end > start:
            head = slice(0, self.ties_end - start)
            mask[head] |= keys[head] == self.threshold
        return mask


KEEP_NOTHING = TopCut(KEY_MAX, 0)
# keys(i, lo, hi): the keys of tensor i's flat positions [lo, hi) as a new tensor (the passes
# of a chunked selection modify it)
ChunkKeys = Callable[[int, int, int], "torch.Tensor"]


def top_k_cuts(keys: ChunkKeys, counts: list[int], numel: int, chunk: int) -> list[TopCut]:
    """For each tensor i (of `numel` keys >= 0, computed chunk by chunk by `keys`), the rule
    that keeps its counts[i] largest keys, ties to the lowest positions: exactly the set
    `top_k_mask` picks, without any full-size temporary. Three passes over the chunks: a
    histogram of the top 15 bits of every key, one of the low 16 bits of the keys in the bin
    where the k-th largest lies, and (only if just some of the keys equal to the threshold
    are kept) a scan for where the kept ones end. Tensors go side by side, so a pass reads a
    chunk of every input while it is in cache."""
    todo = [i for i, k in enumerate(counts) if 0 < k < numel]
    cuts = [TopCut(0, numel) if k >= numel else KEEP_NOTHING for k in counts]
    high = {i: torch.zeros(HIGH_BINS, dtype=torch.int64) for i in todo}
    for lo, hi in _chunks(numel, chunk):
        for i in todo:
            high[i] += torch.bincount(keys(i, lo, hi).bitwise_right_shift_(16), minlength=HIGH_BINS)
    buckets = {i: split(high[i].numpy(), counts[i]) for i in todo}
    low = {i: torch.zeros(LOW_BINS, dtype=torch.int64) for i in todo}
    for lo, hi in _chunks(numel, chunk):
        for i in todo:
            # the bucket's keys land in bins 1..LOW_BINS, every other key in 0 or LOW_BINS + 1
            inside = keys(i, lo, hi).sub_((buckets[i][0] << 16) - 1).clamp_(0, LOW_BINS + 1)
            low[i] += torch.bincount(inside, minlength=LOW_BINS + 2)[1:-1]
    ties = {}
    for i in todo:
        bucket, above = buckets[i]
        value, greater = split(low[i].numpy(), counts[i] - above)
        threshold, take = (bucket << 16) | value, counts[i] - above - greater
        cuts[i] = TopCut(threshold, numel)
        if take < int(low[i][value]):
            ties[i] = take
    for lo, hi in _chunks(numel, chunk):
        if not ties:
            break
        for i, take in list(ties.items()):
            equal = keys(i, lo, hi) == cuts[i].threshold
            count = int(equal.sum())
            if count < take:
                ties[i] = take - count
                continue
            end = lo + int(equal.nonzero()[take - 1]) + 1
            cuts[i] = TopCut(cuts[i].threshold, end)
            del ties[i]
    return cuts


def _chunks(numel: int, chunk: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, numel, chunk):
        yield lo, min(lo + chunk, numel)


def split(histogram: np.ndarray, k: int) -> tuple[int, int]:
    """(bin holding the k-th largest entry, entries in higher bins) of a histogram."""
    from_top = np.cumsum(histogram[::-1])
    index = int(np.searchsorted(from_top, k))  # first position where the count reaches k
    above = int(from_top[index - 1]) if index > 0 else 0
    return len(histogram) - 1 - index, above


def _order_keys(values: torch.Tensor) -> torch.Tensor:
    """int32 keys that sort like the fp32 values: the bit patterns of non-negative floats
    already do; negative ones get their value bits flipped, plus one so -0.0 keys as 0.0
    (done only when there are any)."""
    bits = values.view(torch.int32)
    if int(bits.min()) >= 0:
        return bits
    return torch.where(bits < 0, (bits ^ 0x7FFFFFFF) + 1, bits)


def _radix_select(keys: torch.Tensor, k: int, non_negative: bool) -> tuple[int, int]:
    """The k-th largest int32 key, and how many more entries than k are >= it. Two histogram
    passes (the top 16 bits, then the low 16 inside one bucket) instead of a selection: about
    half the time of kthvalue, and exact."""
    offset = 0 if non_negative else 1 << 15  # arithmetic shift gives -32768..32767: move up
    counts = torch.zeros(1 << 16, dtype=torch.int64)
    for piece in keys.split(RADIX_CHUNK):  # chunks: no full-size temporaries
        high = piece >> 16
        counts += torch.bincount(high.add_(offset) if offset else high, minlength=1 << 16)
    bucket, above = split(counts.numpy(), k)
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for piece in keys.split(RADIX_CHUNK):
        inside = piece[(piece >> 16) == bucket - offset]
        low += torch.bincount(inside & 0xFFFF, minlength=1 << 16)
    value, greater = split(low.numpy(), k - above)
    return ((bucket - offset) << 16) | value, above + greater + int(low[value]) - k


def l1_factor(
    before: torch.Tensor, trimmed: torch.Tensor, eps: float = 1e-7
) -> torch.Tensor | None:
    """The factor that brings the trimmed vector back to the untrimmed one's L1 norm
    `before` (mergekit's `rescale`), or None when either norm is below eps."""
    after = trimmed.abs().sum()
    if before < eps or after < eps:
        return None
    return before / after


def lowest_mask(values: torch.Tensor, r: int) -> torch.Tensor:
    """Boolean mask of the r smallest entries of a flat tensor, ordered by (value, flat index)."""
    n = values.numel()
    if r >= n:
        return torch.ones(n, dtype=torch.bool, device=values.device)
    if r <= 0:
        return torch.zeros(n, dtype=torch.bool, device=values.device)
    threshold = torch.kthvalue(values, r).values
    mask = values < threshold
    missing = r - int(mask.sum())
    if missing > 0:
        mask[torch.nonzero(values == threshold).flatten()[:missing]] = True
    return mask


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs (mergekit's `magnitude_outliers`): drop the int(gamma * n) largest |delta|,
    then the smallest, so that int(density * n) entries remain; outlier removal shrinks when
    both cannot hold. Ranks follow a stable ascending sort: equal |delta| rank by flat index.
    """
    if density >= 1:
        return delta
    n = delta.numel()
    keep = int(density * n) if density > 0 else 0
    bottom = max(0, n - keep - int(gamma * n))
    flat = delta.reshape(-1)
    return (flat * rank_range_mask(flat.abs(), bottom, bottom + keep)).reshape(delta.shape)


def rank_range_mask(values: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """Entries whose rank in ascending (value, flat index) order lies in [low, high).

    Selection on CPUs (linear time), one stable sort on accelerators, where `kthvalue` on a
    large tensor is many times slower; both define the same set.
    """
    if values.device.type == "cpu":
        return lowest_mask(values, high) & ~lowest_mask(values, low)
    mask = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    mask[torch.sort(values, stable=True).indices[max(0, low) : max(0, high)]] = True
    return mask


def bernoulli(delta: torch.Tensor, density: float, stream: int, start: int = 0) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, draw start + i of `stream` for
    entry i (`start`: the flat index of delta's first entry in the whole tensor)."""
    if density >= 1:
        return delta
    return delta * rng.bernoulli_mask(stream, delta.shape, density, delta.device, start=start)


def della_cuts(density: float, epsilon: float, m: int) -> torch.Tensor:
    """Integer Bernoulli cuts by rank in a row of m: p = density - eps + 2 eps (rank / (m - 1)).

    Computed once on the CPU in float64 so every device compares against the same integers;
    a row of one entry gets p = density (mergekit divides by zero there).
    """
    if m > 1:
        rank_norm = torch.arange(m, dtype=torch.float64) / (m - 1)
    else:
        rank_norm = torch.full((1,), 0.5, dtype=torch.float64)
    probs = (rank_norm * 2 * epsilon + (density - epsilon)).clamp(0, 1)
    return torch.ceil(probs * rng.ONE).to(torch.int64)


def della_magprune(
    delta: torch.Tensor, density: float, epsilon: float, stream: int, chunk: int | None = None,
    offset: int = 0,
) -> torch.Tensor:  # fmt: skip
    """DELLA's MagPrune: in each row (along dim 1, as mergekit ranks), keep entry j with a
    probability rising linearly with its |delta| rank, density - eps (smallest) to density +
    eps (largest); rank ties by position in the row. Draws index the row-major row view.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    view = delta.reshape(1, -1) if delta.dim() < 2 else delta.movedim(1, -1)
    m = view.shape[-1]
    rows = view.reshape(-1, m)
    cuts = della_cuts(density, epsilon, m).to(delta.device)
    block = max(1, (chunk or (1 << 18 if delta.device.type == "cpu" else 1 << 22)) // m)
    out = torch.empty_like(rows)
    for start in range(0, rows.shape[0], block):
        part = rows[start : start + block]
        order = torch.sort(part.abs(), dim=1, stable=True).indices
        draws = rng.bits(stream, offset + start * m, part.numel(), delta.device)
        draws = draws.reshape(part.shape)
        # the entry at sorted position j has rank j
        keep = torch.empty_like(order, dtype=torch.bool)
        keep.scatter_(1, order, draws.gather(1, order) < cuts)
        out[start : start + block] = part * keep
    if delta.dim() < 2:
        return out.reshape(delta.shape)
    return out.reshape(view.shape).movedim(-1, 1)
