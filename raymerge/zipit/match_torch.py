"""ZipIt's matching in torch, on the worker's device (a GPU when workers have one).

The same arithmetic as the numpy reference (`match.py`), operation for operation, so on a
CPU the matches are the same bit for bit (tested on random inputs with ties, NaN and
constant features): the correlation is computed element by element with the same IEEE
operations (a division by a count goes through a tensor, never a reciprocal; means and
deviations come from numpy, whose sqrt is correctly rounded where torch's need not be), the greedy
zip keeps each row's maximum and first argmax exactly as `_ZipState` does, and head scores
add a head's dimensions one at a time in dimension order. The assignments themselves
(permute, head pairing, the residual stream) stay on scipy's `linear_sum_assignment` on the
CPU: their inputs are small or cross blocks.

Memory: the zip works in place on the correlation matrix it is given ([F, F] fp64) plus
O(F) vectors and row chunks of about 32 MiB.
"""

from __future__ import annotations

import numpy as np
import torch

from raymerge.zipit.match import _CHUNK_ELEMENTS, _STD_FLOOR, _check_zip_args, _ids_from_parent

# ----------------------------------------------------------------------------- correlation


def moments(count: int, total, diagonal, device="cpu") -> tuple:
    """(mean, std) of every feature, as fp64 tensors on `device`, from the token count, Σx
    and the diagonal of Σxxᵀ. Computed in numpy on the host (F values): torch's sqrt is
    not always correctly rounded on CPUs, numpy's is, and the reference uses numpy's."""
    if count <= 0:
        raise ValueError(f"correlation needs a positive token count, got {count}")
    total = np.asarray(total, dtype=np.float64)
    mean = total / count
    var = np.asarray(diagonal, dtype=np.float64) / count - mean * mean
    std = np.sqrt(np.clip(var, 0.0, None))
    return (torch.from_numpy(mean).to(device), torch.from_numpy(std).to(device))


def _count(count: int, like: torch.Tensor) -> torch.Tensor:
    """The count as a tensor: a division by a Python number may become a multiplication by
    its reciprocal on some devices, which rounds differently."""
    return torch.tensor(float(count), dtype=torch.float64, device=like.device)


def correlate(block: torch.Tensor, count: int, rows: tuple, cols: tuple) -> torch.Tensor:
    """Turn a block of Σxxᵀ into correlations in place: rows/cols are (mean, std) of its
    row and column features. Constant features get 0, not NaN (std floored at 1e-7)."""
    (mean_r, std_r), (mean_c, std_c) = rows, cols
    block /= _count(count, block)
    floor = torch.tensor(_STD_FLOOR, dtype=torch.float64, device=block.device)
    step = max(1, _CHUNK_ELEMENTS // max(block.shape[1], 1))
    for lo in range(0, block.shape[0], step):
        part = block[lo : lo + step]
        part -= mean_r[lo : lo + step, None] * mean_c[None, :]
        part /= torch.maximum(std_r[lo : lo + step, None] * std_c[None, :], floor)
    return block


def correlation(count: int, total, outer) -> torch.Tensor:
    """The whole correlation matrix from (count, Σx, Σxxᵀ), as match.correlation."""
    outer = torch.as_tensor(outer, dtype=torch.float64).clone()
    diagonal = torch.diagonal(outer).cpu().numpy()
    stats = moments(count, np.asarray(total), diagonal, outer.device)
    return correlate(outer, count, stats, stats)


# ----------------------------------------------------------------------------- zip


def zip_clusters(corr: torch.Tensor, models: int, alpha: float, beta: float) -> np.ndarray:
    """match.zip_clusters on `corr`'s device, overwriting `corr` (no second [F, F] copy)."""
    if corr.dtype != torch.float64:
        raise ValueError(f"the zip works on float64 correlations, got {corr.dtype}")
    size = _check_zip_args(corr, models, alpha, beta)
    n = size // models
    _prepare(corr)
    label = torch.arange(size, device=corr.device) // n
    labels = label.cpu().numpy()
    budget = np.full(models, int((size - n) // models * beta), dtype=np.int64)
    state = _TorchZip(corr, alpha, label)
    for _ in range(size - n):
        i, j = state.best_pair()
        state.merge(i, j)
        if labels[i] == labels[j]:
            budget[labels[i]] -= 1
            if budget[labels[i]] <= 0:
                state.forbid(torch.nonzero(state.live & (label == int(labels[i])))[:, 0])
    return _ids_from_parent(state.parent.cpu().numpy())


def _prepare(sim: torch.Tensor) -> None:
    """In place: the upper triangle mirrored onto the lower, NaN -> -inf, diagonal -inf."""
    size = sim.shape[0]
    step = max(1, _CHUNK_ELEMENTS // max(size, 1))
    for lo in range(0, size, step):
        hi = min(lo + step, size)
        square = sim[lo:hi, lo:hi]
        below = torch.ones(hi - lo, hi - lo, dtype=torch.bool, device=sim.device).tril(-1)
        square[below] = square.T[below]
        sim[hi:, lo:hi] = sim[lo:hi, hi:].T
    for lo in range(0, size, step):
        rows = sim[lo : lo + step]
        rows.masked_fill_(torch.isnan(rows), -torch.inf)
    sim.fill_diagonal_(-torch.inf)


class _TorchZip:
    """match._ZipState in torch: the similarity matrix over clusters plus each live row's
    maximum over live columns and its first argmax; dead clusters are masked, not cut."""

    def __init__(self, sim: torch.Tensor, alpha: float, label: torch.Tensor) -> None:
        size, device = sim.shape[0], sim.device
        self.sim, self.alpha, self.label = sim, alpha, label
        self.live = torch.ones(size, dtype=torch.bool, device=device)
        self.parent = torch.arange(size, device=device)
        self.row_max = torch.empty(size, dtype=torch.float64, device=device)
        self.row_arg = torch.empty(size, dtype=torch.int64, device=device)
        self._new = torch.empty(size, dtype=torch.float64, device=device)
        self._refresh(torch.arange(size, device=device))

    def best_pair(self) -> tuple[int, int]:
        i = int(torch.argmax(self.row_max))
        best, j = self.row_max[i].item(), int(self.row_arg[i])
        if best == -np.inf:
            return self._first_cross_pair()
        return min(i, j), max(i, j)

    def _first_cross_pair(self) -> tuple[int, int]:
        i = int(torch.nonzero(self.live)[0, 0])
        j = int(torch.nonzero(self.live & (self.label != self.label[i]))[0, 0])
        return i, j

    def merge(self, i: int, j: int) -> None:
        self.live[j] = False
        self.row_max[j] = -torch.inf
        self.parent[j] = i
        new = torch.minimum(self.sim[i], self.sim[j], out=self._new)
        new *= self.alpha
        new.masked_fill_(~self.live, -torch.inf)
        new[i] = -torch.inf
        self.sim[i, :] = new
        self.sim[:, i] = new
        lost = self._update_column(i, j, new)
        arg = torch.argmax(new)
        self.row_arg[i] = arg
        self.row_max[i] = new[arg]
        self._refresh(lost)

    def forbid(self, members: torch.Tensor) -> None:
        step = max(1, _CHUNK_ELEMENTS // max(len(members), 1))
        for lo in range(0, len(members), step):
            rows = members[lo : lo + step]
            self.sim[rows[:, None], members[None, :]] = -torch.inf
        self._refresh(members)

    def _update_column(self, i: int, j: int, new: torch.Tensor) -> torch.Tensor:
        row_max, row_arg = self.row_max, self.row_arg
        hit = (row_arg == i) | (row_arg == j)
        better = (new > row_max) | ((new == row_max) & (row_arg > i))
        take = torch.where(hit, new >= row_max, better) & self.live
        row_max.copy_(torch.where(take, new, row_max))
        row_arg.masked_fill_(take, i)
        lost = hit & ~take & self.live
        lost[i] = False
        return torch.nonzero(lost)[:, 0]

    def _refresh(self, rows: torch.Tensor) -> None:
        rows = rows[self.live[rows]]
        if rows.numel() == 0:
            return
        dead = ~self.live[None, :]
        step = max(1, _CHUNK_ELEMENTS // self.sim.shape[1])
        for lo in range(0, rows.numel(), step):
            chunk = rows[lo : lo + step]
            vals = self.sim[chunk]
            vals.masked_fill_(dead, -torch.inf)
            index = torch.arange(chunk.numel(), device=chunk.device)
            vals[index, chunk] = -torch.inf
            arg = torch.argmax(vals, dim=1)
            self.row_max[chunk] = vals[index, arg]
            self.row_arg[chunk] = arg


# ----------------------------------------------------------------------------- heads


def head_scores(block: torch.Tensor, heads: int, head_dim: int) -> np.ndarray:
    """[heads, heads] sums of same-dim correlations between model 0's heads (rows) and
    another model's (columns), added in dimension order (as match._head_scores)."""
    tiles = block.reshape(heads, head_dim, heads, head_dim)
    diagonal = torch.diagonal(tiles, dim1=1, dim2=3)  # [heads, heads, head_dim]
    total = diagonal[..., 0].clone()
    for k in range(1, head_dim):
        total += diagonal[..., k]
    return total.cpu().numpy()
