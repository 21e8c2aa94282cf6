"""Local storage: shard files reserved at their size (a clear error when the disk is full, a
sparse file where the filesystem cannot reserve), and input ranges mapped instead of read."""

from __future__ import annotations

import errno
import mmap
import os

import pytest

from raymerge import malloc
from raymerge.errors import CheckpointError, MergeFailed
from raymerge.storage.local import LocalDestination, LocalSource


def fail_with(code: int):
    def allocate(fd, offset, length):
        raise OSError(code, os.strerror(code))

    return allocate


def test_a_new_shard_has_its_size_and_its_blocks(tmp_path):
    destination = LocalDestination(str(tmp_path))
    token, resumed = destination.begin_shard("model.safetensors", 3 << 20, None)
    assert not resumed and os.path.getsize(token) == 3 << 20
    assert os.stat(token).st_blocks * 512 >= 3 << 20  # reserved, not a hole
    with open(token, "rb") as f:
        assert f.read() == bytes(3 << 20)


def test_a_full_disk_is_one_clear_error_and_leaves_no_partial(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "posix_fallocate", fail_with(errno.ENOSPC))
    destination = LocalDestination(str(tmp_path))
    with pytest.raises(MergeFailed, match="no room for this 1.00 GiB shard"):
        destination.begin_shard("model.safetensors", 1 << 30, None)
    assert not os.path.exists(tmp_path / "model.safetensors.partial")


def test_a_filesystem_that_cannot_reserve_gets_a_sparse_file(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "posix_fallocate", fail_with(errno.EOPNOTSUPP))
    destination = LocalDestination(str(tmp_path))
    token, _ = destination.begin_shard("model.safetensors", 5 << 20, None)
    assert os.path.getsize(token) == 5 << 20


def test_other_errors_say_what_failed(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "posix_fallocate", fail_with(errno.EIO))
    with pytest.raises(MergeFailed, match="cannot create this 5.00 MiB shard .Input/output error"):
        LocalDestination(str(tmp_path)).begin_shard("model.safetensors", 5 << 20, None)
    assert not os.path.exists(tmp_path / "model.safetensors.partial")


def test_malloc_settings_apply_on_glibc():
    assert malloc.tune() == (os.uname().sysname == "Linux")


def test_a_mapped_range_is_the_files_bytes_and_writes_stay_private(tmp_path):
    data = os.urandom(3 * mmap_granularity() + 123)
    (tmp_path / "w.bin").write_bytes(data)
    source = LocalSource(str(tmp_path))
    for start, length in ((0, 10), (5, mmap_granularity()), (mmap_granularity() + 7, 2000)):
        view = source.map_range("w.bin", start, length)
        assert bytes(view) == data[start : start + length]
        buffer = bytearray(length)
        source.readinto("w.bin", start, memoryview(buffer))
        assert bytes(buffer) == bytes(view)
        view[0] = view[0] ^ 0xFF  # copy-on-write: the file never changes
    assert (tmp_path / "w.bin").read_bytes() == data


def test_a_mapped_range_past_the_end_is_a_truncated_file(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"x" * 100)
    with pytest.raises(CheckpointError, match="file ends at byte 100, but 150 were expected"):
        LocalSource(str(tmp_path)).map_range("w.bin", 50, 100)


def mmap_granularity() -> int:
    return mmap.ALLOCATIONGRANULARITY
