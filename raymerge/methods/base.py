"""What a merge method is: a pure function of one tensor's inputs, plus its parameters as data.

Methods declare their parameters (name, type, scope, default, range) so a config can be
checked completely before any weight is read, and so the planner can resolve each tensor's
values up front. Scopes follow mergekit: `shared` values are global (top-level
`parameters`), `input` values belong to every input model, `non_base` to every input but the
base.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from raymerge.datastage import DataStage
from raymerge.lazy import torch

REQUIRED = object()
# elements per chunk where CPU work goes chunk by chunk: a chunk's fp32 scratch (1 MiB) stays
# in cache, and a chunk is long enough that torch's per-call overhead stays small (2^16 was
# 1.6x slower per element for the linear kernel)
CPU_CHUNK = 1 << 18
# whole-tensor facts are reduced over blocks of about this many elements (whole rows), so a
# tensor split across work units at block boundaries gives the same facts as a whole one
BLOCK_ELEMENTS = 1 << 20
Scope = Literal["shared", "input", "non_base"]
BasePolicy = Literal["required", "optional", "ignored"]
# what one call of a method's kernel needs to see: any element range, whole rows (the first
# dimension), or the whole tensor (facts such as a top-k threshold or a norm); a `tensor`
# method with fact rounds can still be split: the rounds gather those facts first
Locality = Literal["elementwise", "rows", "tensor"]


@dataclass(frozen=True)
class Param:
    name: str
    type: type
    scope: Scope
    default: Any = REQUIRED
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def validate(self, value: Any, where: str) -> Any:
        """Coerce a config value to this parameter's type; ValueError names `where`."""
        if self.type is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError(f"{where}: {value!r} is not a boolean (true/false)")
        if self.type is str:
            if isinstance(value, str) and (self.choices is None or value in self.choices):
                return value
            raise ValueError(f"{where}: {value!r} is not one of {list(self.choices or [])}")
        if self.type is tuple:  # a set of choices, as a list (or one of them alone)
            items = [value] if isinstance(value, str) else value
            allowed = list(self.choices or [])
            if not isinstance(items, list) or not all(v in allowed for v in items):
                raise ValueError(f"{where}: {value!r} is not a list of {allowed}")
            return tuple(c for c in allowed if c in items)
        number = _as_number(value)
        if number is None or not math.isfinite(number):
            raise ValueError(f"{where}: {value!r} is not a finite number")
        if self.type is int:
            if number != int(number):
                raise ValueError(f"{where}: {value!r} is not an integer")
            number = int(number)
        if (
            self.low is not None
            and number < self.low
            or self.high is not None
            and number > self.high
        ):
            low = "-inf" if self.low is None else f"{self.low:g}"
            high = "inf" if self.high is None else f"{self.high:g}"
            raise ValueError(f"{where}: {value!r} is outside [{low}, {high}]")
        return number


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if isinstance(value, float) else value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def rows_of(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, elements per row): rows run along the first dimension; a vector's rows are its
    elements, a scalar is one row."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], 1
    return shape[0], math.prod(shape[1:])


def block_rows(shape: tuple[int, ...]) -> int:
    """Rows per reduction block of a tensor of `shape` (a function of the shape alone)."""
    return max(1, BLOCK_ELEMENTS // max(1, rows_of(shape)[1]))


@dataclass
class MergeInputs:
    """One output tensor's inputs, in config order, as read (any dtype, on the work device).

    A work unit may hold only rows [row_start, row_start + len) of a tensor whose full shape
    is `shape`; `facts` then carries what the method needs of the whole tensor (gathered by
    its fact rounds), and `models` names each position's input model."""

    name: str
    tensors: list[torch.Tensor]
    base_index: int | None
    shared: dict[str, Any]
    per_input: list[dict[str, Any]]
    seed: int = 0
    shape: tuple[int, ...] | None = None
    row_start: int = 0
    facts: dict[str, Any] | None = None
    models: tuple[int, ...] | None = None

    @property
    def full_shape(self) -> tuple[int, ...]:
        return tuple(self.tensors[0].shape) if self.shape is None else self.shape

    @property
    def numel(self) -> int:
        """Elements of the whole tensor (not only of the rows held)."""
        return math.prod(self.full_shape)

    @property
    def element_start(self) -> int:
        """Flat index, in the whole tensor, of the first element held."""
        return self.row_start * rows_of(self.full_shape)[1]

    def model(self, position: int) -> int:
        return position if self.models is None else self.models[position]

    def rows(self, start: int, end: int) -> MergeInputs:
        """The same inputs restricted to rows [start, end) of those held."""
        tensors = [t[start:end] if t.dim() else t for t in self.tensors]
        return dataclasses.replace(self, tensors=tensors, row_start=self.row_start + start,
                                   shape=self.full_shape)  # fmt: skip

    def blocks(self) -> list[tuple[int, int, int]]:
        """(block index, first row, end row) of each reduction block held, rows relative to
        the rows held; units start at block boundaries."""
        first = self.tensors[0]
        held = first.shape[0] if first.dim() else 1
        step = block_rows(self.full_shape)
        if held == 0:  # an empty tensor: one empty block, so every round sees it
            return [(self.row_start // step, 0, 0)]
        return [
            ((self.row_start + lo) // step, lo, min(lo + step, held)) for lo in range(0, held, step)
        ]

    @property
    def base(self) -> torch.Tensor | None:
        return None if self.base_index is None else self.tensors[self.base_index]

    def task_vectors(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The base and every other input's x_i - base, in the compute dtype (new tensors)."""
        dtype = compute_dtype(self.base)
        base = self.base.to(dtype)
        return base, [tensor.to(dtype) - base for _, tensor, _ in self.others()]

    def others(self) -> list[tuple[int, torch.Tensor, dict[str, Any]]]:
        """The non-base inputs as (position among the inputs, tensor, parameters)."""
        return [
            (i, t, p)
            for i, (t, p) in enumerate(zip(self.tensors, self.per_input))
            if i != self.base_index
        ]


MergeFn = Callable[[MergeInputs], "torch.Tensor"]


@dataclass(frozen=True)
class FactRound:
    """One map-reduce pass that gathers whole-tensor facts.

    `block(inputs, facts)` sees one block of rows and the facts of earlier rounds and returns
    statistics: nested dicts whose leaves are ints or int64 arrays (added up) or lists
    (concatenated: floats are summed with math.fsum, so the order blocks arrive in does not
    matter). `reduce(total, facts, inputs)` turns the totals into the facts passed on;
    `inputs` there carries parameters and shape, its tensors may be empty."""

    block: Callable[[MergeInputs, dict[str, Any]], dict]
    reduce: Callable[[dict, dict[str, Any], MergeInputs], dict[str, Any]]
    # whether the round has anything to do given the facts so far (None: always)
    needed: Callable[[dict[str, Any]], bool] | None = None


# elements a float fact sum takes at a time: torch splits a reduction across threads only
# above its grain size (32768), so each chunk's sum is the same for any thread count
SUM_CHUNK = 1 << 15


def float_sum(values: torch.Tensor) -> float:
    """sum(values) in float64, the same for any torch thread count: chunks of SUM_CHUNK
    elements, each summed on one thread, added in order."""
    flat = values.reshape(-1)
    total = 0.0
    for lo in range(0, flat.numel(), SUM_CHUNK):
        total += float(flat[lo : lo + SUM_CHUNK].sum(dtype=torch.float64))
    return total


def add_stats(total: dict, stats: dict) -> dict:
    """Fold `stats` into `total` (see FactRound): ints and arrays add, lists concatenate."""
    for key, value in stats.items():
        if key not in total:
            total[key] = value.copy() if hasattr(value, "copy") else value
        elif isinstance(value, dict):
            add_stats(total[key], value)
        elif isinstance(value, list):
            total[key] = total[key] + value
        else:
            total[key] = total[key] + value
    return total


def gather_facts(rounds: tuple[FactRound, ...], inputs: MergeInputs) -> dict[str, Any]:
    """Run fact rounds over every block of the rows held (the whole tensor, when a method
    is called on one) exactly as a prepare stage runs them over split tensors."""
    facts: dict[str, Any] = {}
    for fact_round in rounds:
        if fact_round.needed is not None and not fact_round.needed(facts):
            continue
        total: dict = {}
        for _, lo, hi in inputs.blocks():
            add_stats(total, fact_round.block(inputs.rows(lo, hi), facts))
        facts = fact_round.reduce(total, facts, inputs)
    return facts


@dataclass(frozen=True)
class MergeMethod:
    name: str
    merge: MergeFn
    params: tuple[Param, ...]
    base: BasePolicy = "ignored"
    min_inputs: int = 1
    max_inputs: int | None = None
    summary: str = ""
    locality: Locality = "tensor"
    # rounds(shared parameters) -> the fact rounds a split tensor needs first (none: the
    # method needs no whole-tensor fact with these parameters)
    rounds: Callable[[dict[str, Any]], tuple[FactRound, ...]] | None = None
    # whole_model(shared): the facts span every tensor of a model (TIES density_scope:
    # global), so every tensor goes through the prepare stage, split or not
    whole_model: Callable[[dict[str, Any]], bool] | None = None
    # a check of one tensor's resolved parameters, run at plan time: returns a problem or None
    check: Callable[[dict[str, Any], list[dict[str, Any]]], str | None] | None = field(default=None)
    # a check across all tensors' (input models, shared, per-input) parameters at plan time
    check_plan: (
        Callable[[list[tuple[tuple[int, ...], dict, tuple[dict, ...]]]], str | None] | None
    ) = None

    # a stage over data of its own (ZipIt's calibration statistics), run before the merge
    stage: DataStage | None = None
    # row_split(tensor name): a `tensor` method's tensors whose rows each depend only on the
    # same row of the inputs (given the facts), so they may still be cut into row ranges
    row_split: Callable[[str], bool] | None = None

    # scratch(n inputs) -> fp32 words per element the kernel holds at its peak, besides its
    # inputs and output (the plan sizes work units by it); None: a cautious n + 4
    scratch: Callable[[int], float] | None = None

    def scratch_words(self, inputs: int) -> float:
        if self.scratch is not None:
            return self.scratch(inputs)
        return 0.0 if self.elementwise and self.rounds is None else inputs + 4.0

    def spans_model(self, shared: dict[str, Any]) -> bool:
        return self.whole_model is not None and self.whole_model(shared)

    @property
    def elementwise(self) -> bool:
        """Each output element depends only on the same element of the inputs: workers then
        merge in cache-sized chunks, which is several times faster on CPUs."""
        return self.locality == "elementwise"

    # facts_for(shared, ndim): whether a split tensor of that many dimensions needs the
    # rounds at all (None: always; e.g. per-row modes need none for matrices)
    facts_for: Callable[[dict[str, Any], int], bool] | None = None

    def fact_rounds(self, shared: dict[str, Any], ndim: int | None = None) -> tuple[FactRound, ...]:
        """The rounds a tensor needs first; with `ndim`, none where the method's mode for
        such tensors needs no whole-tensor fact."""
        if self.rounds is None:
            return ()
        if ndim is not None and self.facts_for is not None and not self.facts_for(shared, ndim):
            return ()
        return self.rounds(shared)

    def split_problem(self, ndim: int, name: str = "") -> str | None:
        """Why a tensor of `ndim` dimensions (named `name`) cannot be cut into row ranges
        (None: it can)."""
        if self.locality == "elementwise":
            return None
        if self.locality == "rows" or (self.row_split is not None and self.row_split(name)):
            return None if ndim >= 2 else f"{self.name} needs whole rows and a vector is one row"
        if self.rounds is not None:
            return None
        return f"{self.name} cannot split a tensor: it needs the whole tensor at once"

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64; everything else is merged in fp32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32
