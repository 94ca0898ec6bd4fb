"""A pool of page-aligned IO buffers, so the hot path does not mmap per request."""

from __future__ import annotations

import mmap
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
    """Free lists of aligned buffers by power-of-two size, bounded by `max_cached_bytes`.

    No lock: list.append and list.pop are atomic under the GIL, and with 32 IO threads
    a lock here was the hottest point of contention on the read path. The byte count
    may drift by a buffer or two under races; it only bounds what is kept.
    """

    def __init__(self, max_cached_bytes: int = 256 * 1024 * 1024) -> None:
        self.max_cached_bytes = max_cached_bytes
        self.cached_bytes = 0
        self._free: dict[int, list[mmap.mmap]] = {}

    def acquire(self, nbytes: int) -> mmap.mmap:
        c = size_class(nbytes)
        free = self._free.get(c)
        if free:
            try:
                buf = free.pop()
            except IndexError:  # another thread took the last one
                return aligned_buffer(c)
            self.cached_bytes -= c
            return buf
        return aligned_buffer(c)

    def release(self, buf: mmap.mmap) -> None:
        c = len(buf)
        assert c % PAGE_SIZE == 0
        if self.cached_bytes + c <= self.max_cached_bytes:
            self._free.setdefault(c, []).append(buf)
            self.cached_bytes += c
            return
        try:
            buf.close()
        except BufferError:
            pass  # a view of it is still alive somewhere; the GC unmaps it later

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
