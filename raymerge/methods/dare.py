"""DARE (Yu et al., 2023): drop each task-vector entry with probability 1 - density, then
merge linearly or with TIES sign election; mergekit's `dare_linear` and `dare_ties`.

Masks come from the counter-based generator keyed by (seed, tensor name, model position), so
a merge is reproducible on any worker and device. With `rescale` (the default) survivors are
scaled to the original L1 norm, as mergekit does, rather than by exactly 1 / density.
"""

from __future__ import annotations

from typing import Any

from raymerge.lazy import torch
from raymerge.methods import random as rng
from raymerge.methods import sparsify, task_arithmetic
from raymerge.methods.base import MergeInputs


def trim_random(
    delta: torch.Tensor, params: dict[str, Any], inputs: MergeInputs, position: int
) -> torch.Tensor:
    stream = rng.key(inputs.seed, inputs.name, position)
    return sparsify.bernoulli(delta, params["density"], stream, inputs.element_start)


RANDOM = task_arithmetic.Trim(trim_random, "elementwise")


METHODS = (
    task_arithmetic.make(
        "dare_linear",
        "base + lambda * sum(w_i dare(x_i - base))",
        trim=RANDOM,
        elect_sign=False,
        default_normalize=False,
        default_rescale=True,
    ),
    task_arithmetic.make(
        "dare_ties",
        "base + lambda * sum of sign-agreeing w_i dare(x_i - base)",
        trim=RANDOM,
        elect_sign=True,
        default_normalize=False,
        default_rescale=True,
    ),
)
