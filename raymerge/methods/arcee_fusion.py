"""Arcee Fusion: take the other model's change only where it matters most. Each entry's
importance is |x - base| times the KL divergence between softmax(x) and softmax(base) of its
row (last axis; a 1-D tensor is one row), and the change is kept where the importance reaches
median + 1.5 IQR of the tensor's importances (a Tukey outlier fence).

Quantiles are the entries at sorted positions floor(q (n - 1)), as mergekit takes them, but
always over the whole tensor: mergekit samples 10^6 entries at random (unseeded) from larger
tensors, which makes its output vary run to run; the exact quantile is what it estimates.
The row KL is summed in float64, so keep decisions at the fence do not depend on the device's
summation order; everything else is elementwise fp32.
"""

from __future__ import annotations

from raymerge.lazy import torch
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
    last = flat.numel() - 1
    positions = (last // 4, last // 2, 3 * last // 4)
    if flat.is_cuda:  # CUDA's kthvalue selects a long slice in one block: sorting is faster
        ordered = torch.sort(flat).values
        q1, median, q3 = (ordered[p] for p in positions)
    else:
        q1, median, q3 = (torch.kthvalue(flat, p + 1).values for p in positions)
    return median + 1.5 * (q3 - q1)


def merge(inputs: MergeInputs) -> torch.Tensor:
    dtype = compute_dtype(inputs.base)
    base = inputs.base.to(dtype)
    ((_, model, _),) = inputs.others()
    model = model.to(dtype)
    if base.numel() == 0:
        return model
    scores = importance(model, base)
    return torch.where(scores >= fence(scores), model, base)


METHODS = (
    MergeMethod(
        name="arcee_fusion",
        merge=merge,
        params=(),
        base="required",
        min_inputs=2,
        max_inputs=2,
        summary="x where |x - base| KL(row) >= median + 1.5 IQR, else base",
    ),
)
