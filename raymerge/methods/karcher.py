"""karcher: the Karcher (Riemannian) mean of the inputs' directions, times their mean norm.

As mergekit: every input counts equally (the base too, when one is listed: the base policy is
"ignored", so it is just another input). Inputs with norm <= tol drop out of the direction
but still count in the mean norm. The mean starts at the normalized Euclidean mean of the unit
vectors and takes up to max_iter Riemannian gradient steps (log maps averaged in the tangent
space, exp map back), stopping once the step is shorter than tol.
"""

from __future__ import annotations

from raymerge.lazy import torch
from raymerge.methods.base import MergeInputs, MergeMethod, Param, compute_dtype
from raymerge.methods.spherical import normalize


def karcher(tensors: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """Merge same-shape tensors of the compute dtype; one tensor is returned as it is."""
    if len(tensors) == 1:
        return tensors[0]
    alpha = 1.0 / len(tensors)
    flats = [x.reshape(-1) for x in tensors]
    pairs = [normalize(x, 0.0, "keep") for x in flats]
    norms = torch.stack([norm for _, norm in pairs])
    valid = [i for i, big in enumerate((norms > tol).tolist()) if big]
    if not valid:
        return torch.zeros_like(tensors[0])
    units = [pairs[i][0] for i in valid]
    del pairs
    total = sum([alpha] * len(valid))
    weights = [alpha / total] * len(valid)

    mean = torch.zeros_like(units[0])
    for u, w in zip(units, weights):
        mean.add_(u, alpha=w)
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if mean_norm.item() < tol else mean.div_(mean_norm)
    for _ in range(max_iter):
        # log map of each unit vector at the mean: theta / sin(theta) * (u - cos(theta) * mean)
        dots = torch.stack([torch.dot(mean, u) for u in units]).clamp(-1, 1)
        theta = torch.arccos(dots)
        near = theta < tol  # already at the mean: no contribution
        safe = torch.where(near, torch.ones_like(theta), theta)
        coef = torch.where(near, torch.zeros_like(theta), safe / torch.sin(safe))
        coef = coef * torch.tensor(weights, dtype=coef.dtype, device=coef.device)
        # (u - cos * mean) before scaling: theta / sin(theta) is huge near anti-parallel
        tangent = torch.zeros_like(mean)
        for u, dot, c in zip(units, dots, coef):
            tangent.add_((u - dot * mean).mul_(c))
        step = torch.linalg.vector_norm(tangent)
        if step.item() < tol:
            break
        mean = mean.mul_(torch.cos(step)).add_(tangent.mul_(torch.sin(step) / step))
        length = torch.linalg.vector_norm(mean)
        if length.item() > tol:
            mean.div_(length)
    scale = (norms * alpha).sum()
    return mean.mul_(scale).reshape(tensors[0].shape)


def merge(inputs: MergeInputs) -> torch.Tensor:
    dtype = compute_dtype(inputs.tensors[0])
    tensors = [x.to(dtype) for x in inputs.tensors]
    return karcher(tensors, inputs.shared["max_iter"], inputs.shared["tol"])


METHODS = (
    MergeMethod(
        name="karcher",
        merge=merge,
        params=(
            Param("max_iter", int, "shared", default=10, low=0, help="most gradient steps"),
            Param("tol", float, "shared", default=1e-5, low=0.0, help="convergence tolerance"),
        ),
        base="ignored",
        min_inputs=1,
        summary="Karcher mean of the directions on the hypersphere times the mean norm",
    ),
)
