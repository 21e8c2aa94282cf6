"""Reading and writing safetensors headers, treating every header as untrusted input.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then the
tensor bytes; each tensor's `data_offsets` are relative to the end of the header.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

from raymerge.dtypes import SAFETENSORS_DTYPES, itemsize
from raymerge.errors import CheckpointError, shown
from raymerge.storage.base import Source

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the cap safetensors itself applies
HEADER_ALIGNMENT = 8
MAX_DIMS = 8  # real tensors have at most 5 or 6
MAX_DIM = 2**48  # elements along one dimension
MAX_NAME_CHARS = 1024  # real tensor names are a few hundred characters at most


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: `start`/`end` are absolute offsets in `file`."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(source: Source, file: str) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Read and validate one file's header; returns its tensors and `__metadata__`."""
    where = source.describe(file)
    if not source.exists(file):
        raise CheckpointError(
            f"{where}: not a regular file (a folder named like a shard?); a safetensors shard "
            "must be a file"
        )
    file_size = source.size(file)
    if file_size < 8:
        raise CheckpointError(f"{where}: {file_size} bytes is too short for a safetensors file")
    (header_len,) = struct.unpack("<Q", source.read_range(file, 0, 8))
    if header_len > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{where}: header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit; "
            "the file is corrupt or not a safetensors file"
        )
    if 8 + header_len > file_size:
        raise CheckpointError(
            f"{where}: header claims {header_len} bytes but the file has {file_size}; "
            "the file is truncated or not a safetensors file"
        )
    raw = source.read_range(file, 8, header_len)
    return parse_header(raw, file, file_size, where)


def parse_header(
    raw: bytes, file: str, file_size: int, where: str
) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:  # ValueError: also 5000-digit numbers
        problem = str(exc).split(";")[0][:200]
        raise CheckpointError(f"{where}: header is not valid JSON ({problem})") from None
    except _DuplicateKey as exc:
        raise CheckpointError(
            f"{where}: header lists {shown(exc.args[0])} twice; the file is corrupt: "
            "re-download or re-save the checkpoint"
        ) from None
    except RecursionError:
        raise CheckpointError(
            f"{where}: header JSON is nested too deeply; the file is corrupt or not a "
            "safetensors file"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{where}: __metadata__ must map strings to strings")
    data_start = 8 + len(raw)
    data_size = file_size - data_start
    entries = {}
    for name, info in header.items():
        entries[name] = _parse_entry(name, info, file, data_start, data_size, where)
    _check_no_overlap(entries, where)
    return entries, metadata


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """json `object_pairs_hook`: a key given twice is an error, not "the last one wins"."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return result


def _parse_entry(
    name: str, info: object, file: str, data_start: int, data_size: int, where: str
) -> TensorEntry:
    at = f"{where}: tensor {shown(name)}"
    if len(name) > MAX_NAME_CHARS:
        raise CheckpointError(
            f"{at}: a name of {len(name)} characters is not plausible (limit {MAX_NAME_CHARS}); "
            "the header is corrupt"
        )
    if not isinstance(info, dict):
        raise CheckpointError(f"{at}: entry must be an object with dtype, shape, data_offsets")
    dtype = info.get("dtype")
    if dtype not in SAFETENSORS_DTYPES:
        allowed = ", ".join(SAFETENSORS_DTYPES)
        hint = (
            " (a quantized format, which raymerge does not merge: dequantize the checkpoint first)"
            if isinstance(dtype, str) and dtype.startswith(("F4", "F6", "F8"))
            else ""
        )
        raise CheckpointError(
            f"{at}: unknown dtype {shown(dtype)}{hint}; safetensors dtypes: {allowed}"
        )
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(f"{at}: shape {shown(shape)} must be a list of non-negative integers")
    if len(shape) > MAX_DIMS or any(d > MAX_DIM for d in shape):
        raise CheckpointError(
            f"{at}: shape {shown(shape)} is not plausible (at most {MAX_DIMS} dimensions of at "
            f"most 2**48 each); the header is corrupt"
        )
    offsets = info.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CheckpointError(
            f"{at}: data_offsets {shown(offsets)} must be [begin, end], 0 <= begin <= end"
        )
    begin, end = offsets
    expected = math.prod(shape) * itemsize(dtype)
    if end - begin != expected:
        raise CheckpointError(
            f"{at}: data_offsets {shown(offsets)} hold {shown(end - begin)} bytes, but {dtype} "
            f"{shape} needs {expected}; the header is corrupt"
        )
    if end > data_size:
        raise CheckpointError(
            f"{at}: data_offsets {shown(offsets)} run past the end of the data ({data_size} "
            "bytes); the file is truncated or its header is corrupt"
        )
    return TensorEntry(name, file, dtype, tuple(shape), data_start + begin, data_start + end)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_no_overlap(entries: dict[str, TensorEntry], where: str) -> None:
    ordered = sorted((e for e in entries.values() if e.nbytes), key=lambda e: e.start)
    for before, after in zip(ordered, ordered[1:]):
        if after.start < before.end:
            raise CheckpointError(
                f"{where}: tensors {shown(before.name)} and {shown(after.name)} overlap "
                f"(bytes {before.start}-{before.end} and {after.start}-{after.end}); "
                "the header is corrupt"
            )


def build_header(
    tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, list[int]]:
    """Serialize a header for tensors stored back to back in the given order.

    Returns the bytes that start the file (length prefix + padded JSON) and each tensor's
    absolute byte offset in the file. Key order and spacing are fixed, so the same tensors
    always give the same bytes.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    relative = 0
    relative_offsets = []
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * itemsize(dtype)
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [relative, relative + nbytes],
        }
        relative_offsets.append(relative)
        relative += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    text += b" " * (-len(text) % HEADER_ALIGNMENT)
    prefix = struct.pack("<Q", len(text)) + text
    return prefix, [len(prefix) + r for r in relative_offsets]
