"""Local (or shared-filesystem) storage: positional reads and writes on plain files."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import tempfile

from raymerge.errors import CheckpointError, MergeFailed
from raymerge.sizes import human

PARTIAL_SUFFIX = ".partial"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _truncated(path: str, ends: int, expected: int) -> CheckpointError:
    return CheckpointError(
        f"{path}: file ends at byte {ends}, but {expected} were expected (truncated file?); "
        "re-download or re-save the checkpoint"
    )


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
                    raise _truncated(path, start + done, start + len(buffer))
                done += n
        finally:
            os.close(fd)

    def map_range(self, name: str, start: int, length: int) -> memoryview:
        """Bytes [start, start + length) of a file as a view of the page cache: no copy, no
        buffer to fill (pages are mapped as the merge touches them; readahead is asked for
        now). Private and copy-on-write, so nothing written to it reaches the file."""
        path = self._path(name)
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if start + length > size:
                raise _truncated(path, size, start + length)
            lead = start % mmap.ALLOCATIONGRANULARITY
            access = mmap.PROT_READ | mmap.PROT_WRITE
            region = mmap.mmap(fd, lead + length, mmap.MAP_PRIVATE, access, offset=start - lead)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, start, length, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)
        return memoryview(region)[lead : lead + length]

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

    whole_parts = False  # units of one part may be written by different workers

    def __init__(self, root: str, fsync: bool = False) -> None:
        self.root = str(root)
        self.fsync = fsync
        self._checked: set[str] = set()  # folders made and found not to be links

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def describe(self, name: str) -> str:
        return self._path(name)

    def list(self) -> list[str]:
        return self.list_dir("")

    def list_dir(self, name: str) -> list[str]:
        """Entries of a folder under the root, folders with a trailing '/'; a symlink is
        listed as a file, never followed."""
        path = self._path(name) if name else self.root
        if os.path.islink(path) or not os.path.isdir(path):
            return []
        return sorted(
            entry.name + ("/" if entry.is_dir(follow_symlinks=False) else "")
            for entry in os.scandir(path)
        )

    def read_text(self, name: str) -> str | None:
        """A small file's text; None when absent, unreadable, a symlink or not text."""
        try:
            fd = os.open(self._path(name), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            with os.fdopen(fd, "rb") as f:
                return f.read().decode()
        except (OSError, UnicodeDecodeError):
            return None

    def _folder_for(self, path: str) -> None:
        """Create the folders above `path`, refusing any that is a symlink (each folder is
        checked once per process: a unit record's folder is the same thousands of times)."""
        folder = os.path.dirname(path)
        if folder in self._checked:
            return
        os.makedirs(folder, exist_ok=True)
        probe = folder
        while len(probe) >= len(self.root) and probe != os.path.dirname(probe):
            if os.path.islink(probe) and probe != self.root.rstrip("/"):
                raise MergeFailed(f"{probe} is a symlink; raymerge does not write through links")
            if probe == self.root.rstrip("/"):
                break
            probe = os.path.dirname(probe)
        self._checked.add(folder)

    def write_file(self, name: str, data: bytes) -> None:
        """Write under a fresh temporary name (never an existing file or link), then rename:
        the file appears complete or not at all."""
        path = self._path(name)
        self._folder_for(path)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".raymerge-", suffix=".tmp")
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if self.fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Create a small file only if nothing has that name yet; False when it exists."""
        path = self._path(name)
        self._folder_for(path)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def remove(self, name: str) -> None:
        """Remove a file, a symlink (not what it points to) or a folder tree of them."""
        path = self._path(name)
        if os.path.isdir(path) and not os.path.islink(path):
            for child in self.list_dir(name):
                self.remove(os.path.join(name, child.rstrip("/")))
            os.rmdir(path)
        elif os.path.lexists(path):
            os.remove(path)

    def begin_shard(self, name: str, size: int, previous: str | None) -> tuple[str, bool]:
        """Create the partial file at its final size, or keep the one an earlier run left."""
        path = self._path(name) + PARTIAL_SUFFIX
        self._folder_for(path)
        if (
            previous == path
            and not os.path.islink(path)
            and os.path.isfile(path)
            and (os.path.getsize(path) == size)
        ):
            return path, True
        if os.path.lexists(path):
            os.remove(path)  # our own name: a stale partial, or a link someone left there
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            _allocate(fd, size)
        except OSError as exc:
            os.close(fd)
            os.remove(path)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise MergeFailed(
                    f"{self.describe(name)}: no room for this {human(size)} shard "
                    f"({exc.strerror}); free some space or write the merge elsewhere"
                ) from None
            raise MergeFailed(
                f"{self.describe(name)}: cannot create this {human(size)} shard "
                f"({exc.strerror})"
            ) from None
        os.close(fd)
        return path, False

    def write_part(self, name: str, token: str, part_number: int, offset: int, data) -> str:
        try:
            fd = os.open(token, os.O_WRONLY | os.O_NOFOLLOW)
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
        """Bytes written earlier; b"" when they cannot be read (never taken as intact)."""
        try:
            fd = os.open(token, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return b""
        try:
            return os.pread(fd, length, start)
        except OSError:
            return b""
        finally:
            os.close(fd)

    def uploaded_parts(self, name: str, token: str) -> dict[int, str] | None:
        return None  # a local shard's bytes are read back and checked instead

    def commit_shard(self, name: str, token: str, receipts: list[str]) -> None:
        if self.fsync:
            fd = os.open(token, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(token, self._path(name))

    def abort_shard(self, name: str, token: str) -> None:
        """Remove the shard's partial file (only ever that name, whatever `token` says)."""
        path = self._path(name) + PARTIAL_SUFFIX
        if token == path and os.path.lexists(path):
            os.remove(path)

    def __reduce__(self):
        return (LocalDestination, (self.root, self.fsync))


def _allocate(fd: int, size: int) -> None:
    """Give a new shard file its size with its blocks reserved: writes into allocated blocks
    ran about twice as fast as into a sparse file's holes on ext4, and a full disk is found
    before any merging. Where the filesystem cannot reserve, a sparse file of that size."""
    if size and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
    os.ftruncate(fd, size)
