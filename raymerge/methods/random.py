"""Counter-based random numbers: element i of a tensor gets the i-th output of splitmix64.

torch's generators give different streams on CPU and CUDA and depend on call order, so a
mask drawn with them would change with the worker, the device and the schedule. Here every
value is a pure function of (key, flat index), computed with int64 tensor ops on the tensor's
own device, so a mask is bit-identical everywhere and any chunk can be drawn alone.

The key is the first 8 bytes of sha256(f"{seed}:{name}:{position}"). A Bernoulli(p) draw
is `uniform < p` with uniform = (top 53 bits) / 2^53, evaluated exactly in integers as
`bits < ceil(p * 2^53)`.
"""

from __future__ import annotations

import hashlib
import math

from raymerge.lazy import torch
from raymerge.methods.base import CPU_CHUNK

# elements drawn at a time: cache-sized on CPU, large enough on accelerators to hide launches
DEVICE_CHUNK = 1 << 22
BITS = 53
ONE = 1 << BITS  # 2^53: uniform = bits / ONE


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


GAMMA = _signed(0x9E3779B97F4A7C15)
MUL1 = _signed(0xBF58476D1CE4E5B9)
MUL2 = _signed(0x94D049BB133111EB)


def chunk_size(device: torch.device) -> int:
    return CPU_CHUNK if device.type == "cpu" else DEVICE_CHUNK


def key(seed: int, name: str, position: int) -> int:
    """The stream of one model's tensor: first 8 bytes of sha256, as a signed int64."""
    digest = hashlib.sha256(f"{seed}:{name}:{position}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns: arithmetic shift, sign bits masked off."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def bits(stream: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Top 53 bits of splitmix64 outputs start..start+count-1 of `stream`, as int64 >= 0.

    Output i is mix(stream + (i + 1) * GAMMA), the standard splitmix64 sequence seeded with
    `stream`; int64 products and sums wrap mod 2^64 like the unsigned original.
    """
    z = torch.arange(start + 1, start + count + 1, dtype=torch.int64, device=device)
    z.mul_(GAMMA).add_(stream)
    z = (z ^ _shr(z, 30)).mul_(MUL1)
    z = (z ^ _shr(z, 27)).mul_(MUL2)
    z ^= _shr(z, 31)
    return _shr(z, 64 - BITS)


def uniform(
    stream: int,
    count: int,
    device: torch.device | str = "cpu",
    start: int = 0,
    chunk: int | None = None,
) -> torch.Tensor:
    """Uniforms in [0, 1) for flat indices start..start+count-1, in float64 (exact)."""
    out = torch.empty(count, dtype=torch.float64, device=device)
    chunk = chunk or chunk_size(out.device)
    for offset in range(0, count, chunk):
        n = min(chunk, count - offset)
        out[offset : offset + n] = bits(stream, start + offset, n, device).double() / ONE
    return out


def threshold(p: float) -> int:
    """The integer cut with `bits < threshold(p)` exactly when bits / 2^53 < p."""
    if p <= 0:
        return 0
    if p >= 1:
        return ONE
    return math.ceil(p * ONE)  # p * 2^53 is exact in float64


def bernoulli_mask(
    stream: int,
    shape: torch.Size | tuple[int, ...],
    p: float,
    device: torch.device | str = "cpu",
    chunk: int | None = None,
    start: int = 0,
) -> torch.Tensor:
    """Boolean mask, True with probability p, element i decided by draw start + i."""
    count = math.prod(shape)
    cut = threshold(p)
    mask = torch.empty(count, dtype=torch.bool, device=device)
    chunk = chunk or chunk_size(mask.device)
    for offset in range(0, count, chunk):
        n = min(chunk, count - offset)
        mask[offset : offset + n] = bits(stream, start + offset, n, device) < cut
    return mask.reshape(shape)
