"""The data stage's large arrays as .npy files beside the ledger (`_raymerge/zipit/`).

Features, hidden states, Σxxᵀ tiles and RegMean's Gram matrices are too big for a JSON
artifact or a Ray result: workers write them through the output's Destination (a local
folder or an S3 prefix, each file written whole and atomically) and read them back with a
Source on the same root. Each file is named by a reference — {"name", "nbytes", "crc"} —
that travels through Ray and into the artifact instead of the array; a read checks the
size and CRC-32 and raises `Damaged` on any difference, so a missing, short or altered file
is never taken for a good one. No pickle: the dtype must be a plain number type.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from raymerge.checksum import checksum
from raymerge.errors import ConfigError, RaymergeError

FOLDER = "_raymerge/zipit"  # everything here belongs to the run: --force removes it
DTYPES = ("<f4", "<f8", "<i8")


class Damaged(Exception):
    """A stored array is missing, short, or not the bytes its reference names."""


def path(*parts: str) -> str:
    return "/".join((FOLDER, *parts))


def encode(array: np.ndarray) -> bytearray:
    """The .npy bytes of `array` (C order, no pickle), in one buffer filled once."""
    array = np.require(array, requirements="C")
    if array.dtype.str not in DTYPES:
        raise ValueError(f"store keeps {DTYPES} arrays, not {array.dtype}")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    head = header.getvalue()
    body = bytearray(len(head) + array.nbytes)
    body[: len(head)] = head
    np.frombuffer(body, dtype=np.uint8, offset=len(head))[:] = array.reshape(-1).view(np.uint8)
    return body


def write(destination: Any, name: str, array: np.ndarray) -> dict:
    """Write `array` as the file `name` under the output root; its reference."""
    body = encode(array)
    destination.write_file(name, body)
    return {"name": name, "nbytes": len(body), "crc": checksum(body)}


def is_ref(value: Any) -> bool:
    """Whether `value` is a file reference as `write` returns it."""
    return isinstance(value, dict) and set(value) == {"name", "nbytes", "crc"}


def read(reader: Any, ref: dict) -> np.ndarray:
    """The array a reference names, checked (size, CRC-32, header); Damaged otherwise."""
    name, nbytes = ref["name"], int(ref["nbytes"])
    buffer = bytearray(nbytes)
    try:
        reader.readinto(name, 0, memoryview(buffer))
    except ConfigError:  # credentials, access, no bucket: say so, it is not damage
        raise
    except (OSError, RaymergeError) as exc:  # missing, short, unreadable
        raise Damaged(f"{reader.describe(name)}: {exc}") from None
    if checksum(buffer) != ref["crc"]:
        raise Damaged(f"{reader.describe(name)}: its bytes do not match the run's record")
    return decode(buffer, reader.describe(name))


def decode(buffer: bytearray, where: str) -> np.ndarray:
    """An array over `buffer` (no copy), from .npy bytes of a plain number type."""
    stream = io.BytesIO(buffer)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    except ValueError as exc:
        raise Damaged(f"{where}: not a .npy file ({exc})") from None
    count = int(np.prod(shape, dtype=np.int64))
    if dtype.str not in DTYPES or fortran or stream.tell() + count * dtype.itemsize != len(buffer):
        raise Damaged(f"{where}: an unexpected .npy layout ({dtype}, {shape})")
    return np.frombuffer(buffer, dtype=dtype, count=count, offset=stream.tell()).reshape(shape)


def reader(root: str) -> Any:
    """A Source over the output root (local folder or S3 prefix) to read stored arrays."""
    from raymerge.storage import open_source

    return open_source(root)

