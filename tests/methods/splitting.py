"""The check every splittable method passes: merged row range by row range, with the whole
tensor's facts, a tensor gets the bytes of the whole-tensor merge."""

from __future__ import annotations

import json

import torch

from raymerge.methods.base import MergeInputs, MergeMethod, block_rows, gather_facts


def merged_in_pieces(method: MergeMethod, inputs: MergeInputs, facts, cuts) -> torch.Tensor:
    """Each row range [cuts[k], cuts[k + 1]) merged on its own with the whole tensor's facts,
    concatenated."""
    shape = tuple(inputs.tensors[0].shape)
    pieces = []
    for lo, hi in zip(cuts, cuts[1:]):
        rows = [t[lo:hi] for t in inputs.tensors]
        piece = MergeInputs(inputs.name, rows, inputs.base_index, inputs.shared,
                            inputs.per_input, inputs.seed, shape=shape, row_start=lo,
                            facts=facts)  # fmt: skip
        pieces.append(method.merge(piece))
    return torch.cat(pieces)


def assert_split_gives_whole_bytes(method: MergeMethod, inputs: MergeInputs) -> None:
    """Merged in block-aligned row ranges (one block each, and uneven ones), with the facts
    as a prepare stage hands them over (through JSON), the tensor gets the whole's bytes."""
    shape = tuple(inputs.tensors[0].shape)
    step = block_rows(shape)
    assert shape[0] > 3 * step
    facts = json.loads(json.dumps(gather_facts(method.fact_rounds(inputs.shared), inputs)))
    whole = method.merge(inputs)
    for cuts in (list(range(0, shape[0], step)) + [shape[0]], [0, 2 * step, shape[0]]):
        assert torch.equal(merged_in_pieces(method, inputs, facts, cuts), whole)
