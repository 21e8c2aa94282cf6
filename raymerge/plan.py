"""The plan: a pure function of (spec, input headers) that fixes every output byte's place.

It checks the inputs agree, decides each output tensor's dtype and parameters, groups tensors
into shards, builds each shard's safetensors header (so every tensor's absolute offset is
known before any weight is read), and cuts each shard into parts: contiguous byte ranges of
whole tensors, the unit of work and of retry. Nothing here depends on the number of workers,
so the output bytes cannot either.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from raymerge.checkpoint import Checkpoint
from raymerge.dtypes import FLOAT_DTYPES, itemsize
from raymerge.errors import ConfigError
from raymerge.mapping import TensorJob, map_tensors, output_shape
from raymerge.safetensors_format import TensorEntry, build_header
from raymerge.spec import MergeSpec

# bytes of fp32 scratch per element and input that the task-vector family may hold at once
SCRATCH_FP32_PER_INPUT = 4


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

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Part:
    """A contiguous byte range of one shard: the unit of work, retry and S3 upload part."""

    shard: int
    number: int  # 1-based, as S3 part numbers are
    start: int
    end: int
    header: bytes  # the shard's header bytes when this part starts the file, else b""
    tensors: tuple[OutputTensor, ...]

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def key(self) -> str:
        return f"{self.shard:05d}-{self.number:05d}"


@dataclass(frozen=True)
class Shard:
    name: str
    size: int
    header_size: int


@dataclass(frozen=True)
class Plan:
    method: str
    seed: int
    inputs: tuple[str, ...]  # checkpoint URIs, in spec order
    shards: tuple[Shard, ...]
    parts: tuple[Part, ...]
    digest: str
    num_layers: int = 0  # the output's layers (config.json's num_hidden_layers)

    @property
    def tensors(self) -> list[OutputTensor]:
        return [t for part in self.parts for t in part.tensors]

    @property
    def bytes_to_write(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def bytes_to_read(self) -> int:
        return sum(src.end - src.start for t in self.tensors for src in t.sources)

    def parts_of(self, shard: int) -> list[Part]:
        return [p for p in self.parts if p.shard == shard]

    def peak_worker_bytes(self) -> int:
        """A bound on one worker's memory for its largest part: the part's output buffer plus
        the largest tensor's inputs and fp32 scratch."""
        peak = 0
        for part in self.parts:
            largest = 0
            for t in part.tensors:
                numel = math.prod(t.shape)
                inputs = sum(s.end - s.start for s in t.sources)
                largest = max(
                    largest, inputs + numel * 4 * (len(t.sources) + SCRATCH_FP32_PER_INPUT)
                )
            peak = max(peak, part.nbytes + largest)
        return peak


def make_plan(spec: MergeSpec, checkpoints: list[Checkpoint]) -> Plan:
    """Plan the merge of `checkpoints` (one per spec input, in order)."""
    jobs, num_layers = map_tensors(spec, checkpoints)
    tensors = [_plan_tensor(spec, checkpoints, job) for job in jobs]
    shards, parts = _layout(_group_into_shards(tensors, spec.shard_size), spec.part_size)
    plan = Plan(
        method=spec.method.name,
        seed=spec.seed,
        inputs=tuple(c.source.root for c in checkpoints),
        shards=tuple(shards),
        parts=tuple(parts),
        digest="",
        num_layers=num_layers,
    )
    return dataclasses.replace(plan, digest=_digest(spec, checkpoints, plan))


def _plan_tensor(spec: MergeSpec, checkpoints: list[Checkpoint], job: TensorJob) -> OutputTensor:
    entries = [checkpoints[i].tensors[name] for i, name in job.sources]
    out_slice = spec.slices[job.slice_index]
    reference = out_slice.base if out_slice.base is not None else 0
    if not all(e.dtype in FLOAT_DTYPES for e in entries):
        source = _input_tensor(job.sources[reference][0], entries[reference])
        first = entries[reference]
        return OutputTensor(
            job.name,
            first.dtype,
            first.shape,
            -1,
            0,
            first.nbytes,
            job.layer,
            "copy",
            (source,),
            None,
        )
    shape = output_shape(spec, checkpoints, job)
    dtype = spec.out_dtype or entries[reference].dtype
    shared, per_input = spec.resolve(job.slice_index, job.name, [n for _, n in job.sources], job.t)
    if spec.method.check is not None:
        problem = spec.method.check(shared, per_input)
        if problem:
            raise ConfigError(f"{spec.source}: tensor {job.name!r}: {problem}")
    sources = tuple(
        _input_tensor(i, entry, shape[0] if entry.shape != shape else None, out_slice.base)
        for (i, _), entry in zip(job.sources, entries)
    )
    nbytes = math.prod(shape) * itemsize(dtype)
    return OutputTensor(
        job.name,
        dtype,
        shape,
        -1,
        0,
        nbytes,
        job.layer,
        "merge",
        sources,
        out_slice.base,
        shared,
        tuple(per_input),
    )


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


def _layout(groups: list[list[OutputTensor]], part_size: int) -> tuple[list[Shard], list[Part]]:
    shards, parts = [], []
    count = len(groups)
    for index, group in enumerate(groups):
        name = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        header, offsets = build_header([(t.name, t.dtype, t.shape) for t in group])
        placed = [
            OutputTensor(
                t.name,
                t.dtype,
                t.shape,
                index,
                off,
                off + t.nbytes,
                t.layer,
                t.op,
                t.sources,
                t.base,
                t.shared,
                t.per_input,
            )
            for t, off in zip(group, offsets)
        ]
        size = len(header) + sum(t.nbytes for t in group)
        shards.append(Shard(name, size, len(header)))
        parts.extend(_cut_parts(index, header, placed, part_size))
    return shards, parts


def _cut_parts(
    shard: int, header: bytes, tensors: list[OutputTensor], part_size: int
) -> list[Part]:
    """Whole tensors per part, each part at least `part_size` bytes except the last."""
    parts: list[Part] = []
    start = 0
    members: list[OutputTensor] = []
    for tensor in tensors:
        members.append(tensor)
        if tensor.end - start >= part_size:
            parts.append(_part(shard, len(parts) + 1, start, tensor.end, header, members))
            start, members = tensor.end, []
    if members:
        parts.append(_part(shard, len(parts) + 1, start, members[-1].end, header, members))
    return parts


def _part(shard: int, number: int, start: int, end: int, header: bytes, members: list) -> Part:
    return Part(shard, number, start, end, header if start == 0 else b"", tuple(members))


def _digest(spec: MergeSpec, checkpoints: list[Checkpoint], plan: Plan) -> str:
    """Identifies the merge: same spec, same input files and same layout give the same value."""
    record = {
        "spec": spec.to_json(),
        "inputs": [sorted(c.fingerprints.items()) for c in checkpoints],
        "shards": [(s.name, s.size) for s in plan.shards],
        "parts": [(p.shard, p.number, p.start, p.end) for p in plan.parts],
        "tensors": [
            (t.name, t.dtype, t.shape, t.start, t.op, t.shared, t.per_input) for t in plan.tensors
        ],
    }
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), default=list)
    return hashlib.sha256(text.encode()).hexdigest()
