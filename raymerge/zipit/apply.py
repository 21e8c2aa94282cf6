"""Rewrite one tensor from the stage's matches: ZipIt / permute / RegMean for a Llama layer.

Every model's tensor is first brought into the merged model's bases: the residual stream by
its permutation (columns of every input projection and of the embeddings, rows of every
output projection, the norms' entries), attention by whole heads (q/o by query head, k/v by
KV group), MLP neurons by cluster. Then the aligned tensors are combined: averaged (ZipIt's
M averages a cluster's members, its U sums them; the residual stream is averaged over the
models), or, with RegMean, solved in closed form per linear layer from the models' input
Gram matrices, read from the files the stage stored beside the ledger (one model's at a
time). Sums run in a fixed order, so the bytes are the same on any worker.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raymerge.errors import MergeFailed
from raymerge.lazy import torch
from raymerge.methods.base import MergeInputs, compute_dtype

NORMS = ("input_layernorm", "post_attention_layernorm", "norm")
EMBEDDINGS = ("embed_tokens", "lm_head")


def merge(inputs: MergeInputs) -> torch.Tensor:
    facts = inputs.facts
    if facts is None:
        raise ValueError(f"{inputs.name!r}: the calibration stage gave no matches")
    weights = [t.to(compute_dtype(t)) for t in inputs.tensors]
    role = facts["role"]
    if role in ("gate_proj", "up_proj") and facts["clusters"] is not None:
        return _merge_zipped_rows(weights, facts)
    aligned = [_align(role, w, m, facts) for m, w in enumerate(weights)]
    if facts["grams"] is not None:
        return _regmean(aligned, facts)
    return _total(aligned) / len(aligned)


def _total(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Σ of the tensors, added in order (a new tensor)."""
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total += tensor
    return total


def _index(values: Any) -> torch.Tensor | None:
    return None if values is None else torch.as_tensor(np.asarray(values), dtype=torch.long)


def _residual_order(facts: dict, model: int) -> torch.Tensor | None:
    """Merged residual dim -> this model's dim (None: the residual stream is averaged)."""
    return None if facts["residual"] is None else _index(facts["residual"][model])


def _align(role: str, weight: torch.Tensor, model: int, facts: dict) -> torch.Tensor:
    """Model `model`'s tensor in the merged bases (rows of zipped MLP neurons excepted:
    see _zipped_rows)."""
    residual = _residual_order(facts, model)
    if role in NORMS:
        return weight if residual is None else weight[residual]
    if role in EMBEDDINGS or role in ("gate_proj", "up_proj"):
        return _columns(weight, residual)
    if role in ("q_proj", "k_proj", "v_proj"):
        return _columns(_head_rows(role, weight, model, facts), residual)
    if role == "o_proj":
        return _rows(_head_columns(weight, model, facts), residual)
    if role == "down_proj":
        return _rows(_unmerged_columns(weight, model, facts), residual)
    raise ValueError(f"no ZipIt rule for a tensor of role {role!r}")


def _columns(weight: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    return weight if order is None else weight[:, order]


def _rows(weight: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    return weight if order is None else weight[order]


def _head_order(role: str, model: int, facts: dict) -> torch.Tensor | None:
    """Merged query head -> this model's query head (q, o); merged KV group -> its KV head
    (k, v)."""
    if facts["heads"] is None:
        return None
    order = np.asarray(facts["heads"][model])
    if role in ("k_proj", "v_proj"):
        shape = facts["shape"]
        group = shape["heads"] // shape["kv_heads"]
        order = order[::group] // group
    return _index(order)


def _head_rows(role: str, weight: torch.Tensor, model: int, facts: dict) -> torch.Tensor:
    order = _head_order(role, model, facts)
    if order is None:
        return weight
    head_dim = facts["shape"]["head_dim"]
    blocks = weight.reshape(-1, head_dim, weight.shape[1])
    return blocks[order].reshape(weight.shape)


def _head_columns(weight: torch.Tensor, model: int, facts: dict) -> torch.Tensor:
    order = _head_order("o_proj", model, facts)
    if order is None:
        return weight
    head_dim = facts["shape"]["head_dim"]
    blocks = weight.reshape(weight.shape[0], -1, head_dim)
    return blocks[:, order].reshape(weight.shape)


def _model_clusters(facts: dict, model: int, width: int) -> torch.Tensor:
    ids = np.asarray(facts["clusters"])
    return _index(ids[model * width : (model + 1) * width])


def cluster_sum(rows: torch.Tensor, ids: torch.Tensor, clusters: int) -> torch.Tensor:
    """Σ of the rows in each cluster, [clusters, ...]: members are added in row order, one
    member rank at a time (no scatter with repeated indices, so the same on every device)."""
    out = torch.zeros((clusters, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=clusters)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(ids.numel(), device=ids.device) - starts[ids[order]]
    for k in range(int(counts.max()) if ids.numel() else 0):
        chosen = order[rank == k]
        out[ids[chosen]] += rows[chosen]
    return out


def _unmerged_columns(weight: torch.Tensor, model: int, facts: dict) -> torch.Tensor:
    """down_proj's columns summed per cluster (ZipIt's U): [d, clusters]."""
    if facts["clusters"] is None:
        return weight
    width = weight.shape[1]
    ids = _model_clusters(facts, model, width)
    return cluster_sum(weight.T.contiguous(), ids, width).T


def _zipped_rows(weights: list[torch.Tensor], facts: dict) -> tuple[list, list]:
    """gate/up rows per model in the merged neurons: the sum of this model's members of
    each cluster, and how many there are."""
    width = weights[0].shape[0]
    sums, counts = [], []
    for model, weight in enumerate(weights):
        aligned = _columns(weight, _residual_order(facts, model))
        ids = _model_clusters(facts, model, width)
        counts.append(torch.bincount(ids, minlength=width).to(aligned.dtype))
        sums.append(cluster_sum(aligned, ids, width))
    return sums, counts


def _merge_zipped_rows(weights: list[torch.Tensor], facts: dict) -> torch.Tensor:
    """ZipIt's M weighs every member of a cluster alike, whichever model it comes from;
    RegMean fits each model's mean over its members, over the models that have any."""
    sums, counts = _zipped_rows(weights, facts)
    if facts["grams"] is not None:
        means = [total / count.clamp(min=1)[:, None] for total, count in zip(sums, counts)]
        return _regmean(means, facts, [count > 0 for count in counts])
    return _total(sums) / _total(counts).clamp(min=1)[:, None]


def _aligned_gram(facts: dict, model: int) -> torch.Tensor:
    """Model `model`'s input Gram matrix in the merged input basis, off-diagonal entries
    scaled by RegMean's alpha (read from its stored tiles when it is needed, one model's
    at a time: at Llama-3-8B width down_proj's is 1.6 GB)."""
    gram = torch.from_numpy(load_gram(facts["grams"], model))
    role = facts["role"]
    if role in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        order = _residual_order(facts, model)
    elif role == "o_proj":
        order = _head_features(facts, model)
    else:  # down_proj: features averaged per cluster
        order = None
        if facts["clusters"] is not None:
            gram = _cluster_mean_gram(gram, facts, model)
    if order is not None:
        gram = gram[order[:, None], order[None, :]]
    return _scaled(gram, facts["regmean_alpha"])


def _scaled(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * gram + (1 - alpha) * diag(gram), in place: off the diagonal alpha * g + 0.0,
    on it alpha * g + (1 - alpha) * g, the very operations of the two-matrix form."""
    diagonal = torch.diagonal(gram)
    kept = alpha * diagonal + (1 - alpha) * diagonal
    gram.mul_(alpha).add_(0.0)
    torch.diagonal(gram).copy_(kept)
    return gram


def load_gram(spec: dict, model: int) -> np.ndarray:
    """Σxxᵀ / tokens over one model's features, [n, n] fp64, from the stored tiles above
    the diagonal (mirrored below it); a damaged or missing tile fails the merge clearly."""
    from raymerge.zipit import store
    from raymerge.zipit.tiles import Grid

    n = spec["width"]
    layout = Grid(spec["models"], n, spec["tile"])
    spans, owner, offset = layout.spans, layout.owner, model * n
    out = np.empty((n, n))
    reader = store.reader(spec["store"])
    for key, ref in spec["tiles"].items():
        i, j = (int(k) for k in key.split("-"))
        if owner[i] != model:
            continue
        try:
            block = store.read(reader, ref)
        except store.Damaged as exc:
            raise MergeFailed(
                f"a stored RegMean Gram matrix is missing or damaged ({exc}); rerun the same "
                "command: the stage checks its files and gathers them again"
            ) from None
        (a, b), (c, d) = spans[i], spans[j]
        out[a - offset : b - offset, c - offset : d - offset] = block
        if i != j:
            out[c - offset : d - offset, a - offset : b - offset] = block.T
    np.divide(out, spec["count"], out=out)
    return out


def _head_features(facts: dict, model: int) -> torch.Tensor | None:
    order = _head_order("o_proj", model, facts)
    if order is None:
        return None
    head_dim = facts["shape"]["head_dim"]
    return (order[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def _cluster_mean_gram(gram: torch.Tensor, facts: dict, model: int) -> torch.Tensor:
    """BᵀGB with B averaging this model's members of each cluster (zero where none)."""
    width = gram.shape[0]
    ids = _model_clusters(facts, model, width)
    counts = torch.bincount(ids, minlength=width).to(gram.dtype).clamp(min=1)
    rows = cluster_sum(gram, ids, width) / counts[:, None]
    return cluster_sum(rows.T.contiguous(), ids, width).T / counts[None, :]


def _regmean(aligned: list[torch.Tensor], facts: dict,
             present: list[torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """W* = (Σ W_m G_m)(Σ G_m)⁻¹ over the models present in each row (`present`: per model,
    its rows; None: every model in every row), in fp64. The Gram matrices are read one at a
    time and summed as they come (in model order, from 0 as Python's sum does)."""
    weights = [w.double() for w in aligned]
    out = torch.empty_like(weights[0])
    if present is None:
        present = [torch.ones(len(weights[0]), dtype=torch.bool)] * len(weights)
    masks = torch.stack(present)
    patterns = torch.unique(masks, dim=1).T
    cache: dict[int, torch.Tensor] | None = {} if len(patterns) > 1 else None
    for pattern in patterns:
        rows = (masks == pattern[:, None]).all(0)
        gram = target = None
        for m in (m for m in range(len(weights)) if pattern[m]):
            mine = _cached_gram(facts, m, cache)
            part = weights[m][rows] @ mine
            target = part + 0 if target is None else target.add_(part)
            if gram is None:
                gram = mine + 0 if cache is not None else mine.add_(0)
            else:
                gram += mine
            del part, mine
        out[rows] = _solve(gram, target)
        del gram, target
    return out


def _cached_gram(facts: dict, model: int, cache: dict | None) -> torch.Tensor:
    if cache is None:
        return _aligned_gram(facts, model)
    if model not in cache:
        cache[model] = _aligned_gram(facts, model)
    return cache[model]


def _solve(gram: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """X with X · gram = target (gram symmetric); a singular gram (dead features) falls back
    to the pseudo-inverse."""
    try:
        return torch.linalg.solve(gram, target.T).T
    except torch.linalg.LinAlgError:
        return target @ torch.linalg.pinv(gram, hermitian=True)
