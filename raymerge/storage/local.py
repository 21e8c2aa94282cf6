"""Local (or shared-filesystem) storage: positional reads and writes on plain files."""

from __future__ import annotations

import os
from pathlib import Path

from raymerge.errors import CheckpointError, MergeFailed

PARTIAL_SUFFIX = ".partial"


class LocalSource:
    """Reads files under a folder (or a single file's folder)."""

    def __init__(self, root: str) -> None:
        self.root = str(root)

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def describe(self, name: str) -> str:
        return self._path(name)

    def exists(self, name: str) -> bool:
        return os.path.isfile(self._path(name))

    def size(self, name: str) -> int:
        return os.path.getsize(self._path(name))

    def list(self) -> list[str]:
        return sorted(os.listdir(self.root))

    def read_range(self, name: str, start: int, length: int) -> bytes:
        buffer = bytearray(length)
        self.readinto(name, start, memoryview(buffer))
        return bytes(buffer)

    def readinto(self, name: str, start: int, buffer: memoryview) -> None:
        path = self._path(name)
        fd = os.open(path, os.O_RDONLY)
        try:
            done = 0
            while done < len(buffer):
                n = os.preadv(fd, [buffer[done:]], start + done)
                if n == 0:
                    raise CheckpointError(
                        f"{path}: file ends at byte {start + done}, but {start + len(buffer)} "
                        "were expected (truncated file?); re-download or re-save the checkpoint"
                    )
                done += n
        finally:
            os.close(fd)

    def fingerprint(self, name: str) -> str:
        st = os.stat(self._path(name))
        return f"{st.st_size}:{st.st_mtime_ns}"

    def __reduce__(self):
        return (LocalSource, (self.root,))


class LocalDestination:
    """Writes shards under a temporary name, part by part, then renames them.

    With `fsync`, a shard and every small file reach the disk before they get their final
    name; without it (the default, as mergekit and `save_pretrained` do) data may sit in the
    page cache, and a resumed run rechecks the parts it did not write itself.
    """

    def __init__(self, root: str, fsync: bool = False) -> None:
        self.root = str(root)
        self.fsync = fsync

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def describe(self, name: str) -> str:
        return self._path(name)

    def list(self) -> list[str]:
        if not os.path.isdir(self.root):
            return []
        return sorted(
            entry.name + ("/" if entry.is_dir() else "") for entry in os.scandir(self.root)
        )

    def read_text(self, name: str) -> str | None:
        try:
            return Path(self._path(name)).read_text()
        except FileNotFoundError:
            return None

    def write_file(self, name: str, data: bytes) -> None:
        path = self._path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + PARTIAL_SUFFIX
        with open(tmp, "wb") as f:
            f.write(data)
            if self.fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)

    def remove(self, name: str) -> None:
        path = self._path(name)
        if os.path.isdir(path):
            for child in sorted(os.listdir(path)):
                self.remove(os.path.join(name, child))
            os.rmdir(path)
        elif os.path.lexists(path):
            os.remove(path)

    def begin_shard(self, name: str, size: int, previous: str | None) -> tuple[str, bool]:
        """Create the partial file at its final size, or keep the one an earlier run left."""
        os.makedirs(self.root, exist_ok=True)
        path = self._path(name) + PARTIAL_SUFFIX
        if previous == path and os.path.isfile(path) and os.path.getsize(path) == size:
            return path, True
        with open(path, "wb") as f:
            f.truncate(size)
        return path, False

    def write_part(self, name: str, token: str, part_number: int, offset: int, data) -> str:
        try:
            fd = os.open(token, os.O_WRONLY)
        except FileNotFoundError as exc:
            raise MergeFailed(
                f"{token}: the partial shard is gone (is the output folder on a filesystem "
                "that every Ray node shares?)"
            ) from exc
        try:
            view = memoryview(data).cast("B")
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
        finally:
            os.close(fd)
        return ""

    def read_part(self, token: str, start: int, length: int) -> bytes | None:
        try:
            with open(token, "rb") as f:
                f.seek(start)
                return f.read(length)
        except OSError:
            return None

    def commit_shard(self, name: str, token: str, receipts: list[str]) -> None:
        if self.fsync:
            fd = os.open(token, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(token, self._path(name))

    def abort_shard(self, name: str, token: str) -> None:
        if os.path.exists(token):
            os.remove(token)

    def __reduce__(self):
        return (LocalDestination, (self.root, self.fsync))
