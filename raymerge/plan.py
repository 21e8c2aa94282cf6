"""The plan: a pure function of (spec, input headers, worker memory) that fixes every output
byte's place and cuts the work.

It checks the inputs agree, decides each output tensor's dtype and parameters, groups tensors
into shards and builds each shard's safetensors header (so every tensor's absolute offset is
known before any weight is read). Then two independent cuts:

- *write parts*: contiguous byte ranges of a shard, whole tensors where a tensor is at most
  `WHOLE_TENSOR_LIMIT`, each at least `part_size` bytes except a shard's last. They depend on
  the layout and `part_size` only, never on memory or workers.
- *work units*: the unit of scheduling, retry and resume. A unit lies inside one part and is
  either several whole tensors or a row range of one tensor, sized so one worker's pipeline
  (a unit merging, the next one's inputs fetched, the last one's bytes written) stays within
  the worker memory budget. Row ranges are cut at *blocks* (fixed row ranges that depend on
  the tensor's shape only), and whole-tensor facts are reduced over blocks, so a split tensor
  gives the same bytes as an unsplit one.

Nothing here depends on the number of workers, so the output bytes cannot either.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from raymerge.checkpoint import Checkpoint
from raymerge.datastage import StagePlan
from raymerge.dtypes import FLOAT_DTYPES, itemsize
from raymerge.errors import ConfigError
from raymerge.mapping import RowFill, TensorJob, map_tensors, output_shape, vocab_row_maps
from raymerge.methods import REGISTRY
from raymerge.methods.base import block_rows, rows_of
from raymerge.safetensors_format import TensorEntry, build_header
from raymerge.sizes import human
from raymerge.spec import MergeSpec

if TYPE_CHECKING:
    from raymerge.tokenizer import Vocabulary

# tensors larger than this (or than WHOLE_TENSOR_PARTS parts) are cut across write parts at
# block boundaries: an S3 part may hold at most 5 GiB, and a part's bytes are sent together
WHOLE_TENSOR_LIMIT = 1 << 30
WHOLE_TENSOR_PARTS = 16
# a worker's pipeline holds up to three units at once: merging, prefetched, being written
UNITS_IN_MEMORY = 3
# output bytes whole tensors are grouped into a unit up to (a larger tensor stays whole):
# units of this size kept two workers busy to the end of a linear merge, where units as
# large as a part (64 MiB and more) left one idle at the end and held more memory
UNIT_TARGET_BYTES = 32 << 20
# S3's multipart limits, which every write part respects (so any destination can take it)
MAX_PART_BYTES = 5 << 30
MIN_PART_BYTES = 5 << 20  # except a shard's last part
# with many pending units, tiny ones travel to a worker in batches: one Ray call and one
# ledger write per batch instead of per unit (a Ray call costs ~1 ms of CPU on each side)
BATCH_FROM_UNITS = 512
BATCH_UNITS = 32
BATCH_BYTES = 8 << 20  # a unit that reads more goes alone
MAX_PARTS_PER_SHARD = 10_000


@dataclass(frozen=True)
class InputTensor:
    """Where one input's bytes for an output tensor are."""

    input: int  # index into plan.inputs
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    pad_from: int | None = None  # fewer vocab rows: take the rest from this source position
    # rows matched by token string (mapping.vocab_row_maps): (output row, stored row, count)
    # runs of the rows this input has, and how the others are filled; None: rows by position
    runs: tuple[tuple[int, int, int], ...] | None = None
    fills: tuple[RowFill, ...] = ()

    @property
    def assembled(self) -> bool:
        """Whether a worker copies this input's rows into place (a mapped input that is not
        row for row its stored tensor): its rows are then held twice while merging."""
        if self.runs is None:
            return False
        return bool(self.fills) or self.runs != ((0, 0, self.shape[0]),)

    def fill_bytes(self, row_elements: int) -> int:
        """Bytes of the stored rows its `row` fills read (tokens: overrides), in all."""
        return sum(f.count * itemsize(f.dtype) * row_elements
                   for f in self.fills if f.kind == "row")  # fmt: skip


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: int
    start: int  # absolute offset in the shard file
    end: int
    layer: int | None
    op: str  # "merge", or "copy" for non-float tensors taken from the reference input
    sources: tuple[InputTensor, ...]
    base: int | None  # position of the base within `sources`
    shared: dict[str, Any] = field(default_factory=dict)
    per_input: tuple[dict[str, Any], ...] = ()
    scratch: float = 0.0  # fp32 words per element the method holds at its peak
    shared_row_input: int = 0  # in a batch: input bytes per row all recipes read together
    extra_input: int = 0  # rows matched by token string: bytes a piece may read beside its rows

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def rows(self) -> int:
        return rows_of(self.shape)[0]

    @property
    def row_elements(self) -> int:
        return rows_of(self.shape)[1]

    @property
    def row_bytes(self) -> int:
        return self.nbytes // max(1, self.rows)

    def row_offset(self, row: int) -> int:
        """Where row `row` starts in the shard (absolute); `rows` gives the tensor's end."""
        return self.start + row * self.row_bytes

    @property
    def block_rows(self) -> int:
        return block_rows(self.shape)

    def input_bytes_per_row(self) -> int:
        own = sum(itemsize(s.dtype) * (2 if s.assembled else 1) for s in self.sources)
        return max(own * self.row_elements, self.shared_row_input)

    def bytes_per_row(self) -> tuple[int, int]:
        """(input + output bytes, fp32 scratch bytes) that merging one row takes: a worker
        keeps the first for each unit in its pipeline, the second only while merging."""
        row = self.row_elements
        io = self.input_bytes_per_row() + itemsize(self.dtype) * row
        return io, 0 if self.op == "copy" else int(4 * row * self.scratch)

    def memory_per_row(self) -> int:
        """What one row may cost a worker: its bytes and its scratch in each of the pipeline's
        slots (three units may be in a worker at once, each cut to a third of the budget)."""
        return UNITS_IN_MEMORY * sum(self.bytes_per_row())


@dataclass(frozen=True)
class Part:
    """A contiguous byte range of one shard: the unit of output I/O (an S3 upload part)."""

    shard: int
    number: int  # 1-based, as S3 part numbers are
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def key(self) -> str:
        return f"{self.shard:05d}-{self.number:05d}"


@dataclass(frozen=True)
class PartJob:
    """The pending units of one write part, done by one worker in order: a store that takes a
    part in one call (an S3 upload part) gets the part's bytes together."""

    part: Part
    units: tuple[Unit, ...]

    @property
    def key(self) -> str:
        return f"part-{self.part.key}"

    @property
    def nbytes(self) -> int:
        return self.part.nbytes

    @property
    def input_bytes(self) -> int:
        return sum(u.input_bytes for u in self.units)

    @property
    def label(self) -> str:
        return f"part {self.part.number} of shard {self.part.shard + 1}"


@dataclass(frozen=True)
class UnitBatch:
    """Pending units a worker does one after the other, each written on its own."""

    units: tuple[Unit, ...]

    @property
    def key(self) -> str:
        first, last = self.units[0].key, self.units[-1].key
        return first if len(self.units) == 1 else f"{first}-{last}"

    @property
    def nbytes(self) -> int:
        return sum(u.nbytes for u in self.units)

    @property
    def input_bytes(self) -> int:
        return sum(u.input_bytes for u in self.units)


def unit_batches(units: list[Unit]) -> list[UnitBatch]:
    """Each unit alone, or, with many of them, consecutive tiny ones in batches."""
    if len(units) < BATCH_FROM_UNITS:
        return [UnitBatch((u,)) for u in units]
    batches: list[UnitBatch] = []
    group: list[Unit] = []
    for unit in units:
        if unit.input_bytes > BATCH_BYTES:
            batches.append(UnitBatch((unit,)))
            continue
        size = sum(u.input_bytes for u in group)
        if group and (len(group) == BATCH_UNITS or size + unit.input_bytes > BATCH_BYTES):
            batches.append(UnitBatch(tuple(group)))
            group = []
        group.append(unit)
    if group:
        batches.append(UnitBatch(tuple(group)))
    return batches


@dataclass(frozen=True)
class RecipeUnit:
    """A unit of one recipe of a batch, for the stages that run per recipe."""

    recipe: int
    unit: Unit

    @property
    def key(self) -> str:
        return f"{self.recipe}:{self.unit.key}"

    @property
    def nbytes(self) -> int:
        return self.unit.nbytes

    @property
    def input_bytes(self) -> int:
        return self.unit.input_bytes

    @property
    def work(self) -> float:
        return getattr(self.unit, "work", 0.0)


@dataclass(frozen=True)
class SharedItem:
    """Work items of several recipes (a UnitBatch or a PartJob each) whose units cover the
    same rows, position by position: a worker reads the bytes they share once."""

    members: tuple[tuple[int, UnitBatch | PartJob], ...]  # (recipe, its item)
    whole_parts: bool

    @property
    def key(self) -> str:
        recipe, item = self.members[0]
        return f"{recipe}:{item.key}"

    @property
    def nbytes(self) -> int:
        return sum(item.nbytes for _, item in self.members)

    @property
    def input_bytes(self) -> int:
        return self.members[0][1].input_bytes + self.nbytes  # reads once, writes each

    @property
    def label(self) -> str:
        return f"{len(self.members)} recipe(s)"


def unit_signature(plan: Plan, unit: Unit) -> tuple:
    """Which rows of which tensors a unit covers: units of a batch's recipes with the same
    signature go to a worker together, which reads the bytes they share once."""
    return tuple(
        (plan.tensors[p.tensor].name, plan.tensors[p.tensor].shape, p.row_start, p.row_end)
        for p in unit.pieces
    )  # fmt: skip


def shared_input_rows(plans: list[Plan]) -> dict[str, int]:
    """Tensor name -> input bytes per row that the recipes reading it read together (each
    distinct input once): a shared unit holds that much, so each recipe is cut for it."""
    reads: dict[str, set[tuple]] = {}
    for plan in plans:
        for tensor in plan.tensors:
            keys = reads.setdefault(tensor.name, set())
            for s in tensor.sources:
                keys.add((plan.inputs[s.input], s.file, s.start, s.end, itemsize(s.dtype)))
    row_elements = {t.name: t.row_elements for plan in plans for t in plan.tensors}
    return {name: sum(k[4] for k in keys) * row_elements[name] for name, keys in reads.items()}


def cut_for_shared_reads(plan: Plan, spec: MergeSpec, shared_rows: dict[str, int]) -> Plan:
    """`plan`'s units cut again for the input bytes per row its batch's recipes read
    together (shared_input_rows), so the recipes get the same units and a shared unit stays
    within the memory bound; the layout, the parts and the digest do not change."""
    tensors = tuple(dataclasses.replace(t, shared_row_input=shared_rows.get(t.name, 0))
                    for t in plan.tensors)  # fmt: skip
    units = _cut_units(spec, list(plan.shards), list(tensors), list(plan.parts),
                       plan.worker_memory)  # fmt: skip
    return dataclasses.replace(plan, tensors=tensors, units=tuple(units))


def share_items(plans: list[Plan], items: list[list], whole_parts: bool,
                outputs_per_item: int) -> list[SharedItem]:  # fmt: skip
    """Group the recipes' work items (items[r] for plans[r]) that cover the same rows; a
    group holds at most `outputs_per_item` members where each keeps its output until the
    end (whole parts), so a worker's memory stays in its bound."""
    groups: dict[tuple, list[tuple[int, Any]]] = {}
    for recipe, (plan, recipe_items) in enumerate(zip(plans, items)):
        for item in recipe_items:
            signature = tuple(unit_signature(plan, u) for u in item.units)
            groups.setdefault(signature, []).append((recipe, item))
    size = max(1, outputs_per_item) if whole_parts else len(plans)
    return [
        SharedItem(tuple(members[i : i + size]), whole_parts)
        for members in groups.values() for i in range(0, len(members), size)
    ]  # fmt: skip


@dataclass(frozen=True)
class Piece:
    """Rows [row_start, row_end) of one output tensor (all of it when `whole`)."""

    tensor: int  # index into plan.tensors
    row_start: int
    row_end: int
    whole: bool


@dataclass(frozen=True)
class Unit:
    """The unit of scheduling, retry and resume: bytes [start, end) of one shard, inside one
    write part. The unit that starts a shard also writes its header."""

    index: int
    shard: int
    part: int
    start: int
    end: int
    pieces: tuple[Piece, ...]
    input_bytes: int  # what the worker reads
    io_bytes: int  # inputs + output: what each pipeline slot holds for this unit
    scratch: int  # the largest piece's fp32 scratch while merging

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def key(self) -> str:
        return f"{self.index:06d}"


@dataclass(frozen=True)
class Shard:
    name: str
    size: int
    header: bytes

    @property
    def header_size(self) -> int:
        return len(self.header)


@dataclass(frozen=True)
class Plan:
    method: str
    seed: int
    inputs: tuple[str, ...]  # checkpoint URIs, in spec order
    shards: tuple[Shard, ...]
    tensors: tuple[OutputTensor, ...]  # in shard and offset order
    parts: tuple[Part, ...]
    units: tuple[Unit, ...]
    digest: str
    num_layers: int = 0  # the output's layers (config.json's num_hidden_layers)
    worker_memory: int | None = None
    vocabulary: Vocabulary | None = None  # rows matched by token string: the output's tokens
    stage: StagePlan | None = None  # the method's data stage, as planned (ZipIt's calibration)

    @property
    def bytes_to_write(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def bytes_to_read(self) -> int:
        return sum(src.end - src.start for t in self.tensors for src in t.sources)

    def peak_worker_bytes(self, whole_parts: bool = False) -> int:
        """A bound on one worker's memory for data: every pipeline slot holding the largest
        unit's inputs and output, plus the largest scratch of one merge. With `whole_parts`
        (an S3 destination) a slot holds a whole part's output and one unit's inputs. A
        data stage's item (one at a time per worker) may hold more than the merge."""
        stage = 0 if self.stage is None else self.stage.worker_bytes
        if not self.units:
            return stage
        scratch = max(u.scratch for u in self.units)
        if not whole_parts:
            return max(stage, UNITS_IN_MEMORY * max(u.io_bytes for u in self.units) + scratch)
        slot = max(j.nbytes + max(u.input_bytes for u in j.units) for j in self.part_jobs())
        return max(stage, UNITS_IN_MEMORY * slot + scratch)

    def part_jobs(self, units: list[Unit] | None = None) -> list[PartJob]:
        """`units` (default: all) grouped by the write part they lie in, in part order."""
        by_part: dict[tuple[int, int], list[Unit]] = {}
        for unit in self.units if units is None else units:
            by_part.setdefault((unit.shard, unit.part), []).append(unit)
        return [
            PartJob(p, tuple(sorted(by_part[(p.shard, p.number)], key=lambda u: u.start)))
            for p in self.parts if (p.shard, p.number) in by_part
        ]  # fmt: skip

    def split_tensors(self) -> list[int]:
        """Indexes of the tensors cut across units."""
        return sorted({p.tensor for u in self.units for p in u.pieces if not p.whole})


def make_plan(
    spec: MergeSpec, checkpoints: list[Checkpoint], worker_memory: int | None = None,
    scratch_floor: float = 0.0,
) -> Plan:  # fmt: skip
    """Plan the merge of `checkpoints` (one per spec input, in order); `worker_memory` bounds
    what one worker holds (None: no bound, units are whole parts). A batch plans every
    recipe for the largest scratch of its methods (`scratch_floor`), then cuts it again for
    the inputs its recipes read together (cut_for_shared_reads)."""
    jobs, num_layers = map_tensors(spec, checkpoints)
    vocabulary = None
    if spec.vocab is not None:
        from raymerge.tokenizer import build_vocabulary

        vocabulary = build_vocabulary(spec, checkpoints)
    tensors = [_plan_tensor(spec, checkpoints, job, scratch_floor, vocabulary) for job in jobs]
    _check_across_tensors(spec, tensors)
    shards, placed = _layout(_group_into_shards(tensors, spec.shard_size))
    parts = _cut_parts(shards, placed, spec.part_size, lambda t: split_problem(spec, t))
    units = _cut_units(spec, shards, placed, parts, worker_memory)
    stage = REGISTRY[spec.method.name].stage  # its own inputs are checked last: they cost most
    stage_plan = None if stage is None else stage.plan(spec, checkpoints, tensors, worker_memory)
    plan = Plan(
        method=spec.method.name,
        seed=spec.seed,
        inputs=tuple(c.source.root for c in checkpoints),
        shards=tuple(shards),
        tensors=tuple(placed),
        parts=tuple(parts),
        units=tuple(units),
        digest="",
        num_layers=num_layers,
        worker_memory=worker_memory,
        vocabulary=vocabulary,
        stage=stage_plan,
    )
    return dataclasses.replace(plan, digest=_digest(spec, checkpoints, plan))


def _plan_tensor(spec: MergeSpec, checkpoints: list[Checkpoint], job: TensorJob,
                 scratch_floor: float = 0.0, vocabulary: Vocabulary | None = None,
                 ) -> OutputTensor:  # fmt: skip
    entries = [checkpoints[i].tensors[name] for i, name in job.sources]
    out_slice = spec.slices[job.slice_index]
    reference = out_slice.base if out_slice.base is not None else 0
    maps = None if vocabulary is None else vocab_row_maps(spec, checkpoints, job, vocabulary)
    if maps is None and not all(e.dtype in FLOAT_DTYPES for e in entries):
        source = _input_tensor(job.sources[reference][0], entries[reference])
        first = entries[reference]
        return OutputTensor(
            job.name, first.dtype, first.shape, -1, 0, first.nbytes, job.layer, "copy",
            (source,), None,
        )  # fmt: skip
    shape = output_shape(spec, checkpoints, job) if maps is None else maps[0]
    dtype = spec.out_dtype or entries[reference].dtype
    shared, per_input = spec.resolve(job.slice_index, job.name, [n for _, n in job.sources], job.t)
    if spec.method.check is not None:
        problem = spec.method.check(shared, per_input)
        if problem:
            raise ConfigError(f"{spec.source}: tensor {job.name!r}: {problem}")
    if maps is None:
        sources = tuple(
            _input_tensor(i, entry, shape[0] if entry.shape != shape else None, out_slice.base)
            for (i, _), entry in zip(job.sources, entries)
        )
    else:
        sources = tuple(
            InputTensor(i, e.file, e.dtype, e.shape, e.start, e.end, None, m.runs, m.fills)
            for (i, _), e, m in zip(job.sources, entries, maps[1])
        )  # fmt: skip
    nbytes = math.prod(shape) * itemsize(dtype)
    scratch = max(scratch_floor, REGISTRY[spec.method.name].scratch_words(len(sources)))
    tensor = OutputTensor(
        job.name, dtype, shape, -1, 0, nbytes, job.layer, "merge", sources, out_slice.base,
        shared, tuple(per_input), scratch,
    )  # fmt: skip
    if maps is None:
        return tensor
    return dataclasses.replace(tensor, extra_input=_extra_input(tensor))


def _extra_input(tensor: OutputTensor) -> int:
    """What a piece of a token-matched tensor may read beside its rows: its `row` fills
    (tokens: overrides) and, where rows are padded, one block of rows of every input at a
    time while a worker takes the mean of each input's rows (worker._pad_means)."""
    fills = sum(s.fill_bytes(tensor.row_elements) for s in tensor.sources)
    if not any(f.kind == "pad" for s in tensor.sources for f in s.fills):
        return fills
    return 2 * fills + tensor.block_rows * tensor.input_bytes_per_row()


def _check_across_tensors(spec: MergeSpec, tensors: list[OutputTensor]) -> None:
    method = REGISTRY[spec.method.name]
    if method.check_plan is None:
        return
    merged = [t for t in tensors if t.op == "merge"]
    problem = method.check_plan(
        [(tuple(s.input for s in t.sources), t.shared, t.per_input) for t in merged]
    )
    if problem:
        raise ConfigError(f"{spec.source}: {problem}")


def _input_tensor(
    index: int, entry: TensorEntry, rows: int | None = None, base: int | None = None
) -> InputTensor:
    """Where to read; with `rows`, only the first rows (or all, padded from the base)."""
    if rows is None or rows == entry.shape[0]:
        return InputTensor(index, entry.file, entry.dtype, entry.shape, entry.start, entry.end)
    row_bytes = entry.nbytes // entry.shape[0]
    if rows < entry.shape[0]:
        shape = (rows, *entry.shape[1:])
        return InputTensor(
            index, entry.file, entry.dtype, shape, entry.start, entry.start + rows * row_bytes
        )
    return InputTensor(index, entry.file, entry.dtype, entry.shape, entry.start, entry.end, base)


def _group_into_shards(tensors: list[OutputTensor], shard_size: int) -> list[list[OutputTensor]]:
    """Fill shards in order up to `shard_size` tensor bytes; a larger tensor gets its own."""
    groups: list[list[OutputTensor]] = [[]]
    filled = 0
    for tensor in tensors:
        if groups[-1] and filled + tensor.nbytes > shard_size:
            groups.append([])
            filled = 0
        groups[-1].append(tensor)
        filled += tensor.nbytes
    return groups


def _layout(groups: list[list[OutputTensor]]) -> tuple[list[Shard], list[OutputTensor]]:
    shards, placed = [], []
    count = len(groups)
    for index, group in enumerate(groups):
        name = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        header, offsets = build_header([(t.name, t.dtype, t.shape) for t in group])
        for t, off in zip(group, offsets):
            placed.append(dataclasses.replace(t, shard=index, start=off, end=off + t.nbytes))
        shards.append(Shard(name, len(header) + sum(t.nbytes for t in group), header))
    return shards, placed


def _row_cuts(tensor: OutputTensor, step_bytes: int) -> list[int]:
    """Block-aligned row boundaries inside `tensor`, about `step_bytes` of output apart."""
    block = tensor.block_rows
    step = max(block, (step_bytes // max(1, tensor.row_bytes)) // block * block)
    return list(range(step, tensor.rows, step))


def _cut_parts(shards: list[Shard], tensors: list[OutputTensor], part_size: int,
               split_problem: Callable[[OutputTensor], str | None]) -> list[Part]:  # fmt: skip
    """Whole tensors per part (a tensor over WHOLE_TENSOR_LIMIT, or over WHOLE_TENSOR_PARTS
    parts, is cut at block boundaries if the method can split it), each part at least
    `part_size` bytes except a shard's last; part 1 starts at byte 0. A part holds at most
    part_size + WHOLE_TENSOR_LIMIT bytes (or one unsplittable tensor more), within S3's
    5 GiB."""
    if part_size + WHOLE_TENSOR_LIMIT > MAX_PART_BYTES:
        raise ConfigError(
            f"part_size {human(part_size)} is too large: a write part may then exceed S3's "
            f"5 GiB; use at most {human(MAX_PART_BYTES - WHOLE_TENSOR_LIMIT)}"
        )
    parts: list[Part] = []
    for index, shard in enumerate(shards):
        start, number = 0, 1
        for tensor in (t for t in tensors if t.shard == index):
            ends = [tensor.end]
            if tensor.nbytes > min(WHOLE_TENSOR_LIMIT, WHOLE_TENSOR_PARTS * part_size):
                problem = split_problem(tensor)
                if problem is None:
                    ends = [tensor.row_offset(r) for r in _row_cuts(tensor, part_size)] + ends
                elif tensor.end - start > MAX_PART_BYTES:
                    raise ConfigError(
                        f"tensor {tensor.name!r} {list(tensor.shape)} ({human(tensor.nbytes)}) "
                        f"must be written whole ({problem}), but a write part may hold at "
                        f"most {human(MAX_PART_BYTES)} (S3's limit); merge it with a method "
                        "that splits tensors"
                    )
            for end in ends:
                if end - start >= part_size:
                    parts.append(Part(index, number, start, end))
                    start, number = end, number + 1
        if start < shard.size or number == 1:
            parts.append(Part(index, number, start, shard.size))
            number += 1
        if number - 1 > MAX_PARTS_PER_SHARD:
            raise ConfigError(
                f"shard {shard.name} would be written in {number - 1} parts of "
                f"{human(part_size)}, more than S3's {MAX_PARTS_PER_SHARD}; raise part_size "
                f"to at least {human(-(-shard.size // MAX_PARTS_PER_SHARD))} or lower shard_size"
            )
    return parts


def _cut_units(
    spec: MergeSpec, shards: list[Shard], tensors: list[OutputTensor], parts: list[Part],
    memory: int | None,
) -> list[Unit]:  # fmt: skip
    """Whole tensors grouped within a part while a worker's pipeline can hold them (`memory`
    bytes) and their output stays within UNIT_TARGET_BYTES; a tensor that does not fit (or
    spans parts) is cut into block-aligned row ranges."""
    units: list[Unit] = []
    by_shard: dict[int, list[int]] = {}
    for i, t in enumerate(tensors):
        by_shard.setdefault(t.shard, []).append(i)
    for part in parts:
        group: list[Piece] = []
        for i in by_shard.get(part.shard, []):
            tensor = tensors[i]
            if tensor.end <= part.start or tensor.start >= part.end:
                continue
            pieces = _pieces(spec, i, tensor, part, memory)
            if len(pieces) == 1 and pieces[0].whole:
                grown = group + pieces
                if group and (_output_bytes(tensors, grown) > UNIT_TARGET_BYTES or (
                    memory is not None and _cost(tensors, grown) > memory
                )):  # fmt: skip
                    units.append(_unit(len(units), part, tensors, shards, group))
                    group = []
                group += pieces
                continue
            if group:
                units.append(_unit(len(units), part, tensors, shards, group))
                group = []
            for piece in pieces:
                units.append(_unit(len(units), part, tensors, shards, [piece]))
        if group:
            units.append(_unit(len(units), part, tensors, shards, group))
    return units


def _pieces(
    spec: MergeSpec, index: int, tensor: OutputTensor, part: Part, memory: int | None
) -> list[Piece]:
    """The pieces of `tensor` inside `part`: the whole tensor when it fits, else row ranges."""
    row_bytes = max(1, tensor.row_bytes)
    first = max(0, (part.start - tensor.start) // row_bytes)
    last = tensor.rows if tensor.end <= part.end else (part.end - tensor.start) // row_bytes
    per_row = tensor.memory_per_row()
    extra = UNITS_IN_MEMORY * tensor.extra_input  # 0 but for rows matched by token string
    whole_in_part = first == 0 and last == tensor.rows
    if whole_in_part and (memory is None or per_row * tensor.rows + extra <= memory):
        return [Piece(index, 0, tensor.rows, True)]
    if memory is not None and per_row * tensor.block_rows + extra > memory:
        raise ConfigError(_too_big(tensor, per_row * tensor.block_rows + extra, memory, "block"))
    _check_splittable(spec, tensor, per_row * tensor.rows + extra, memory)
    step_rows = tensor.rows if memory is None else (memory - extra) // per_row
    step_rows = max(tensor.block_rows, step_rows // tensor.block_rows * tensor.block_rows)
    cuts = list(range(first, last, step_rows)) + [last]
    return [Piece(index, lo, hi, False) for lo, hi in zip(cuts, cuts[1:])]


def split_problem(spec: MergeSpec, tensor: OutputTensor) -> str | None:
    """Why the method cannot cut `tensor` into row ranges (None: it can, or copies it)."""
    if tensor.op == "copy":
        return None
    return REGISTRY[spec.method.name].split_problem(len(tensor.shape), tensor.name)


def _check_splittable(spec: MergeSpec, tensor: OutputTensor, need: int, memory: int | None):
    problem = split_problem(spec, tensor)
    if problem is not None:
        raise ConfigError(_too_big(tensor, need, memory, problem))


def _too_big(tensor: OutputTensor, need: int, memory: int | None, why: str) -> str:
    if why == "block":
        return (
            f"tensor {tensor.name!r} {list(tensor.shape)}: one block of rows needs "
            f"{human(need)} per worker, more than --worker-memory {human(memory or 0)}; "
            f"raise --worker-memory to at least {human(need)}"
        )
    return (
        f"tensor {tensor.name!r} {list(tensor.shape)} needs {human(need)} per worker to merge "
        f"whole, more than --worker-memory {human(memory or 0)}, and {why}; raise "
        f"--worker-memory to at least {human(need)}"
    )


def _io_and_scratch(tensors: list[OutputTensor], pieces: list[Piece]) -> tuple[int, int]:
    """(inputs + outputs of every piece, the largest piece's scratch)."""
    io, scratch = 0, 0
    for p in pieces:
        row_io, row_scratch = tensors[p.tensor].bytes_per_row()
        io += row_io * (p.row_end - p.row_start) + tensors[p.tensor].extra_input
        scratch = max(scratch, row_scratch * (p.row_end - p.row_start))
    return io, scratch


def _output_bytes(tensors: list[OutputTensor], pieces: list[Piece]) -> int:
    return sum(tensors[p.tensor].row_bytes * (p.row_end - p.row_start) for p in pieces)


def _cost(tensors: list[OutputTensor], pieces: list[Piece]) -> int:
    """What a worker needs if all its pipeline slots held units like this one: then any
    three units in flight (one merging) fit the budget."""
    io, scratch = _io_and_scratch(tensors, pieces)
    return UNITS_IN_MEMORY * (io + scratch)


def _unit(index: int, part: Part, tensors: list[OutputTensor], shards: list[Shard],
          pieces: list[Piece]) -> Unit:  # fmt: skip
    """A unit covering its pieces' bytes; the first unit of a part starts at the part."""
    if pieces:
        first, last = tensors[pieces[0].tensor], tensors[pieces[-1].tensor]
        start = first.row_offset(pieces[0].row_start)
        end = last.row_offset(pieces[-1].row_end)
    else:
        start = end = part.end
    if start <= shards[part.shard].header_size:
        start = part.start  # the header (and any padding) goes with the first tensor
    inputs = sum(tensors[p.tensor].input_bytes_per_row() * (p.row_end - p.row_start)
                 + tensors[p.tensor].extra_input for p in pieces)  # fmt: skip
    _, scratch = _io_and_scratch(tensors, pieces)
    return Unit(index, part.shard, part.number, start, end, tuple(pieces), inputs,
                inputs + end - start, scratch)  # fmt: skip


def _digest(spec: MergeSpec, checkpoints: list[Checkpoint], plan: Plan) -> str:
    """Identifies the merge: same spec, same input files, same layout and the same raymerge
    version give the same value (units are not in it: they change with --worker-memory)."""
    from raymerge import __version__

    record = {
        "version": __version__,
        "spec": spec.to_json(),
        "inputs": [sorted(c.fingerprints.items()) for c in checkpoints],
        "shards": [(s.name, s.size) for s in plan.shards],
        "parts": [(p.shard, p.number, p.start, p.end) for p in plan.parts],
        "tensors": [
            (t.name, t.dtype, t.shape, t.start, t.op, t.shared, t.per_input) for t in plan.tensors
        ],
    }
    if plan.vocabulary is not None:  # the tokenizer files read and the vocabulary built
        record["vocabulary"] = plan.vocabulary.digest
    if plan.stage is not None:  # the stage's own inputs (calibration data)
        record["stage"] = plan.stage.fingerprint
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), default=list)
    return hashlib.sha256(text.encode()).hexdigest()
