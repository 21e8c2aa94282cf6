"""Doing one part: read its input tensors, merge each, write the part's bytes in place.

`run_part` is a plain function (tests and the planner's peers call it without Ray); the Ray
actor in `runner.py` only wraps it. Tensors never leave the worker: it returns checksums and
timings, and writes the bytes straight to the destination.
"""

from __future__ import annotations

import os
import time
import zlib
from dataclasses import dataclass, field

import torch

from raymerge import global_topk
from raymerge.dtypes import torch_dtype
from raymerge.errors import MergeFailed
from raymerge.methods import REGISTRY
from raymerge.methods.base import CPU_CHUNK, MergeInputs
from raymerge.plan import OutputTensor, Part
from raymerge.storage import open_destination, open_source
from raymerge.storage.base import Destination, Source


@dataclass(frozen=True)
class WorkContext:
    """What every worker needs besides the part itself; sent once per actor."""

    method: str
    seed: int
    inputs: tuple[str, ...]  # source roots, indexed by InputTensor.input
    destination: str
    shard_names: tuple[str, ...]
    shard_tokens: tuple[str, ...]  # what Destination.write_part needs, per shard
    device: str = "cpu"


@dataclass
class PartResult:
    key: str
    shard: int
    number: int
    receipt: str
    checksums: dict[str, str]
    bytes_read: int
    bytes_written: int
    seconds_read: float = 0.0
    seconds_merge: float = 0.0
    seconds_write: float = 0.0
    worker: str = field(default_factory=lambda: f"{os.uname().nodename}:{os.getpid()}")


def checksum(data) -> str:
    """CRC-32 of a tensor's bytes, as recorded in tensors.parquet."""
    return f"{zlib.crc32(data):08x}"


class PartRunner:
    """Holds the open sources, the destination and reusable buffers for a worker's lifetime."""

    def __init__(self, context: WorkContext) -> None:
        self.context = context
        self.sources: list[Source] = [open_source(root) for root in context.inputs]
        self.destination: Destination = open_destination(context.destination)
        self.device = torch.device(context.device)
        self.method = REGISTRY[context.method]
        self.chunk = CPU_CHUNK if self.device.type == "cpu" else None
        self._buffers: dict[object, torch.Tensor] = {}

    def run(self, part: Part) -> PartResult:
        buffer = self._buffer("part", part.nbytes)
        view = buffer.numpy()
        if part.header:
            view[: len(part.header)] = memoryview(part.header)
        result = PartResult(part.key, part.shard, part.number, "", {}, 0, part.nbytes)
        for tensor in part.tensors:
            lo, hi = tensor.start - part.start, tensor.end - part.start
            self._fill(tensor, buffer[lo:hi], result)
            result.checksums[tensor.name] = checksum(view[lo:hi])
        started = time.perf_counter()
        result.receipt = self.destination.write_part(
            self.context.shard_names[part.shard],
            self.context.shard_tokens[part.shard],
            part.number,
            part.start,
            view,
        )
        result.seconds_write = time.perf_counter() - started
        return result

    def _buffer(self, key: object, nbytes: int) -> torch.Tensor:
        """A reusable byte buffer (fresh allocations page-fault on first touch)."""
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < nbytes:
            pin = self.device.type == "cuda" and key != "part"
            buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin)
            self._buffers[key] = buffer
        return buffer[:nbytes]

    def _fill(self, tensor: OutputTensor, out: torch.Tensor, result: PartResult) -> None:
        started = time.perf_counter()
        if tensor.op == "copy":
            source = tensor.sources[0]
            self._read_into(source.input, source.file, source.start, out)
            result.bytes_read += out.numel()
            result.seconds_read += time.perf_counter() - started
            return
        inputs = self._read_inputs(tensor, result)
        read_done = time.perf_counter()
        result.seconds_read += read_done - started
        target = _typed_view(out, tensor.dtype)
        if self.method.elementwise and self.chunk:
            for lo in range(0, target.numel(), self.chunk):
                hi = min(lo + self.chunk, target.numel())
                target[lo:hi].copy_(self._merge(tensor, [x[lo:hi] for x in inputs], flat=True))
        else:
            target.copy_(self._merge(tensor, [x.reshape(tensor.shape) for x in inputs]).reshape(-1))
        if target.data_ptr() != out.data_ptr():  # a misaligned tensor was merged into scratch
            out.copy_(target.view(torch.uint8))
        result.seconds_merge += time.perf_counter() - read_done

    def _read_inputs(self, tensor: OutputTensor, result: PartResult) -> list[torch.Tensor]:
        """The tensor's inputs, flat, in their stored dtypes, on the work device."""
        inputs = []
        for position, source in enumerate(tensor.sources):
            raw = self._buffer(position, source.end - source.start)
            self._read_into(source.input, source.file, source.start, raw)
            result.bytes_read += raw.numel()
            typed = raw.view(torch_dtype(source.dtype)).reshape(-1)
            inputs.append(typed.to(self.device, non_blocking=True))
        for position, source in enumerate(tensor.sources):
            if source.pad_from is not None:  # fewer vocab rows: the base's rows fill the rest
                rest = inputs[source.pad_from][inputs[position].numel() :]
                inputs[position] = torch.cat([inputs[position], rest.to(inputs[position].dtype)])
        return inputs

    def statistic(self, part: Part, request: dict) -> dict:
        """One part's share of a whole-model statistic (global top-k: see global_topk.py)."""
        partial: dict = {}
        scratch = PartResult(part.key, part.shard, part.number, "", {}, 0, 0)
        for tensor in part.tensors:
            if global_topk.participates(tensor):
                inputs = self._read_inputs(tensor, scratch)
                global_topk.accumulate(partial, tensor, inputs, request)
        return partial

    def _merge(self, tensor: OutputTensor, inputs: list[torch.Tensor], flat: bool = False):
        merged = self.method.merge(
            MergeInputs(
                tensor.name,
                inputs,
                tensor.base,
                tensor.shared,
                list(tensor.per_input),
                self.context.seed,
            )
        )
        expected = inputs[0].shape if flat else tensor.shape
        if tuple(merged.shape) != tuple(expected):
            raise MergeFailed(
                f"{self.context.method} returned shape {list(merged.shape)} for {tensor.name!r}, "
                f"expected {list(expected)}"
            )
        return merged

    def _read_into(self, input_index: int, file: str, start: int, out: torch.Tensor) -> None:
        if out.numel():
            self.sources[input_index].readinto(file, start, memoryview(out.numpy()))


def _typed_view(out: torch.Tensor, dtype: str) -> torch.Tensor:
    """`out`'s bytes as a flat tensor of `dtype`, or an aligned scratch copy if misaligned."""
    torch_type = torch_dtype(dtype)
    if out.data_ptr() % torch_type.itemsize == 0:
        return out.view(torch_type)
    return torch.empty(out.numel() // torch_type.itemsize, dtype=torch_type)
