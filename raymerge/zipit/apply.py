"""Rewrite one tensor from the stage's matches: ZipIt / permute / RegMean for a Llama layer.

Every model's tensor is first brought into the merged model's bases: the residual stream by
its permutation (columns of every input projection and of the embeddings, rows of every
output projection, the norms' entries), attention by whole heads (q/o by query head, k/v by
KV group), MLP neurons by cluster. Then the aligned tensors are combined: averaged (ZipIt's
M averages a cluster's members, its U sums them; the residual stream is averaged over the
models), or, with RegMean, solved in closed form per linear layer from the models' input
Gram matrices. Sums run in a fixed order, so the bytes are the same on any worker.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raymerge.lazy import torch
from raymerge.methods.base import MergeInputs

NORMS = ("input_layernorm", "post_attention_layernorm", "norm")
EMBEDDINGS = ("embed_tokens", "lm_head")


def merge(inputs: MergeInputs) -> torch.Tensor:
    facts = inputs.facts
    if facts is None:
        raise ValueError(f"{inputs.name!r}: the calibration stage gave no matches")
    weights = [_wide(t) for t in inputs.tensors]
    role = facts["role"]
    if role in ("gate_proj", "up_proj") and facts["clusters"] is not None:
        rows, present = _zipped_rows(weights, facts)
        return _combine(rows, facts, present)
    aligned = [_align(role, w, m, facts) for m, w in enumerate(weights)]
    return _combine(aligned, facts, [None] * len(aligned))


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.float64 if tensor.dtype == torch.float64 else torch.float32)


def _index(values: Any) -> torch.Tensor | None:
    return None if values is None else torch.as_tensor(np.asarray(values), dtype=torch.long)


def _align(role: str, weight: torch.Tensor, model: int, facts: dict) -> torch.Tensor:
    """Model `model`'s tensor in the merged bases (rows of zipped MLP neurons excepted:
    see _zipped_rows)."""
    residual = _index(None if facts["residual"] is None else facts["residual"][model])
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
    """gate/up rows per model in the merged neurons: each cluster's mean over this model's
    members, and which clusters the model has members in. (ZipIt's M weighs every member
    of a cluster alike: see _combine.)"""
    width = weights[0].shape[0]
    rows, present = [], []
    for model, weight in enumerate(weights):
        residual = None if facts["residual"] is None else facts["residual"][model]
        aligned = _columns(weight, _index(residual))
        ids = _model_clusters(facts, model, width)
        counts = torch.bincount(ids, minlength=width).to(aligned.dtype)
        total = cluster_sum(aligned, ids, width)
        rows.append((total, counts))
        present.append(counts > 0)
    return rows, present


def _combine(aligned: list, facts: dict, present: list) -> torch.Tensor:
    if facts["grams"] is not None:
        return _regmean(aligned, facts, present)
    if isinstance(aligned[0], tuple):  # zipped rows: Σ members / members, over all models
        total = aligned[0][0].clone()
        counts = aligned[0][1].clone()
        for rows, count in aligned[1:]:
            total += rows
            counts += count
        return total / counts.clamp(min=1)[:, None]
    total = aligned[0].clone()
    for weight in aligned[1:]:
        total += weight
    return total / len(aligned)


def aligned_grams(facts: dict, models: int) -> list[torch.Tensor]:
    """Each model's input Gram matrix in the merged input basis, off-diagonal entries
    scaled by RegMean's alpha."""
    grams = [torch.as_tensor(np.asarray(g), dtype=torch.float64) for g in facts["grams"]]
    role, out = facts["role"], []
    for model, gram in enumerate(grams):
        if role in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            order = _index(None if facts["residual"] is None else facts["residual"][model])
        elif role == "o_proj":
            order = _head_features(facts, model, gram.shape[0])
        else:  # down_proj: features averaged per cluster
            order = None
            if facts["clusters"] is not None:
                gram = _cluster_mean_gram(gram, facts, model)
        if order is not None:
            gram = gram[order][:, order]
        alpha = facts["regmean_alpha"]
        out.append(alpha * gram + (1 - alpha) * torch.diag(torch.diagonal(gram)))
    return out


def _head_features(facts: dict, model: int, width: int) -> torch.Tensor | None:
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


def _regmean(aligned: list, facts: dict, present: list) -> torch.Tensor:
    """W* = (Σ W_m G_m)(Σ G_m)⁻¹ over the models present in each row (all of them, but
    for zipped MLP rows), in fp64."""
    grams = aligned_grams(facts, len(aligned))
    if isinstance(aligned[0], tuple):  # zipped rows: each model's mean over its members
        weights = [(rows / count.clamp(min=1)[:, None]).double() for rows, count in aligned]
    else:
        weights = [w.double() for w in aligned]
    out = torch.empty_like(weights[0])
    masks = torch.stack([torch.ones(len(weights[0]), dtype=torch.bool) if p is None else p
                         for p in present])  # fmt: skip
    for pattern in torch.unique(masks, dim=1).T:
        rows = (masks == pattern[:, None]).all(0)
        models = [m for m in range(len(weights)) if pattern[m]]
        gram = sum(grams[m] for m in models)
        target = sum(weights[m][rows] @ grams[m] for m in models)
        out[rows] = _solve(gram, target)
    return out


def _solve(gram: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """X with X · gram = target (gram symmetric); a singular gram (dead features) falls back
    to the pseudo-inverse."""
    try:
        return torch.linalg.solve(gram, target.T).T
    except torch.linalg.LinAlgError:
        return target @ torch.linalg.pinv(gram, hermitian=True)
