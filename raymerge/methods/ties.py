"""TIES: trim each task vector to its top-k magnitudes, elect a sign per entry by summed
mass, and average only the entries that agree with it (Yadav et al., 2023).

Trimming is per tensor, as mergekit does it, keeping exactly k = int(density * n) entries;
magnitude ties break toward the lowest flat index so output never depends on sort order.
"""

from __future__ import annotations

from raymerge.methods import task_arithmetic

METHODS = (
    task_arithmetic.make(
        "ties",
        "base + lambda * disjoint_mean_i(topk(w_i (x_i - base)))",
        trim=task_arithmetic.trim_magnitude,
        elect_sign=True,
        default_normalize=True,
        default_rescale=False,
    ),
)
