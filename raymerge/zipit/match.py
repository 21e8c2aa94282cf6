"""Feature matching for ZipIt (Stoica et al., ICLR 2024) and its "permute" baseline.

Pure numpy/scipy: the reference. Workers match with match_torch.py (the same arithmetic in
torch, on their device); the tests hold the two to the same bits.

The features of N models are concatenated: model m's n features are indices m*n .. (m+1)*n-1
of a vector of length F = N*n. Statistics arrive as (count, total, outer) sums over tokens.

Cluster ids (`zip_clusters`, `permute_clusters`) give, for each of the F original features,
the id 0..n-1 of its merged feature; clusters are numbered in increasing order of their
smallest member, so model 0's features keep their positions whenever each cluster holds one
of them. (benchmarks/zipit_layer_timing.py times them at Llama-3-8B width.)
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

_STD_FLOOR = 1e-7
_CHUNK_ELEMENTS = 1 << 22  # bounds the temporaries of row-chunked work to ~32 MB

# ----------------------------------------------------------------------------- correlation


def correlation(count: int, total: np.ndarray, outer: np.ndarray) -> np.ndarray:
    """Pearson correlation from token sums; constant features get 0, not NaN.

    Works on the [F, F] matrix in row chunks so that only one full-size array is allocated.
    """
    if count <= 0:
        raise ValueError(f"correlation needs a positive token count, got {count}")
    total = np.asarray(total, dtype=np.float64)
    outer = np.asarray(outer, dtype=np.float64)
    size = total.shape[0]
    if outer.shape != (size, size):
        raise ValueError(f"outer has shape {outer.shape}, expected {(size, size)}")
    mean = total / count
    var = np.diagonal(outer) / count - mean * mean
    std = np.sqrt(np.clip(var, 0.0, None))
    corr = np.divide(outer, count)
    for rows in _row_chunks(size, size):
        block = corr[rows]
        block -= mean[rows, None] * mean[None, :]
        block /= np.maximum(std[rows, None] * std[None, :], _STD_FLOOR)
    return corr


def _row_chunks(rows: int, width: int) -> list[slice]:
    """Slices of rows whose blocks hold about `_CHUNK_ELEMENTS` entries."""
    step = max(1, _CHUNK_ELEMENTS // max(width, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


# ----------------------------------------------------------------------------- zip


def zip_clusters(corr: np.ndarray, models: int, alpha: float, beta: float,
                 overwrite: bool = False) -> np.ndarray:  # fmt: skip
    """ZipIt's greedy matching: merge the most correlated pair of clusters until n remain.

    Follows the official algorithm exactly (same float64 arithmetic and tie-breaking):
    the pair is the first maximum in row-major order over distinct live clusters; merging j
    into i (i < j) sets the similarity of i to every other cluster k to
    alpha * min(S[i, k], S[j, k]); the merged cluster keeps i's model label; a merge of two
    clusters of the same label L spends one of L's budget of int((F - n) // N * beta) and,
    once that is spent, forbids further merges between clusters labelled L. NaN similarities
    are treated as -inf. If every remaining pair is -inf (the official code would then merge
    a cluster with itself), the first pair in row-major order with different labels merges;
    one always exists while more than n clusters live, since a label has at most n clusters.

    Only the upper triangle of `corr` is read: it is mirrored, as sums accumulated on a GPU
    need not be exactly symmetric. Instead of rescanning the whole matrix each step it keeps
    each row's maximum and first argmax, so a step costs O(F) plus the rows whose maximum was
    lost. Memory: one float64 copy of `corr`, updated in place; with `overwrite` (a C-order
    float64 `corr` the caller gives up) none: the zip works in `corr` itself.
    """
    size = _check_zip_args(corr, models, alpha, beta)
    n = size // models
    if overwrite and not (corr.dtype == np.float64 and corr.flags.c_contiguous
                          and corr.flags.writeable):  # fmt: skip
        raise ValueError("overwrite needs a writable C-order float64 matrix")
    sim = _similarity(corr if overwrite else np.array(corr, dtype=np.float64, copy=True))
    label = np.arange(size) // n
    budget = np.full(models, int((size - n) // models * beta), dtype=np.int64)
    state = _ZipState(sim, alpha, label)
    for _ in range(size - n):
        i, j = state.best_pair()
        state.merge(i, j)
        if label[i] == label[j]:
            budget[label[i]] -= 1
            if budget[label[i]] <= 0:
                state.forbid(np.flatnonzero(state.live & (label == label[i])))
    return _ids_from_parent(state.parent)


def _check_zip_args(corr: np.ndarray, models: int, alpha: float, beta: float) -> int:
    """Validate the arguments and return F; alpha <= 0 breaks the official code for N > 2."""
    size = _check_square(corr, models)
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    return size


def _check_square(corr: np.ndarray, models: int) -> int:
    """Validate a non-empty square [F, F] matrix with F divisible by `models` >= 2."""
    if models < 2:
        raise ValueError(f"matching needs at least 2 models, got {models}")
    if corr.ndim != 2 or corr.shape[0] != corr.shape[1] or corr.shape[0] == 0:
        raise ValueError(f"expected a non-empty square matrix, got shape {corr.shape}")
    if corr.shape[0] % models:
        raise ValueError(f"{corr.shape[0]} features do not split into {models} models")
    return corr.shape[0]


def _similarity(sim: np.ndarray) -> np.ndarray:
    """The working matrix, in place: exactly symmetric, NaN -> -inf, diagonal -inf."""
    _mirror_upper(sim)
    for rows in _row_chunks(sim.shape[0], sim.shape[1]):
        block = sim[rows]
        block[np.isnan(block)] = -np.inf
    np.fill_diagonal(sim, -np.inf)
    return sim


def _mirror_upper(sim: np.ndarray) -> None:
    """Copy the upper triangle onto the lower one in place, in row blocks.

    Sums accumulated on a GPU need not be bit-symmetric; the greedy search relies on it.
    """
    for rows in _row_chunks(sim.shape[0], sim.shape[1]):
        square = sim[rows, rows]
        below = np.tri(square.shape[0], k=-1, dtype=bool)
        square[below] = square.T[below]
        sim[rows.stop :, rows] = sim[rows, rows.stop :].T


def _ids_from_parent(parent: np.ndarray) -> np.ndarray:
    """Cluster ids from the merge forest, numbered by smallest member.

    parent[j] = i records that j was merged into i < j, so each root is its cluster's
    smallest index; pointer doubling finds every feature's root.
    """
    root = parent.copy()
    while True:
        nxt = root[root]
        if np.array_equal(nxt, root):
            break
        root = nxt
    return np.searchsorted(np.unique(root), root).astype(np.int64)


class _ZipState:
    """The similarity matrix over clusters plus each row's maximum and first argmax.

    Dead clusters keep their (stale) rows and columns in `sim`; every read masks them with
    `live`, which saves the strided writes of clearing a column per merge. The invariant:
    for every live row k, `row_max[k]` is the maximum of sim[k, c] over live c != k and, when
    that is finite, `row_arg[k]` is the first such c attaining it. Dead rows have -inf.
    An all -inf row needs no argmax: no value can drop below its maximum, and any finite value
    written into it beats it.
    """

    def __init__(self, sim: np.ndarray, alpha: float, label: np.ndarray) -> None:
        size = sim.shape[0]
        self.sim = sim
        self.alpha = alpha
        self.label = label
        self.live = np.ones(size, dtype=bool)
        self.parent = np.arange(size)
        self.row_max = np.empty(size)
        self.row_arg = np.empty(size, dtype=np.int64)
        self._new = np.empty(size)
        self._refresh(np.arange(size))

    def best_pair(self) -> tuple[int, int]:
        """The first maximum in row-major order over distinct live clusters (i < j)."""
        i = int(np.argmax(self.row_max))
        if self.row_max[i] == -np.inf:
            return self._first_cross_pair()
        j = int(self.row_arg[i])
        return min(i, j), max(i, j)

    def _first_cross_pair(self) -> tuple[int, int]:
        """The first live pair in row-major order whose labels differ."""
        i = int(np.flatnonzero(self.live)[0])
        j = int(np.flatnonzero(self.live & (self.label != self.label[i]))[0])
        return i, j

    def merge(self, i: int, j: int) -> None:
        """Merge cluster j into cluster i and restore the row-maximum invariant."""
        self.live[j] = False
        self.row_max[j] = -np.inf
        self.parent[j] = i
        new = self._merged_row(i, j)
        self.sim[i, :] = new
        self.sim[:, i] = new
        lost = self._update_column(i, j, new)
        self.row_arg[i] = np.argmax(new)
        self.row_max[i] = new[self.row_arg[i]]
        self._refresh(lost)

    def forbid(self, members: np.ndarray) -> None:
        """Set -inf between every pair of `members` (a spent label) and refresh their rows."""
        step = max(1, _CHUNK_ELEMENTS // max(len(members), 1))
        for start in range(0, len(members), step):
            rows = members[start : start + step]
            self.sim[rows[:, None], members[None, :]] = -np.inf
        self._refresh(members)

    def _merged_row(self, i: int, j: int) -> np.ndarray:
        """alpha * min(S[i], S[j]), -inf at dead clusters and at i itself."""
        new = np.minimum(self.sim[i], self.sim[j], out=self._new)
        new *= self.alpha
        new[~self.live] = -np.inf
        new[i] = -np.inf
        return new

    def _update_column(self, i: int, j: int, new: np.ndarray) -> np.ndarray:
        """Fold the new column i into every row's maximum; return rows that must be rescanned.

        A row whose argmax was i or j keeps a valid maximum only if the new value is not lower
        (then i is its first maximum); otherwise its maximum is unknown. Any other row takes i
        if the new value beats its maximum, or ties it with i earlier than its argmax.
        """
        row_max, row_arg = self.row_max, self.row_arg
        hit = (row_arg == i) | (row_arg == j)
        better = (new > row_max) | ((new == row_max) & (i < row_arg))
        take = np.where(hit, new >= row_max, better) & self.live
        row_max[take] = new[take]
        row_arg[take] = i
        lost = hit & ~take & self.live
        lost[i] = False
        return np.flatnonzero(lost)

    def _refresh(self, rows: np.ndarray) -> None:
        """Rescan `rows` (live ones) for their maximum over live columns."""
        rows = rows[self.live[rows]]
        if rows.size == 0:
            return
        dead = ~self.live[None, :]
        step = max(1, _CHUNK_ELEMENTS // self.sim.shape[1])
        for start in range(0, rows.size, step):
            chunk = rows[start : start + step]
            vals = self.sim[chunk]
            np.copyto(vals, -np.inf, where=dead)
            vals[np.arange(chunk.size), chunk] = -np.inf
            arg = np.argmax(vals, axis=1)
            self.row_max[chunk] = vals[np.arange(chunk.size), arg]
            self.row_arg[chunk] = arg


# ----------------------------------------------------------------------------- permute


def permute_clusters(corr: np.ndarray, models: int) -> np.ndarray:
    """The permute baseline: pair each model's features 1:1 with model 0's (Hungarian).

    Cluster r holds model 0's feature r and its optimal partner in every other model, so
    model 0's features have ids 0..n-1 in order.
    """
    size = _check_square(corr, models)
    n = size // models
    ids = np.empty(size, dtype=np.int64)
    ids[:n] = np.arange(n)
    for m in range(1, models):
        ids[m * n + _assign(corr[:n, m * n : (m + 1) * n])] = np.arange(n)
    return ids


def _assign(score: np.ndarray) -> np.ndarray:
    """For each row r, the column maximising the total score of a 1:1 assignment."""
    rows, cols = linear_sum_assignment(_assignable(score), maximize=True)
    out = np.empty(score.shape[0], dtype=np.int64)
    out[rows] = cols
    return out


def _assignable(score: np.ndarray) -> np.ndarray:
    """Finite scores for the solver: NaN/-inf sink below, +inf rises above every finite one."""
    score = np.asarray(score, dtype=np.float64)
    finite = np.isfinite(score)
    if finite.all():
        return score
    low, high = (score[finite].min(), score[finite].max()) if finite.any() else (0.0, 0.0)
    span = high - low + 1.0
    score = np.where(np.isnan(score), -np.inf, score)
    return np.clip(score, low - span, high + span)


# ----------------------------------------------------------------------------- attention


def match_heads(
    corr: np.ndarray, models: int, heads: int, kv_heads: int, head_dim: int
) -> list[np.ndarray]:
    """Match attention heads, whole heads only (RoPE ties q/k dims) and GQA-consistent.

    Query heads a (model 0) and b (model m) score the sum over dims j of
    corr[a*hd + j, b*hd + j]. KV groups score their best within-group assignment; groups are
    assigned by that score, then query heads within the matched groups. Returns per model an
    `order`: merged head h takes that model's query head order[h] (model 0: identity).
    """
    group = _check_heads(corr, models, heads, kv_heads, head_dim)
    width = heads * head_dim
    orders = [np.arange(heads, dtype=np.int64)]
    for m in range(1, models):
        scores = _head_scores(corr[:width, m * width : (m + 1) * width], heads, head_dim)
        orders.append(_head_order(scores, kv_heads, group))
    return orders


def kv_order(order: np.ndarray, heads: int, kv_heads: int) -> np.ndarray:
    """Each merged KV group's source KV head, from a query-head `order` of `match_heads`."""
    group = heads // kv_heads
    return (np.asarray(order)[::group] // group).astype(np.int64)


def _check_heads(corr: np.ndarray, models: int, heads: int, kv_heads: int, head_dim: int) -> int:
    """Validate the head layout against the matrix; return the query heads per KV group."""
    if heads <= 0 or kv_heads <= 0 or head_dim <= 0 or heads % kv_heads:
        raise ValueError(f"bad head layout: heads={heads} kv_heads={kv_heads} dim={head_dim}")
    size = _check_square(corr, models)
    if size != models * heads * head_dim:
        raise ValueError(f"matrix of {size} features is not {models} x {heads} x {head_dim}")
    return heads // kv_heads


def _head_scores(block: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
    """[heads, heads] sums of same-dim correlations between model 0's and model m's heads,
    added in dimension order (the order np.trace took here; fixed, so that the torch
    matcher's sums are the same bits)."""
    tiles = np.asarray(block, dtype=np.float64).reshape(heads, head_dim, heads, head_dim)
    diagonal = np.diagonal(tiles, axis1=1, axis2=3)  # [heads, heads, head_dim]
    total = diagonal[..., 0].copy()
    for k in range(1, head_dim):
        total += diagonal[..., k]
    return total


def _head_order(scores: np.ndarray, kv_heads: int, group: int) -> np.ndarray:
    """Assign KV groups by their best within-group totals, then heads within each pair."""
    tiles = scores.reshape(kv_heads, group, kv_heads, group)
    totals = np.empty((kv_heads, kv_heads))
    inner = np.empty((kv_heads, kv_heads, group), dtype=np.int64)
    for g in range(kv_heads):
        for h in range(kv_heads):
            inner[g, h] = _assign(tiles[g, :, h, :])
            totals[g, h] = tiles[g, np.arange(group), h, inner[g, h]].sum()
    partner = _assign(totals)
    order = np.empty(kv_heads * group, dtype=np.int64)
    for g in range(kv_heads):
        order[g * group : (g + 1) * group] = partner[g] * group + inner[g, partner[g]]
    return order


# ----------------------------------------------------------------------------- residual


def residual_permutations(corrs: list[np.ndarray], models: int) -> list[np.ndarray]:
    """One permutation of the residual stream for all layers: the residual is shared, so
    the cross-model correlations of every layer are summed before a single assignment.

    Returns per model `perm`: merged residual dim r takes that model's dim perm[r].
    """
    if not corrs:
        raise ValueError("residual_permutations needs at least one correlation matrix")
    _check_square(corrs[0], models)
    if any(c.shape != corrs[0].shape for c in corrs):
        raise ValueError("all residual correlation matrices must have the same shape")
    total = residual_cross(corrs[0], models)
    for corr in corrs[1:]:
        total += residual_cross(corr, models)
    return residual_assignment(total)


def residual_cross(corr: np.ndarray, models: int) -> np.ndarray:
    """One layer's share of the residual matching: [models - 1, d, d], model 0's dims
    against each other model's (summed over layers, in layer order, by the caller)."""
    size = _check_square(corr, models)
    d = size // models
    return np.stack([_assignable(corr[:d, m * d : (m + 1) * d]) for m in range(1, models)])


def residual_assignment(total: np.ndarray) -> list[np.ndarray]:
    """Per model, the residual permutation from the summed cross blocks (model 0: identity)."""
    d = total.shape[1]
    return [np.arange(d, dtype=np.int64), *(_assign(block) for block in total)]
