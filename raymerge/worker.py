"""Doing one work unit: read its input rows, merge each piece, write its bytes in place.

A worker runs up to three units at once as a pipeline: one fetching its inputs, one
merging, one writing (each stage has its own lock, so the stages of different units
overlap while each stage runs one unit at a time; reads, torch kernels, CRCs and writes all
release the GIL). Memory stays within the plan's bound: three units' buffers at most.
Tensors never leave the worker: it returns checksums, statistics and timings.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from raymerge.checksum import checksum
from raymerge.dtypes import itemsize, torch_dtype
from raymerge.errors import MergeFailed, RaymergeError
from raymerge.lazy import torch
from raymerge.methods import REGISTRY
from raymerge.methods.base import CPU_CHUNK, SUM_CHUNK, MergeInputs, add_stats, rows_of
from raymerge.plan import OutputTensor, PartJob, Piece, RecipeUnit, SharedItem, Unit, UnitBatch
from raymerge.pool import inject_fault
from raymerge.storage import open_destination, open_source, s3
from raymerge.storage.base import Destination, Source
from raymerge.storage.s3 import S3Settings

PIPELINE_DEPTH = 3  # units in a worker at once: fetching, merging, writing


@dataclass(frozen=True)
class WorkContext:
    """What every worker needs besides the units themselves; sent once per actor."""

    method: str
    seed: int
    inputs: tuple[str, ...]  # source roots, indexed by InputTensor.input
    destination: str
    shard_names: tuple[str, ...]
    shard_headers: tuple[bytes, ...]
    shard_tokens: tuple[str, ...]  # what Destination.write_part needs, per shard
    tensors: tuple[OutputTensor, ...]
    device: str = "cpu"
    s3: S3Settings = S3Settings()  # how to reach S3 (never credentials: each node's own)


@dataclass
class UnitResult:
    key: str
    index: int
    checksums: list[tuple[int, int, int, str]]  # (tensor, row start, row end, CRC-32)
    bytes_read: int = 0
    bytes_written: int = 0
    receipt: str = ""
    seconds_read: float = 0.0
    seconds_merge: float = 0.0
    seconds_write: float = 0.0
    worker: str = field(default_factory=lambda: f"{os.uname().nodename}:{os.getpid()}")


ALIGN = 64  # every input carved from a slot's arena starts on a cache line


class _Slot:
    """Reusable buffers for one unit in flight: one arena for all its inputs, one for its
    output (fresh allocations page-fault on first use; one arena each keeps a slot's
    memory at the largest unit's, as the plan's bound assumes)."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.buffers: dict[str, torch.Tensor] = {}
        self.used = 0

    def buffer(self, key: str, nbytes: int) -> torch.Tensor:
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < nbytes:
            self.buffers.pop(key, None)  # free the old one first
            buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.pin)
            self.buffers[key] = buffer
        return buffer[:nbytes]

    def start_inputs(self, nbytes: int) -> None:
        """Size the input arena for a unit that reads `nbytes` in all."""
        self.buffer("in", nbytes)
        self.used = 0

    def carve(self, nbytes: int) -> torch.Tensor:
        start = self.used
        self.used = -(-(start + nbytes) // ALIGN) * ALIGN
        return self.buffers["in"][start : start + nbytes]


class _Pipeline:
    """The slots and stage locks of one worker: shared by every recipe a worker merges, so
    a batch of recipes holds no more buffers than one merge."""

    def __init__(self, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self.slots = [_Slot(cuda) for _ in range(PIPELINE_DEPTH)]
        # host-to-device copies run on their own stream, so the next unit's copy overlaps
        # this unit's kernels; the merge stage waits for its own copies' event
        self.copies = torch.cuda.Stream(device) if cuda else None
        self.free = threading.Semaphore(PIPELINE_DEPTH)
        self.slot_lock = threading.Lock()
        self.fetching, self.merging, self.writing = (threading.Lock() for _ in range(3))


class UnitRunner:
    """Holds the open sources, the destination and the pipeline for a worker's lifetime."""

    def __init__(self, context: WorkContext, pipeline: _Pipeline | None = None,
                 sources: dict[str, Source] | None = None) -> None:  # fmt: skip
        self.context = context
        s3.configure(context.s3)
        opened = {} if sources is None else sources  # by root: shared across recipes
        for root in context.inputs:
            if root not in opened:
                opened[root] = open_source(root)
        self.sources: list[Source] = [opened[root] for root in context.inputs]
        self.destination: Destination = open_destination(context.destination)
        self.device = torch.device(context.device)
        self.method = REGISTRY[context.method]
        self.chunk = CPU_CHUNK if self.device.type == "cpu" else None
        pipeline = pipeline or _Pipeline(self.device)
        self._slots, self._copies, self._free = pipeline.slots, pipeline.copies, pipeline.free
        self._slot_lock = pipeline.slot_lock
        self._fetching, self._merging, self._writing = (
            pipeline.fetching, pipeline.merging, pipeline.writing
        )  # fmt: skip
        self._by_name: dict[str, OutputTensor] | None = None  # for read_input
        self._pad_lock = threading.Lock()
        self._pad_cache: dict[int, list] = {}  # tensor -> each source's mean row (_pad_means)

    def run(self, unit: Unit, facts: dict[int, dict] | None = None) -> UnitResult:
        """Merge `unit` (facts: per split tensor, what its prepare stage found) and write it."""
        with self._slot() as slot:
            out = slot.buffer("out", unit.nbytes)
            result = self._produce(slot, unit, out, facts)
            with self._writing:
                started = time.perf_counter()
                result.receipt = self._write(unit.shard, unit.part, unit.start, out)
                result.seconds_write = time.perf_counter() - started
            return result

    def run_batch(self, batch: UnitBatch, facts: dict[int, dict] | None = None) -> list:
        """The batch's units one after the other (tiny units: one call for many)."""
        return [self.run(unit, facts) for unit in batch.units]

    def run_part(self, job: PartJob, facts: dict[int, dict] | None = None) -> list[UnitResult]:
        """Merge every unit of one write part into one buffer, then send the part in one call
        (an S3 upload part); each unit's result carries the part's receipt."""
        return _run_parts([(self, job, facts)], catch=False)[0]

    def _produce(self, slot: _Slot, unit: Unit, out: torch.Tensor, facts) -> UnitResult:
        """Read the unit's inputs into the slot, merge them into `out`."""
        result = UnitResult(unit.key, unit.index, [])
        inputs = self._fetch(slot, unit, result)
        self._merge_unit(unit, out, inputs, facts, result)
        return result

    def _fetch(self, slot: _Slot, unit: Unit, result: UnitResult) -> list:
        """The unit's input rows, read into the slot."""
        return _fetch_shared(slot, [(self, unit)], result)[0]

    def _merge_unit(self, unit: Unit, out: torch.Tensor, inputs: list, facts,
                    result: UnitResult) -> None:  # fmt: skip
        with self._merging:
            started = time.perf_counter()
            self._arrived(inputs)
            self._fill(unit, out, inputs, facts or {}, result)
            result.seconds_merge = time.perf_counter() - started
        result.bytes_written = unit.nbytes

    def _write(self, shard: int, part: int, offset: int, out: torch.Tensor) -> str:
        name, token = self.context.shard_names[shard], self.context.shard_tokens[shard]
        return self.destination.write_part(name, token, part, offset, out.numpy())

    def statistic(self, unit: Unit, request: dict[str, Any]) -> dict[int, dict]:
        """Round `request["round"]` of the fact rounds, for the unit's pieces of the tensors
        in `request["facts"]` (their facts so far): statistics per tensor."""
        stats: dict[int, dict] = {}
        wanted = request["facts"]
        with self._slot() as slot:
            discarded = UnitResult(unit.key, unit.index, [])  # byte counts nobody reads
            slot.start_inputs(self._arena_bytes(unit))
            for piece in unit.pieces:
                if piece.tensor not in wanted:
                    continue
                tensor = self.context.tensors[piece.tensor]
                rounds = self.method.fact_rounds(tensor.shared, len(tensor.shape))
                fact_round = rounds[request["round"]]
                with self._fetching:
                    tensors = self._read_piece(slot, piece, discarded)
                facts = wanted[piece.tensor]
                inputs = self._inputs(tensor, piece, tensors, facts)
                total: dict = {}
                with self._merging:
                    self._arrived([tensors])
                    for _, lo, hi in inputs.blocks():
                        add_stats(total, fact_round.block(inputs.rows(lo, hi), facts))
                stats[piece.tensor] = total
        return stats

    def stage(self, item: Any, request: dict[str, Any]) -> Any:
        """Step `request["step"]` of the method's data stage, for one of its items."""
        step = self.method.stage.step(request["step"])
        with self._merging:  # one stage item at a time holds a worker's memory
            return step.run(self, item, request["data"])

    def read_input(self, name: str, position: int) -> torch.Tensor:
        """Input `position`'s whole tensor for the output tensor `name`, as stored (a data
        stage reads weights by name: ZipIt's forward takes one layer at a time)."""
        if self._by_name is None:
            self._by_name = {t.name: t for t in self.context.tensors}
        tensor = self._by_name.get(name)
        if tensor is None:
            raise KeyError(name)
        source = tensor.sources[position]
        raw = torch.empty(source.end - source.start, dtype=torch.uint8)
        if raw.numel():
            self.sources[source.input].readinto(source.file, source.start,
                                                memoryview(raw.numpy()))  # fmt: skip
        return raw.view(torch_dtype(source.dtype)).reshape(source.shape)

    @contextmanager
    def _slot(self) -> Iterator[_Slot]:
        """One of the pipeline's buffer sets; waits while all are in use."""
        with self._free:
            with self._slot_lock:
                slot = self._slots.pop()
            try:
                yield slot
            finally:
                with self._slot_lock:
                    self._slots.append(slot)

    def _arena_bytes(self, unit: Unit) -> int:
        """The unit's input bytes read into the arena, each rounded up to ALIGN."""
        return sum(
            self._arena_share(source, start, n)
            for p in unit.pieces
            for _, source, start, n in self._source_reads(p)
        )

    def _arena_share(self, source, start: int, nbytes: int) -> int:
        """What one read takes of the arena: nothing when the file is mapped instead."""
        return 0 if self._maps(source, start, nbytes) else _aligned(nbytes)

    def _maps(self, source, start: int, nbytes: int) -> bool:
        """Whether a read is served by mapping the file instead of copying it into the
        arena: on a CPU worker (a GPU's copies want pinned buffers), from a local file, at
        an offset aligned for the dtype. Mapping skips a copy of every input byte and the
        arena's fresh pages (on this machine a linear merge's read and merge ran 1.8x
        faster)."""
        return (
            self._copies is None
            and nbytes > 0
            and start % itemsize(source.dtype) == 0
            and hasattr(self.sources[source.input], "map_range")
        )

    @staticmethod
    def _rows_held(source, piece: Piece) -> int:
        """The piece's rows this source has (fewer where its vocabulary is smaller)."""
        return max(0, min(piece.row_end, rows_of(source.shape)[0]) - piece.row_start)

    def _source_reads(self, piece: Piece) -> list[tuple[tuple, Any, int, int]]:
        """(key, source, start, bytes) of each input the piece reads; the key names the
        bytes (same key, same bytes), so recipes of a batch read them once."""
        tensor = self.context.tensors[piece.tensor]
        reads = []
        for source in tensor.sources:
            if source.runs is not None:
                reads += self._mapped_reads(tensor, source, piece)
                continue
            row_bytes = itemsize(source.dtype) * tensor.row_elements
            start = source.start + piece.row_start * row_bytes
            nbytes = self._rows_held(source, piece) * row_bytes
            key = (self.context.inputs[source.input], source.file, start, nbytes, source.dtype)
            reads.append((key, source, start, nbytes))
        return reads

    def _mapped_reads(self, tensor: OutputTensor, source, piece: Piece) -> list:
        """A source whose rows are matched by token string: one read per run of consecutive
        stored rows it gives the piece's output rows, one per `row` fill among them (a
        tokens: override's row); nothing for the other fills."""
        reads = []
        root = self.context.inputs[source.input]
        row_bytes = itemsize(source.dtype) * tensor.row_elements
        for _, src, count in _runs_in(source.runs, piece.row_start, piece.row_end):
            start, nbytes = source.start + src * row_bytes, count * row_bytes
            reads.append(((root, source.file, start, nbytes, source.dtype), source, start, nbytes))
        for fill, lo, count in _fills_in(source.fills, piece.row_start, piece.row_end):
            if fill.kind == "row":
                fill_row = itemsize(fill.dtype) * tensor.row_elements
                start, nbytes = fill.start + (lo - fill.out_start) * fill_row, count * fill_row
                key = (self.context.inputs[fill.input], fill.file, start, nbytes, fill.dtype)
                reads.append((key, fill, start, nbytes))
        return reads

    def _read_source(self, slot: _Slot, source, start: int, nbytes: int,
                     result: UnitResult) -> torch.Tensor:  # fmt: skip
        """`nbytes` of one input from `start`, in its stored dtype, on the work device."""
        reader = self.sources[source.input]
        if self._maps(source, start, nbytes):
            raw = torch.frombuffer(reader.map_range(source.file, start, nbytes), dtype=torch.uint8)
        else:
            raw = slot.carve(nbytes)
            if raw.numel():
                reader.readinto(source.file, start, memoryview(raw.numpy()))
        result.bytes_read += raw.numel()
        return self._to_device(raw.view(torch_dtype(source.dtype)))

    def _read_piece(self, slot: _Slot, piece: Piece, result: UnitResult) -> list:
        """The piece's rows of every input, in their stored dtypes, on the work device."""
        reads = self._source_reads(piece)
        tensors = [self._read_source(slot, s, start, n, result) for _, s, start, n in reads]
        return self._assemble(piece, tensors)

    def _assemble(self, piece: Piece, tensors: list) -> list:
        """The piece's inputs shaped as rows of the output tensor (`tensors`: what
        `_source_reads` names, in its order): where a source has fewer vocab rows, the rest
        come from the source it pads from; rows matched by token string are put in place
        and filled (`_arrange`). On a GPU this runs on the copy stream, after the copies."""
        tensor = self.context.tensors[piece.tensor]
        rows = piece.row_end - piece.row_start
        shape = (rows, *tensor.shape[1:]) if tensor.shape else ()
        on_copies = (
            torch.cuda.stream(self._copies) if self._copies is not None
            else contextlib.nullcontext()
        )  # fmt: skip
        with on_copies:
            if any(s.runs is not None for s in tensor.sources):
                return [t.reshape(shape) for t in self._arrange(piece, tensors, self.device)]
            tensors = list(tensors)
            for position, source in enumerate(tensor.sources):
                if source.pad_from is not None:
                    full = rows * tensor.row_elements
                    rest = tensors[source.pad_from][tensors[position].numel() : full]
                    tensors[position] = torch.cat(
                        [tensors[position], rest.to(tensors[position].dtype)]
                    )
            return [t.reshape(shape) for t in tensors]

    def _arrange(self, piece: Piece, tensors: list, device: torch.device) -> list:
        """Each source's rows [row_start, row_end) of a tensor whose rows are matched by
        token string, as (rows, row elements) in its stored dtype: its own runs put in place
        (a source that is its stored rows there is used as read), then the other rows
        filled from the sources' own rows (`copy`, `mean` in float64, rounded once), zeros,
        an override's rows, or the source's mean row (`pad`)."""
        tensor = self.context.tensors[piece.tensor]
        lo, hi = piece.row_start, piece.row_end
        rows, width = hi - lo, tensor.row_elements
        reads = iter(tensors)
        held, pending = [], []
        for source in tensor.sources:
            own = [(a - lo, n, next(reads)) for a, _, n in _runs_in(source.runs, lo, hi)]
            fills = [(f, a - lo, n, next(reads) if f.kind == "row" else None)
                     for f, a, n in _fills_in(source.fills, lo, hi)]  # fmt: skip
            if not fills and len(own) == 1 and own[0][:2] == (0, rows):
                held.append(own[0][2].view(rows, width))
                pending.append(())
                continue
            out = torch.empty((rows, width), dtype=torch_dtype(source.dtype), device=device)
            for a, n, read in own:
                out[a : a + n].copy_(read.view(n, width))
            held.append(out)
            pending.append(fills)
        for position, fills in enumerate(pending):
            target = held[position]
            for fill, a, n, read in fills:
                rows_of_fill = target[a : a + n]
                if fill.kind == "zero":
                    rows_of_fill.zero_()
                elif fill.kind == "row":
                    rows_of_fill.copy_(read.view(n, width))
                elif fill.kind == "copy":
                    rows_of_fill.copy_(held[fill.positions[0]][a : a + n])
                elif fill.kind == "mean":
                    total = torch.zeros((n, width), dtype=torch.float64, device=device)
                    for q in fill.positions:
                        total += held[q][a : a + n]
                    rows_of_fill.copy_(total / len(fill.positions))
                elif fill.kind == "pad":
                    mean = self._pad_means(piece.tensor)[position].to(device)
                    rows_of_fill.copy_(mean.expand(n, width))
                else:
                    raise MergeFailed(f"{tensor.name!r}: unknown row fill {fill.kind!r}")
        return held

    def _pad_means(self, index: int) -> list:
        """Per source of tensor `index`: the mean of its rows before the padding (what
        mergekit puts in pad_to_multiple_of rows), in its stored dtype, on the CPU. The rows
        are read again block by block through `_source_reads` and `_arrange` and summed in
        float64 in a fixed order, so every unit (whole or split) gets the same mean; kept for
        the worker's lifetime."""
        with self._pad_lock:
            if index in self._pad_cache:
                return self._pad_cache[index]
            tensor = self.context.tensors[index]
            vocab = min(f.out_start for s in tensor.sources for f in s.fills if f.kind == "pad")
            totals = [torch.zeros(tensor.row_elements, dtype=torch.float64)
                      for _ in tensor.sources]  # fmt: skip
            slot, cpu = _Slot(False), torch.device("cpu")
            for lo in range(0, vocab, tensor.block_rows):
                block = Piece(index, lo, min(lo + tensor.block_rows, vocab), False)
                reads = self._source_reads(block)
                slot.start_inputs(sum(_aligned(n) for *_, n in reads))
                raw = []
                for _, source, start, nbytes in reads:
                    buffer = slot.carve(nbytes)
                    if nbytes:
                        self.sources[source.input].readinto(
                            source.file, start, memoryview(buffer.numpy())
                        )
                    raw.append(buffer.view(torch_dtype(source.dtype)))
                for total, rows in zip(totals, self._arrange(block, raw, cpu)):
                    _add_columns(total, rows)
            means = [(total / vocab).to(torch_dtype(source.dtype))
                     for total, source in zip(totals, tensor.sources)]  # fmt: skip
            self._pad_cache[index] = means
            return means

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        if self._copies is None:
            return host
        with torch.cuda.stream(self._copies):
            return host.to(self.device, non_blocking=True)

    def _arrived(self, inputs: list[list]) -> None:
        """On a GPU: make the compute stream wait for these inputs' copies (and keep their
        memory from being reused before it is done with them)."""
        if self._copies is None:
            return
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self._copies)
        for tensors in inputs:
            for tensor in tensors:
                tensor.record_stream(compute)

    def _inputs(self, tensor: OutputTensor, piece: Piece, tensors: list, facts) -> MergeInputs:
        return MergeInputs(
            tensor.name, tensors, tensor.base, tensor.shared, list(tensor.per_input),
            self.context.seed, tensor.shape, piece.row_start, facts,
            tuple(s.input for s in tensor.sources),
        )  # fmt: skip

    def _fill(self, unit: Unit, out: torch.Tensor, inputs: list, facts: dict, result) -> None:
        if unit.start == 0:
            header = self.context.shard_headers[unit.shard]
            out.numpy()[: len(header)] = memoryview(header)
        view = out.numpy()
        for piece, tensors in zip(unit.pieces, inputs):
            tensor = self.context.tensors[piece.tensor]
            lo = tensor.row_offset(piece.row_start) - unit.start
            hi = tensor.row_offset(piece.row_end) - unit.start
            target = out[lo:hi]
            if tensor.op == "copy":
                target.copy_(tensors[0].reshape(-1).view(torch.uint8))
            else:
                self._merge_into(tensor, piece, tensors, facts.get(piece.tensor), target)
            result.checksums.append((piece.tensor, piece.row_start, piece.row_end,
                                     checksum(view[lo:hi])))  # fmt: skip

    def _merge_into(self, tensor: OutputTensor, piece: Piece, tensors: list, facts,
                    out: torch.Tensor) -> None:  # fmt: skip
        target = _typed_view(out, tensor.dtype)
        if not piece.whole and facts is None and self.method.fact_rounds(
            tensor.shared, len(tensor.shape)
        ):
            raise MergeFailed(f"{tensor.name!r} is split but its prepare stage gave no facts")
        rows = piece.row_end - piece.row_start
        shape = (rows, *tensor.shape[1:]) if tensor.shape else ()
        chunked = self.method.elementwise and self.method.rounds is None and self.chunk
        if chunked:  # each chunk as a flat piece of the flat tensor, at its own offset
            flat = [x.reshape(-1) for x in tensors]
            first = piece.row_start * tensor.row_elements
            for lo in range(0, target.numel(), self.chunk):
                hi = min(lo + self.chunk, target.numel())
                chunk = [x[lo:hi] for x in flat]
                merged = self._merge(tensor, piece, chunk, facts, (hi - lo,), first + lo)
                target[lo:hi].copy_(merged)
        else:
            target.copy_(self._merge(tensor, piece, tensors, facts, shape).reshape(-1))
        if target.data_ptr() != out.data_ptr():  # a misaligned tensor was merged into scratch
            out.copy_(target.view(torch.uint8))

    def _merge(self, tensor, piece, tensors, facts, expected, flat_start=None) -> torch.Tensor:
        inputs = self._inputs(tensor, piece, tensors, facts)
        if flat_start is not None:  # a flat chunk: rows are elements of the flat tensor
            inputs = dataclasses.replace(inputs, shape=(math.prod(tensor.shape),),
                                         row_start=flat_start)  # fmt: skip
        merged = self.method.merge(inputs)
        if tuple(merged.shape) != tuple(expected):
            raise MergeFailed(
                f"{self.context.method} returned shape {list(merged.shape)} for {tensor.name!r}, "
                f"expected {list(expected)}"
            )
        return merged


@dataclass(frozen=True)
class BatchContext:
    """What a worker of a batch needs: each recipe's WorkContext, under its name."""

    names: tuple[str, ...]
    recipes: tuple[WorkContext, ...]


class SharedRunner:
    """A batch's worker: one UnitRunner per recipe over one pipeline and one set of open
    sources. A shared item's inputs are read once, then merged and written for each recipe;
    a recipe whose merge fails gets its error back and the others go on."""

    def __init__(self, context: BatchContext) -> None:
        pipeline = _Pipeline(torch.device(context.recipes[0].device))
        sources: dict[str, Source] = {}
        self.names = context.names
        self.runners = [UnitRunner(c, pipeline, sources) for c in context.recipes]

    def statistic(self, item: RecipeUnit, request: dict[str, Any]) -> dict[int, dict]:
        return self.runners[item.recipe].statistic(item.unit, request)

    def stage(self, item: RecipeUnit, request: dict[str, Any]) -> Any:
        return self.runners[item.recipe].stage(item.unit, request)

    def run_shared(self, item: SharedItem, facts: list | None = None) -> list:
        """Per member: its results (as run_batch or run_part give them), or its error."""
        members = [
            (self.runners[recipe], work, None if facts is None else facts[m], self.names[recipe])
            for m, (recipe, work) in enumerate(item.members)
        ]  # fmt: skip
        if item.whole_parts:
            return _run_parts(members, catch=True)
        return _run_units(members)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _runs_in(runs, lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
    """The (output row, stored row, count) runs clipped to output rows [lo, hi)."""
    i = max(0, bisect.bisect_right(runs, lo, key=lambda run: run[0]) - 1)
    while i < len(runs) and runs[i][0] < hi:
        out, src, count = runs[i]
        a, b = max(out, lo), min(out + count, hi)
        if a < b:
            yield a, src + a - out, b - a
        i += 1


def _fills_in(fills, lo: int, hi: int) -> Iterator[tuple[Any, int, int]]:
    """(fill, first output row, count) of the fills clipped to output rows [lo, hi)."""
    i = max(0, bisect.bisect_right(fills, lo, key=lambda fill: fill.out_start) - 1)
    while i < len(fills) and fills[i].out_start < hi:
        fill = fills[i]
        a, b = max(fill.out_start, lo), min(fill.out_start + fill.count, hi)
        if a < b:
            yield fill, a, b - a
        i += 1


def _add_columns(total: torch.Tensor, rows: torch.Tensor) -> None:
    """total += the column sums of `rows` (rows, width), in float64, SUM_CHUNK elements at a
    time in row order (each chunk on one thread: the same for any thread count)."""
    step = max(1, SUM_CHUNK // max(1, rows.shape[1]))
    for lo in range(0, rows.shape[0], step):
        total += rows[lo : lo + step].sum(dim=0, dtype=torch.float64)


def _fetch_shared(slot: _Slot, members: list[tuple[UnitRunner, Unit]],
                  result: UnitResult) -> list[list]:  # fmt: skip
    """Each member's unit inputs (runner, unit), reading bytes several members need once,
    into one arena of the slot; the read is counted in `result`."""
    reads: dict[tuple, tuple] = {}  # key -> (runner, source, start, bytes)
    keys_of = []
    for runner, unit in members:
        per_piece = []
        for piece in unit.pieces:
            keys = []
            for key, source, start, nbytes in runner._source_reads(piece):
                reads.setdefault(key, (runner, source, start, nbytes))
                keys.append(key)
            per_piece.append(keys)
        keys_of.append(per_piece)
    lead = members[0][0]
    with lead._fetching:  # each stage's time is counted once it holds its lock
        started = time.perf_counter()
        slot.start_inputs(sum(runner._arena_share(source, start, n)
                              for runner, source, start, n in reads.values()))  # fmt: skip
        got = {key: runner._read_source(slot, source, start, nbytes, result)
               for key, (runner, source, start, nbytes) in reads.items()}  # fmt: skip
        result.seconds_read = time.perf_counter() - started
    return [
        [runner._assemble(piece, [got[k] for k in keys]) for piece, keys in zip(unit.pieces, kk)]
        for (runner, unit), kk in zip(members, keys_of)
    ]  # fmt: skip


def _member_result(unit: Unit, member: int, failures: list, read: UnitResult) -> UnitResult:
    """A member's result for its unit; the first member still merging carries the read
    the members shared."""
    result = UnitResult(unit.key, unit.index, [])
    if member == failures.index(None):
        result.bytes_read, result.seconds_read = read.bytes_read, read.seconds_read
    return result


def _outcomes(failures: list, results: list) -> list:
    """Per member: its error, or its results."""
    return [f if f is not None else r for f, r in zip(failures, results)]


def _run_units(members: list) -> list:
    """Members (runner, UnitBatch, facts, name) whose units read the same bytes, position by
    position: each unit's inputs are read once and merged into one output buffer, which is
    written before the next member's merge reuses it."""
    lead = members[0][0]
    results: list[list[UnitResult]] = [[] for _ in members]
    failures: list[str | None] = [None] * len(members)
    for position, unit in enumerate(members[0][1].units):
        with lead._slot() as slot:
            read = UnitResult(unit.key, unit.index, [])
            shared = _fetch_shared(slot, [(m[0], m[1].units[position]) for m in members], read)
            for m, (runner, batch, facts, name) in enumerate(members):
                if failures[m] is not None:
                    continue
                mine = batch.units[position]
                result = _member_result(mine, m, failures, read)
                try:
                    inject_fault({f"{name}/{mine.key}"})
                    out = slot.buffer("out", mine.nbytes)
                    runner._merge_unit(mine, out, shared[m], facts, result)
                    with runner._writing:
                        started = time.perf_counter()
                        result.receipt = runner._write(mine.shard, mine.part, mine.start, out)
                        result.seconds_write = time.perf_counter() - started
                except RaymergeError as exc:
                    failures[m] = str(exc)
                    continue
                results[m].append(result)
    return _outcomes(failures, results)


def _run_parts(members: list, catch: bool) -> list:
    """Members (runner, PartJob, facts[, name]) whose units read the same bytes: each unit's
    inputs are read once and merged into every member's part buffer, then each part is sent
    in one call (an S3 upload part); each unit's result carries its part's receipt. With
    `catch`, a member's RaymergeError is returned in place of its results."""
    lead, lead_job = members[0][0], members[0][1]
    results: list[list[UnitResult]] = [[] for _ in members]
    failures: list[str | None] = [None] * len(members)
    with lead._slot() as slot:
        outs = [slot.buffer(f"part{m}", member[1].part.nbytes) for m, member in enumerate(members)]
        covered = [member[1].part.start for member in members]
        for position, unit in enumerate(lead_job.units):
            read = UnitResult(unit.key, unit.index, [])
            shared = _fetch_shared(slot, [(m[0], m[1].units[position]) for m in members], read)
            for m, (runner, job, facts, *name) in enumerate(members):
                if failures[m] is not None:
                    continue
                mine, start = job.units[position], job.part.start
                if mine.start > covered[m]:  # bytes no unit writes (padding): zeros, as on disk
                    outs[m][covered[m] - start : mine.start - start].zero_()
                result = _member_result(mine, m, failures, read)
                try:
                    if name:
                        inject_fault({f"{name[0]}/{mine.key}"})
                    target = outs[m][mine.start - start : mine.end - start]
                    runner._merge_unit(mine, target, shared[m], facts, result)
                except RaymergeError as exc:
                    if not catch:
                        raise
                    failures[m] = str(exc)
                    continue
                results[m].append(result)
                covered[m] = mine.end
        for m, (runner, job, *_) in enumerate(members):
            if failures[m] is not None:
                continue
            part = job.part
            if covered[m] < part.end:
                outs[m][covered[m] - part.start :].zero_()
            started = time.perf_counter()  # uploads run side by side: no writing lock
            receipt = runner._write(part.shard, part.number, part.start, outs[m])
            for result in results[m]:
                result.receipt = receipt
            results[m][-1].seconds_write = time.perf_counter() - started
    return _outcomes(failures, results)


def _typed_view(out: torch.Tensor, dtype: str) -> torch.Tensor:
    """`out`'s bytes as a flat tensor of `dtype`, or an aligned scratch copy if misaligned."""
    torch_type = torch_dtype(dtype)
    if out.data_ptr() % torch_type.itemsize == 0:
        return out.view(torch_type)
    return torch.empty(out.numel() // torch_type.itemsize, dtype=torch_type)
