"""Doing one work unit: read its input rows, merge each piece, write its bytes in place.

A worker runs up to three units at once as a pipeline: one fetching its inputs, one
merging, one writing (each stage has its own lock, so the stages of different units
overlap while each stage runs one unit at a time; reads, torch kernels, CRCs and writes all
release the GIL). Memory stays within the plan's bound: three units' buffers at most.
Tensors never leave the worker: it returns checksums, statistics and timings.
"""

from __future__ import annotations

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
from raymerge.errors import MergeFailed
from raymerge.lazy import torch
from raymerge.methods import REGISTRY
from raymerge.methods.base import CPU_CHUNK, MergeInputs, add_stats, rows_of
from raymerge.plan import OutputTensor, PartJob, Piece, Unit, UnitBatch
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


class UnitRunner:
    """Holds the open sources, the destination and the pipeline for a worker's lifetime."""

    def __init__(self, context: WorkContext) -> None:
        self.context = context
        s3.configure(context.s3)
        self.sources: list[Source] = [open_source(root) for root in context.inputs]
        self.destination: Destination = open_destination(context.destination)
        self.device = torch.device(context.device)
        self.method = REGISTRY[context.method]
        self.chunk = CPU_CHUNK if self.device.type == "cpu" else None
        cuda = self.device.type == "cuda"
        self._slots = [_Slot(cuda) for _ in range(PIPELINE_DEPTH)]
        # host-to-device copies run on their own stream, so the next unit's copy overlaps
        # this unit's kernels; the merge stage waits for its own copies' event
        self._copies = torch.cuda.Stream(self.device) if cuda else None
        self._free = threading.Semaphore(PIPELINE_DEPTH)
        self._slot_lock = threading.Lock()
        self._fetching, self._merging, self._writing = (threading.Lock() for _ in range(3))

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
        part = job.part
        with self._slot() as slot:
            out = slot.buffer("part", part.nbytes)
            covered = part.start
            results = []
            for unit in job.units:
                if unit.start > covered:  # bytes no unit writes (padding): zeros, as on disk
                    out[covered - part.start : unit.start - part.start].zero_()
                target = out[unit.start - part.start : unit.end - part.start]
                results.append(self._produce(slot, unit, target, facts))
                covered = unit.end
            if covered < part.end:
                out[covered - part.start :].zero_()
            started = time.perf_counter()  # uploads run side by side: no writing lock
            receipt = self._write(part.shard, part.number, part.start, out)
            for result in results:
                result.receipt = receipt
            results[-1].seconds_write = time.perf_counter() - started
            return results

    def _produce(self, slot: _Slot, unit: Unit, out: torch.Tensor, facts) -> UnitResult:
        """Read the unit's inputs into the slot, merge them into `out`."""
        result = UnitResult(unit.key, unit.index, [])
        with self._fetching:  # each stage's time is counted once it holds its lock
            started = time.perf_counter()
            slot.start_inputs(self._arena_bytes(unit))
            inputs = [self._read_piece(slot, p, result) for p in unit.pieces]
            result.seconds_read = time.perf_counter() - started
        with self._merging:
            started = time.perf_counter()
            self._arrived(inputs)
            self._fill(unit, out, inputs, facts or {}, result)
            result.seconds_merge = time.perf_counter() - started
        result.bytes_written = unit.nbytes
        return result

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
        """The unit's input bytes, each input rounded up to ALIGN."""
        total = 0
        for piece in unit.pieces:
            tensor = self.context.tensors[piece.tensor]
            for source in tensor.sources:
                have = self._rows_held(source, piece)
                total += -(-(have * itemsize(source.dtype) * tensor.row_elements) // ALIGN) * ALIGN
        return total

    @staticmethod
    def _rows_held(source, piece: Piece) -> int:
        """The piece's rows this source has (fewer where its vocabulary is smaller)."""
        return max(0, min(piece.row_end, rows_of(source.shape)[0]) - piece.row_start)

    def _read_piece(self, slot: _Slot, piece: Piece, result: UnitResult) -> list:
        """The piece's rows of every input, in their stored dtypes, on the work device."""
        tensor = self.context.tensors[piece.tensor]
        rows = piece.row_end - piece.row_start
        row_elements = tensor.row_elements
        tensors = []
        for source in tensor.sources:
            row_bytes = itemsize(source.dtype) * row_elements
            have = self._rows_held(source, piece)
            raw = slot.carve(have * row_bytes)
            start = source.start + piece.row_start * row_bytes
            if raw.numel():
                self.sources[source.input].readinto(source.file, start, memoryview(raw.numpy()))
            result.bytes_read += raw.numel()
            typed = raw.view(torch_dtype(source.dtype))
            tensors.append(self._to_device(typed))
        for position, source in enumerate(tensor.sources):
            if source.pad_from is not None:  # fewer vocab rows: the base's rows fill the rest
                full = rows * row_elements
                rest = tensors[source.pad_from][tensors[position].numel() : full]
                tensors[position] = torch.cat([tensors[position], rest.to(tensors[position].dtype)])
        shape = (rows, *tensor.shape[1:]) if tensor.shape else ()
        return [t.reshape(shape) for t in tensors]

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


def _typed_view(out: torch.Tensor, dtype: str) -> torch.Tensor:
    """`out`'s bytes as a flat tensor of `dtype`, or an aligned scratch copy if misaligned."""
    torch_type = torch_dtype(dtype)
    if out.data_ptr() % torch_type.itemsize == 0:
        return out.view(torch_type)
    return torch.empty(out.numel() // torch_type.itemsize, dtype=torch_type)
