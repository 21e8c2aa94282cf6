"""Whole-tensor float facts must not depend on how many threads a worker runs: torch's own
float64 sum of a large tensor changes in the last bits with the thread count."""

from __future__ import annotations

import torch

from raymerge.methods.base import SUM_CHUNK, float_sum


def test_float_sum_is_the_same_for_any_thread_count():
    values = torch.randn(40 * SUM_CHUNK + 123, generator=torch.Generator().manual_seed(5))
    before = torch.get_num_threads()
    try:
        sums = set()
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            sums.add(float_sum(values))
    finally:
        torch.set_num_threads(before)
    assert len(sums) == 1
    assert abs(sums.pop() - float(values.double().sum())) < 1e-9


def test_float_sum_of_nothing_is_zero():
    assert float_sum(torch.empty(0)) == 0.0
