"""Header parsing treats every header as untrusted; building gives loadable, fixed bytes."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from raymerge.errors import CheckpointError
from raymerge.safetensors_format import build_header, read_header
from raymerge.storage.local import LocalSource


def raw_file(path, header: dict, data: bytes = b"", declared_len: int | None = None) -> None:
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", declared_len if declared_len is not None else len(text)))
        f.write(text)
        f.write(data)


def parse(tmp_path, header, data=b"", declared_len=None):
    raw_file(tmp_path / "x.safetensors", header, data, declared_len)
    return read_header(LocalSource(str(tmp_path)), "x.safetensors")


def test_reads_a_real_file(tmp_path):
    save_file(
        {"a": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16)},
        str(tmp_path / "x.safetensors"),
    )
    entries, metadata = read_header(LocalSource(str(tmp_path)), "x.safetensors")
    assert entries["a"].shape == (2, 3) and entries["a"].dtype == "F32"
    assert entries["b"].nbytes == 8


@pytest.mark.parametrize(
    "header, data, message",
    [
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}},
            b"\0" * 8,
            "hold 16 bytes",
        ),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
            b"\0" * 4,
            "run past the end",
        ),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "data_offsets"),
        (
            {"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}},
            b"\0" * 8,
            "unknown dtype 'Q4'",
        ),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "shape"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "overlap",
        ),
        ({"a": [1, 2]}, b"", "must be an object"),
        ({"__metadata__": {"x": 1}}, b"", "__metadata__"),
    ],
)
def test_rejects_bad_headers(tmp_path, header, data, message):
    with pytest.raises(CheckpointError, match=message):
        parse(tmp_path, header, data)


def test_rejects_absurd_header_length(tmp_path):
    with pytest.raises(CheckpointError, match="exceeds"):
        parse(tmp_path, {}, declared_len=2**60)


def test_rejects_header_longer_than_file(tmp_path):
    with pytest.raises(CheckpointError, match="truncated"):
        parse(tmp_path, {}, declared_len=10_000)


def test_rejects_non_json(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{]")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_header(LocalSource(str(tmp_path)), "x.safetensors")


def test_rejects_tiny_file(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="too short"):
        read_header(LocalSource(str(tmp_path)), "x.safetensors")


def test_built_header_loads_with_safetensors(tmp_path):
    tensors = {
        "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "v": torch.arange(3, dtype=torch.bfloat16),
    }
    header, offsets = build_header(
        [
            (n, {torch.float32: "F32", torch.bfloat16: "BF16"}[t.dtype], tuple(t.shape))
            for n, t in tensors.items()
        ]
    )
    assert len(header) % 8 == 0 and offsets[0] == len(header)
    blob = bytearray(header)
    for t in tensors.values():
        blob += t.contiguous().view(torch.uint8).numpy().tobytes()
    (tmp_path / "o.safetensors").write_bytes(bytes(blob))
    loaded = load_file(str(tmp_path / "o.safetensors"))
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t)
    again, _ = build_header([("w", "F32", (2, 3)), ("v", "BF16", (3,))])
    assert again == header  # same tensors, same bytes
