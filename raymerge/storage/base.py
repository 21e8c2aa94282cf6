"""The two small interfaces every storage backend implements.

A `Source` reads byte ranges of files under a root (a checkpoint); a `Destination` receives
a merge's output: shards written part by part at fixed offsets, then committed whole, and
small files written atomically. Both are picklable so Ray workers can rebuild them.
"""

from __future__ import annotations

from typing import Protocol


class Source(Protocol):
    root: str

    def describe(self, name: str) -> str:
        """The file's full location, for messages."""
        ...

    def exists(self, name: str) -> bool: ...

    def size(self, name: str) -> int: ...

    def list(self) -> list[str]:
        """Names of the files directly under the root."""
        ...

    def read_range(self, name: str, start: int, length: int) -> bytes: ...

    def readinto(self, name: str, start: int, buffer: memoryview) -> None:
        """Fill `buffer` from `start`; raises CheckpointError if the file is too short."""
        ...

    def fingerprint(self, name: str) -> str:
        """Changes when the file's content may have changed (size, mtime or ETag)."""
        ...


class Destination(Protocol):
    root: str
    whole_parts: bool  # True: a part's bytes must be sent in one call (an S3 upload part)

    def describe(self, name: str) -> str: ...

    def list(self) -> list[str]:
        """Names of the entries under the root, folders with a trailing '/'."""
        ...

    def list_dir(self, name: str) -> list[str]:
        """Names of the entries in a folder under the root, folders with a trailing '/'."""
        ...

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Create a small file only if nothing has that name yet; False when it exists."""
        ...

    def read_text(self, name: str) -> str | None:
        """A small file's text, or None when it does not exist."""
        ...

    def write_file(self, name: str, data: bytes) -> None:
        """Write a whole small file so that it appears complete or not at all."""
        ...

    def remove(self, name: str) -> None: ...

    def begin_shard(self, name: str, size: int, previous: str | None) -> tuple[str, bool]:
        """Prepare an output shard of `size` bytes, or pick up the one `previous` names.

        Returns the token `write_part` needs and whether the earlier parts are still there.
        """
        ...

    def write_part(self, name: str, token: str, part_number: int, offset: int, data) -> str:
        """Write one part at its offset; returns what `commit_shard` needs for it."""
        ...

    def read_part(self, token: str, start: int, length: int) -> bytes | None:
        """Bytes already written to a shard (b"" or short when they cannot be read), or None
        where a store cannot read them back (an S3 upload's parts, which S3 itself checks)."""
        ...

    def uploaded_parts(self, name: str, token: str) -> dict[int, str] | None:
        """Part number -> receipt of the parts the store holds (S3's ListParts), or None
        where parts are read back and checked instead."""
        ...

    def commit_shard(self, name: str, token: str, receipts: list[str]) -> None:
        """Make the shard visible under its final name, once every part is in."""
        ...

    def abort_shard(self, name: str, token: str) -> None:
        """Drop an unfinished shard (remove its partial file, abort its upload)."""
        ...
