"""Arcee Fusion: take the other model's change only where it matters most. Each entry's
importance is |x - base| times the KL divergence between softmax(x) and softmax(base) of its
row (last axis; a 1-D tensor is one row), and the change is kept where the importance reaches
median + 1.5 IQR of the tensor's importances (a Tukey outlier fence).

Quantiles are the entries at sorted positions floor(q (n - 1)), as mergekit takes them, but
always over the whole tensor: mergekit samples 10^6 entries at random (unseeded) from larger
tensors, which makes its output vary run to run; the exact quantile is what it estimates.
The row KL is summed in float64, so keep decisions at the fence do not depend on the device's
summation order; everything else is elementwise fp32.

A whole tensor takes its quantiles at once; a tensor split into row ranges (whole rows: a
KL row never straddles two) gathers the same three order statistics exactly, by histogram
rounds over the scores' bits (selection.py), so both merge to the same bytes. A vector is
one KL row and cannot be split.
"""

from __future__ import annotations

from collections.abc import Iterator

from raymerge.lazy import torch
from raymerge.methods import selection
from raymerge.methods.base import MergeInputs, MergeMethod, compute_dtype

EPS = 1e-8
BLOCK = 1 << 22  # entries per block of rows for the float64 softmax temporaries


def row_kl(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(softmax(x) + eps || softmax(base) + eps) of each row, shape (rows, 1)."""
    width = model.shape[-1] if model.dim() else 1
    xs, bs = model.reshape(-1, width), base.reshape(-1, width)
    out = torch.empty(xs.shape[0], 1, dtype=torch.float64, device=model.device)
    step = max(1, BLOCK // max(width, 1))
    for lo in range(0, xs.shape[0], step):
        p = torch.softmax(xs[lo : lo + step].double(), dim=-1).add_(EPS)
        q = torch.softmax(bs[lo : lo + step].double(), dim=-1).add_(EPS)
        out[lo : lo + step] = (p * (p / q).log_()).sum(dim=-1, keepdim=True)
    return out


def importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|x - base| times the KL of the entry's row."""
    kl = row_kl(model, base).to(model.dtype)
    width = model.shape[-1] if model.dim() else 1
    return ((model - base).abs().reshape(-1, width) * kl).reshape(model.shape)


def fence(scores: torch.Tensor) -> torch.Tensor:
    """median + 1.5 (q3 - q1), each quantile the sorted entry at floor(q (n - 1))."""
    flat = scores.reshape(-1)
    if flat.is_cuda:  # CUDA's kthvalue selects a long slice in one block: sorting is faster
        ordered = torch.sort(flat).values
        q1, median, q3 = (ordered[p] for p in _positions(flat.numel()))
    else:
        q1, median, q3 = (torch.kthvalue(flat, p + 1).values for p in _positions(flat.numel()))
    return _tukey(q1, median, q3)


def _positions(n: int) -> tuple[int, int, int]:
    last = n - 1
    return last // 4, last // 2, 3 * last // 4


def _tukey(q1: torch.Tensor, median: torch.Tensor, q3: torch.Tensor) -> torch.Tensor:
    return median + 1.5 * (q3 - q1)


def _pair(inputs: MergeInputs) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = compute_dtype(inputs.base)
    ((_, model, _),) = inputs.others()
    return inputs.base.to(dtype), model.to(dtype)


def _scores(inputs: MergeInputs, wanted: selection.Wanted) -> Iterator[selection.Offer]:
    """One block's importance keys (the rounds' source)."""
    if inputs.tensors[0].dim() < 2 and inputs.tensors[0].numel() != inputs.numel:
        raise ValueError(f"{inputs.name}: a vector is one KL row; it cannot be split")
    if wanted("scores"):
        base, model = _pair(inputs)
        yield "scores", selection.order_keys(importance(model, base)), {}


def _quantiles(group: str, total: dict, inputs: MergeInputs) -> dict[str, selection.Pick]:
    """The entries at ascending ranks floor(q (n - 1)), q = 1/4, 1/2, 3/4."""
    if total["numel"] == 0:
        return {}
    ranks = _positions(total["numel"])
    return {q: selection.Pick("bottom", r + 1, value=True) for q, r in zip(QUANTILES, ranks)}


QUANTILES = ("q1", "median", "q3")
ROUNDS = selection.select_rounds(_scores, _quantiles, signed=True)  # KL rounding: scores < 0


def merge(inputs: MergeInputs) -> torch.Tensor:
    base, model = _pair(inputs)
    if base.numel() == 0:
        return model
    scores = importance(model, base)
    if inputs.facts is None:  # the whole tensor is here
        limit = fence(scores)
    else:
        limit = _tukey(*(scores.new_tensor(inputs.facts[q]["value"]) for q in QUANTILES))
    return torch.where(scores >= limit, model, base)


METHODS = (
    MergeMethod(
        name="arcee_fusion",
        merge=merge,
        params=(),
        base="required",
        min_inputs=2,
        max_inputs=2,
        summary="x where |x - base| KL(row) >= median + 1.5 IQR, else base",
        locality="rows",  # and whole-tensor quantiles, from the rounds
        rounds=lambda shared: ROUNDS,
    ),
)
