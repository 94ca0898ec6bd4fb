"""A pool of page-aligned IO buffers, so the hot path does not mmap per request."""

from __future__ import annotations

import mmap
import threading
from contextlib import contextmanager
from typing import Iterator

from wqs.nvme.device import PAGE_SIZE, aligned_buffer

MIN_CLASS = 64 * 1024


def size_class(nbytes: int) -> int:
    """The power of two (at least 64 KiB) a request for nbytes is served from."""
    c = MIN_CLASS
    while c < nbytes:
        c <<= 1
    return c


class BufferPool:
    """Free lists of aligned buffers by power-of-two size, bounded by `max_cached_bytes`."""

    def __init__(self, max_cached_bytes: int = 256 * 1024 * 1024) -> None:
        self.max_cached_bytes = max_cached_bytes
        self.cached_bytes = 0
        self._free: dict[int, list[mmap.mmap]] = {}
        self._lock = threading.Lock()

    def acquire(self, nbytes: int) -> mmap.mmap:
        c = size_class(nbytes)
        with self._lock:
            free = self._free.get(c)
            if free:
                self.cached_bytes -= c
                return free.pop()
        return aligned_buffer(c)

    def release(self, buf: mmap.mmap) -> None:
        c = len(buf)
        assert c % PAGE_SIZE == 0
        with self._lock:
            if self.cached_bytes + c <= self.max_cached_bytes:
                self._free.setdefault(c, []).append(buf)
                self.cached_bytes += c
                return
        buf.close()

    @contextmanager
    def borrow(self, nbytes: int) -> Iterator[memoryview]:
        """A memoryview of exactly nbytes over a pooled buffer, returned on exit."""
        buf = self.acquire(nbytes)
        view = memoryview(buf)[:nbytes]
        try:
            yield view
        finally:
            view.release()
            self.release(buf)
