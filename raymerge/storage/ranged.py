"""Reading remote files as ranged requests: a large read goes as READ_CHUNK requests in
parallel on one thread pool per process (S3 and the Hub serve each request from one
connection; many in flight keep the link full)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

READ_CHUNK = 8 << 20  # one ranged request (8-16 MiB keeps many in flight per unit)
READ_THREADS = 8  # ranged requests in flight per process

_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def read_pool() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="raymerge-read")
        return _pool


class RangedReads:
    """`read_range` and `readinto` for a Source whose `_get(name, start, target)` fills
    `target` from one ranged request."""

    read_chunk = READ_CHUNK

    def _get(self, name: str, start: int, target: memoryview) -> None:
        raise NotImplementedError

    def read_range(self, name: str, start: int, length: int) -> bytes:
        """Bytes [start, start + length) in one request (headers, indexes, one tensor)."""
        buffer = bytearray(length)
        if length:
            self._get(name, start, memoryview(buffer))
        return bytes(buffer)

    def readinto(self, name: str, start: int, buffer: memoryview) -> None:
        """Fill `buffer` with bytes [start, start + len), read_chunk bytes a request, the
        requests side by side."""
        view = memoryview(buffer).cast("B")
        length = len(view)
        if length <= self.read_chunk:
            if length:
                self._get(name, start, view)
            return
        chunk = self.read_chunk
        spans = [(lo, min(lo + chunk, length)) for lo in range(0, length, chunk)]
        futures = [read_pool().submit(self._get, name, start + lo, view[lo:hi])
                   for lo, hi in spans]  # fmt: skip
        for future in futures:
            future.result()


class BufferedReads:
    """`read_range` for a Source that implements `readinto`."""

    def readinto(self, name: str, start: int, buffer: memoryview) -> None:
        raise NotImplementedError

    def read_range(self, name: str, start: int, length: int) -> bytes:
        buffer = bytearray(length)
        if length:
            self.readinto(name, start, memoryview(buffer))
        return bytes(buffer)
