"""Correlations assembled from stored Σxxᵀ tiles on a worker's device, and the matches
that read them (zipit/work.py's matching step).

A tile (i, j) becomes correlations element by element (match_torch.correlate), so any
region assembled from tiles holds exactly the values match.correlation gives on the whole
Σxxᵀ. The zip gets the whole [F, F] matrix (upper tiles; its preparation mirrors them);
permute, heads and the residual stream get only model 0's features against each other
model's (a cross block), which is all they read.
"""

from __future__ import annotations

import numpy as np
import torch

from raymerge.zipit import match, match_torch
from raymerge.zipit.shape import LlamaShape
from raymerge.zipit.tiles import Grid


def _moments(runner, data: dict) -> tuple:
    return match_torch.moments(data["count"], data["total"], data["diagonal"], runner.device)


def _grid(data: dict) -> Grid:
    size = len(data["total"])
    return Grid(data["models"], size // data["models"], data["tile"])


def _tiles(runner, data: dict, wanted):
    """(i, j, the tile's correlations on the device) for the stored tiles `wanted` keeps."""
    from raymerge.zipit.work import _read

    mean, std = _moments(runner, data)
    spans = _grid(data).spans
    for key, ref in sorted(data["tiles"].items()):
        i, j = (int(k) for k in key.split("-"))
        if not wanted(i, j):
            continue
        tile = torch.from_numpy(_read(runner, ref)).to(runner.device)
        (a, b), (c, d) = spans[i], spans[j]
        yield i, j, match_torch.correlate(tile, data["count"], (mean[a:b], std[a:b]),
                                          (mean[c:d], std[c:d]))  # fmt: skip


def whole(runner, data: dict) -> torch.Tensor:
    """The [F, F] correlation matrix, upper tiles filled (the zip mirrors them)."""
    size = len(data["total"])
    corr = torch.empty(size, size, dtype=torch.float64, device=runner.device)
    spans = _grid(data).spans
    for i, j, tile in _tiles(runner, data, lambda i, j: True):
        (a, b), (c, d) = spans[i], spans[j]
        corr[a:b, c:d] = tile
    return corr


def cross(runner, data: dict, model: int) -> torch.Tensor:
    """Model 0's features (rows) against model `model`'s (columns), [n, n]."""
    layout = _grid(data)
    n, spans, owner = layout.width, layout.spans, layout.owner
    block = torch.empty(n, n, dtype=torch.float64, device=runner.device)
    wanted = lambda i, j: owner[i] == 0 and owner[j] == model  # noqa: E731
    for i, j, tile in _tiles(runner, data, wanted):
        (a, b), (c, d) = spans[i], spans[j]
        block[a:b, c - model * n : d - model * n] = tile
    return block


def permute_ids(crosses: list[torch.Tensor]) -> np.ndarray:
    """match.permute_clusters from the cross blocks: one assignment per model against 0."""
    n = crosses[0].shape[0]
    ids = np.empty((len(crosses) + 1) * n, dtype=np.int64)
    ids[:n] = np.arange(n)
    for m, block in enumerate(crosses, start=1):
        ids[m * n + match._assign(block.cpu().numpy())] = np.arange(n)
    return ids


def head_orders(crosses: list[torch.Tensor], shape: LlamaShape) -> np.ndarray:
    """match.match_heads from the cross blocks: per model, merged head -> its query head."""
    orders = [np.arange(shape.heads, dtype=np.int64)]
    for block in crosses:
        scores = match_torch.head_scores(block, shape.heads, shape.head_dim)
        orders.append(match._head_order(scores, shape.kv_heads, shape.group))
    return np.stack(orders)


def residual_share(crosses: list[torch.Tensor]) -> np.ndarray:
    """match.residual_cross from the cross blocks: this layer's share of the scores."""
    return np.stack([match._assignable(block.cpu().numpy()) for block in crosses])
