"""Virtual checkpoints: a named architecture's sharded safetensors checkpoint, without files.

`virtual://LAYOUT/MODEL[?scale=N&layers=N&dtype=bfloat16&shard=5GB]` presents the files a
Hugging Face checkpoint of LAYOUT (raymerge/layouts.py) would have: shards with real headers
(filled in order up to `shard` bytes of tensors, named model-00001-of-0000N.safetensors),
`model.safetensors.index.json` and `config.json`. Tensor bytes are a fixed block of finite
values of the dtype, tiled along each file and shifted by a hash of (MODEL, file): the same
bytes for the same (MODEL, file, offset) in every process, different models differ, and a
read costs one memcpy per MiB. `scale` divides the widths (names and tensor count stay),
`layers` replaces the layer count.

Plans, benchmarks and tests of the scheduler use these: a 405B merge can be planned, and
thousands of units run, with nothing on disk.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import struct
import sys
from array import array
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

from raymerge.dtypes import itemsize, parse_config_dtype
from raymerge.errors import CheckpointError, ConfigError, shown
from raymerge.layouts import check_scale, get_layout
from raymerge.layouts import config as layout_config
from raymerge.layouts import tensors as layout_tensors
from raymerge.safetensors_format import build_header
from raymerge.sizes import parse_size
from raymerge.storage.ranged import BufferedReads

SCHEME = "virtual"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD = 5 * 10**9  # save_pretrained's max_shard_size="5GB"
BLOCK_BYTES = 1 << 20  # the tiled block of values; a multiple of every itemsize
GENERATOR = "1"  # enters fingerprints: a change in the bytes changes every merge's digest
OPTIONS = ("scale", "layers", "dtype", "shard")
DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


@dataclass(frozen=True)
class VirtualSpec:
    layout: str
    model: str
    scale: int = 1
    layers: int | None = None
    dtype: str = "BF16"
    shard: int = DEFAULT_SHARD

    @property
    def canonical(self) -> str:
        layers = "" if self.layers is None else f"&layers={self.layers}"
        return (
            f"{SCHEME}://{self.layout}/{self.model}?scale={self.scale}{layers}"
            f"&dtype={DTYPE_NAMES[self.dtype]}&shard={self.shard}"
        )


def parse_uri(uri: str) -> VirtualSpec:
    """Check a virtual:// URI; ConfigError names the problem and what is allowed."""
    form = "virtual://LAYOUT/MODEL[?scale=N&layers=N&dtype=bfloat16&shard=5GB]"
    parts = urlsplit(uri)
    if parts.scheme.lower() != SCHEME:
        raise ConfigError(f"{shown(uri)}: not a virtual:// URI ({form})")
    layout = parts.netloc
    model = unquote(parts.path).strip("/")
    if not layout or not model:
        raise ConfigError(f"{shown(uri)}: give a layout and a model name: {form}")
    get_layout(layout)  # ConfigError naming the known layouts
    options: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in OPTIONS:
            raise ConfigError(
                f"{shown(uri)}: unknown option {shown(key)}; allowed: {', '.join(OPTIONS)}"
            )
        if key in options:
            raise ConfigError(f"{shown(uri)}: option {shown(key)} is given twice")
        options[key] = value
    try:
        scale = check_scale(_integer(options.get("scale", "1"), "scale"))
        layers = None
        if "layers" in options:
            layers = _integer(options["layers"], "layers")
            if layers < 1:
                raise ConfigError(f"layers: {shown(layers)} must be a positive integer")
        dtype = parse_config_dtype(options.get("dtype", "bfloat16"), "dtype")
        if dtype not in DTYPE_NAMES:
            raise ConfigError(
                f"dtype: {shown(options['dtype'])}: one of {', '.join(DTYPE_NAMES.values())}"
            )
        shard = parse_size(options["shard"], "shard") if "shard" in options else DEFAULT_SHARD
    except ConfigError as exc:
        raise ConfigError(f"{shown(uri)}: {exc}") from None
    except (OverflowError, ValueError):
        raise ConfigError(
            f"{shown(uri)}: shard: {shown(options.get('shard'))} is too large"
        ) from None
    return VirtualSpec(layout, model, scale, layers, dtype, shard)


def _integer(text: str, key: str) -> int:
    if not text.isdigit() or len(text) > 9:
        raise ConfigError(f"{key}: {shown(text)} must be a positive integer")
    return int(text)


@dataclass(frozen=True)
class _Shard:
    name: str
    prefix: bytes  # the 8-byte length and the JSON header
    size: int


@dataclass(frozen=True)
class _Files:
    shards: dict[str, _Shard]
    small: dict[str, bytes]  # index and config.json
    names: tuple[str, ...]


@functools.lru_cache(maxsize=64)
def _files(layout: str, scale: int, layers: int | None, dtype: str, shard: int) -> _Files:
    """The checkpoint's files for these options (the same for every model of them)."""
    entries = layout_tensors(layout, scale, layers)
    size = itemsize(dtype)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    filled = 0
    for name, shape in entries:
        nbytes = _numel(shape) * size
        if groups[-1] and filled + nbytes > shard:
            groups.append([])
            filled = 0
        groups[-1].append((name, shape))
        filled += nbytes
    count = len(groups)
    shards: dict[str, _Shard] = {}
    weight_map: dict[str, str] = {}
    total = 0
    for index, group in enumerate(groups):
        file = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        prefix, _ = build_header([(n, dtype, s) for n, s in group], {"format": "pt"})
        data = sum(_numel(s) * size for _, s in group)
        shards[file] = _Shard(file, prefix, len(prefix) + data)
        weight_map.update(dict.fromkeys((n for n, _ in group), file))
        total += data
    index_body = {"metadata": {"total_size": total}, "weight_map": weight_map}
    small = {
        INDEX_NAME: (json.dumps(index_body, indent=2) + "\n").encode(),
        "config.json": (
            json.dumps(layout_config(layout, scale, layers, DTYPE_NAMES[dtype]), indent=2) + "\n"
        ).encode(),
    }
    return _Files(shards, small, tuple(sorted([*shards, *small])))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@functools.lru_cache(maxsize=8)
def _block(dtype: str) -> memoryview:
    """BLOCK_BYTES of finite values of `dtype` (uniform in [-0.04, 0.04), as weights are),
    stored twice in a row so any span up to BLOCK_BYTES is one slice. The same in every
    process: Python's Mersenne Twister with a fixed seed."""
    rng = random.Random(20240611)
    count = BLOCK_BYTES // itemsize(dtype)
    values = [(rng.random() - 0.5) * 0.08 for _ in range(count)]
    if dtype == "BF16":  # the high half of each float32: finite, as the float32 is
        words = array("f", values)
        if sys.byteorder != "little":
            words.byteswap()
        raw = memoryview(words).cast("B")
        data = bytearray(BLOCK_BYTES)
        data[0::2] = raw[2::4]
        data[1::2] = raw[3::4]
    elif dtype == "F16":
        data = bytearray(struct.pack(f"<{count}e", *values))
    else:
        words = array("f" if dtype == "F32" else "d", values)
        if sys.byteorder != "little":
            words.byteswap()
        data = bytearray(words.tobytes())
    return memoryview(bytes(data + data))


class VirtualSource(BufferedReads):
    """A checkpoint of a named layout that exists only as this object (see module doc)."""

    def __init__(self, root: str) -> None:
        self.root = str(root)
        self.spec = parse_uri(self.root)
        s = self.spec
        self._files = _files(s.layout, s.scale, s.layers, s.dtype, s.shard)
        self._shifts: dict[str, int] = {}
        query = urlsplit(self.root).query
        self._where = (f"{SCHEME}://{s.layout}/{s.model}", f"?{query}" if query else "")

    def describe(self, name: str) -> str:
        base, query = self._where
        return f"{base}/{name}{query}"

    def exists(self, name: str) -> bool:
        return name in self._files.shards or name in self._files.small

    def size(self, name: str) -> int:
        shard = self._files.shards.get(name)
        if shard is not None:
            return shard.size
        small = self._files.small.get(name)
        if small is None:
            raise CheckpointError(f"{self.describe(name)}: no such file in this virtual model")
        return len(small)

    def list(self) -> list[str]:
        return list(self._files.names)

    def readinto(self, name: str, start: int, buffer: memoryview) -> None:
        view = memoryview(buffer).cast("B")
        length = len(view)
        shard = self._files.shards.get(name)
        if shard is None:
            data = self._files.small.get(name)
            if data is None:
                raise CheckpointError(f"{self.describe(name)}: no such file in this virtual model")
            self._check_range(name, start, length, len(data))
            view[:] = data[start : start + length]
            return
        self._check_range(name, start, length, shard.size)
        done = 0
        prefix = shard.prefix
        if start < len(prefix):  # the header
            done = min(length, len(prefix) - start)
            view[:done] = prefix[start : start + done]
        if done == length:
            return
        block = _block(self.spec.dtype)
        at = (start + done + self._shift(name)) % BLOCK_BYTES
        while done < length:
            step = min(length - done, BLOCK_BYTES)
            view[done : done + step] = block[at : at + step]
            done += step
            at = (at + step) % BLOCK_BYTES

    def _check_range(self, name: str, start: int, length: int, size: int) -> None:
        if start < 0 or start + length > size:
            raise CheckpointError(
                f"{self.describe(name)}: file ends at byte {size}, but bytes {start}-"
                f"{start + length} were asked for"
            )

    def _shift(self, name: str) -> int:
        """Where in the block this model's file starts: a multiple of 8, so every element
        (shard data starts 8-aligned, tensors at multiples of their itemsize) is whole."""
        shift = self._shifts.get(name)
        if shift is None:
            digest = hashlib.sha256(f"{self.spec.model}\0{name}".encode()).digest()
            shift = int.from_bytes(digest[:8], "little") % (BLOCK_BYTES // 8) * 8
            self._shifts[name] = shift
        return shift

    def fingerprint(self, name: str) -> str:
        return f"virtual:{GENERATOR}:{self.spec.canonical}:{name}:{self.size(name)}"

    def __reduce__(self):
        return (VirtualSource, (self.root,))
