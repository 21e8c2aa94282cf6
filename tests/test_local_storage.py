"""The local destination's shard files: reserved at their size, with a clear error when the
disk is full, and a sparse file where the filesystem cannot reserve."""

from __future__ import annotations

import errno
import os

import pytest

from raymerge import malloc
from raymerge.errors import MergeFailed
from raymerge.storage.local import LocalDestination


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
