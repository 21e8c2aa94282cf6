"""The check every splittable method passes: merged row range by row range, with the facts
a prepare stage would hand over, a tensor gets the bytes of the whole-tensor merge."""

from __future__ import annotations

import json

import torch

from raymerge.methods import REGISTRY
from raymerge.methods.base import MergeInputs, MergeMethod, block_rows, gather_facts

SPLIT_SHAPE = (3 * 16384 + 100, 64)  # four blocks of rows (BLOCK_ELEMENTS), the last short
# also odd-width rows and a vector of four blocks
SPLIT_SHAPES = [SPLIT_SHAPE, (3 * 149796 + 5, 7), (3 * (1 << 20) + 9,)]


def merge_by_rows(method: str | MergeMethod, tensors, base_index, shared, per_input,
                  name: str = "t", cuts: list[int] | None = None, seed: int = 0):  # fmt: skip
    """(the whole-tensor merge, the row ranges' merges concatenated, the facts): the facts
    gathered over the whole tensor as a prepare stage would, through JSON; `cuts` default to
    one block, two blocks, the rest."""
    m = REGISTRY[method] if isinstance(method, str) else method
    shape = tuple(tensors[0].shape)
    whole = MergeInputs(name, list(tensors), base_index, shared, per_input, seed)
    assert m.split_problem(len(shape)) is None
    facts = json.loads(json.dumps(gather_facts(m.fact_rounds(shared), whole)))
    step = block_rows(shape)
    assert shape[0] > 3 * step, "at least four blocks"
    cuts = cuts or [0, step, 3 * step, shape[0]]
    pieces = []
    for lo, hi in zip(cuts, cuts[1:]):
        rows = [t[lo:hi] for t in tensors]
        pieces.append(m.merge(MergeInputs(name, rows, base_index, shared, per_input, seed,
                                          shape=shape, row_start=lo, facts=facts)))  # fmt: skip
    return m.merge(whole), torch.cat(pieces), facts


def assert_split_gives_whole_bytes(method: MergeMethod, inputs: MergeInputs) -> None:
    """Row ranges of one block each, and uneven ones, give the whole merge's bytes."""
    shape = tuple(inputs.tensors[0].shape)
    step = block_rows(shape)
    for cuts in (list(range(0, shape[0], step)) + [shape[0]], [0, 2 * step, shape[0]]):
        whole, split, _ = merge_by_rows(method, inputs.tensors, inputs.base_index,
                                        inputs.shared, inputs.per_input, inputs.name, cuts,
                                        inputs.seed)  # fmt: skip
        assert torch.equal(split, whole)


def split_ties(fact) -> int:
    """How many blocks a selection's ties at its threshold were handed out over."""
    if not isinstance(fact, dict) or not isinstance(fact["quota"], dict):
        return 0
    return sum(len(blocks) for blocks in fact["quota"].values())


def tied_models(count, dtype, seed, shape=SPLIT_SHAPE):
    """A base and models whose deltas take 13 values (|delta| 7): every selection threshold
    falls inside a run of ties that spans all blocks."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    steps = [torch.randint(-6, 7, shape, generator=g) / 8 for _ in range(count)]
    return base, [(base.double() + s).to(dtype) for s in steps]
