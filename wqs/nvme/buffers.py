"""Page-aligned IO buffers, allocated once and reused, with their addresses known.

The data path moves bytes by the kernel into and out of these: a PUT payload is received
by recv_into straight into the buffer its entry is written from, a GET answer is sent
by sendmsg straight from the buffer its entry was read into. Each buffer keeps its
address, so an IO costs no ctypes look-up.

A pool has one owner (a shard's loop, or the engine facade under its lock): no lock.
"""

from __future__ import annotations

import ctypes
import mmap
from contextlib import contextmanager
from typing import Callable, Iterator

PAGE_SIZE = mmap.PAGESIZE
SMALL_CLASS_LIMIT = 1 << 20  # up to here sizes are rounded to pages, above to powers of 2


def round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """A zero-filled, page-aligned buffer, usable for O_DIRECT IO.

    Anonymous mmap memory is page aligned by construction, which is why it is used
    rather than bytearray (whose address alignment is not guaranteed).
    """
    assert nbytes > 0
    return mmap.mmap(-1, round_up(nbytes, PAGE_SIZE))


def size_class(nbytes: int) -> int:
    """The size a request for nbytes is served from: whole pages up to 1 MiB (KV blocks
    are all one size, so their entries share one class without waste), then powers of 2."""
    if nbytes <= SMALL_CLASS_LIMIT:
        return round_up(max(nbytes, 1), PAGE_SIZE)
    c = SMALL_CLASS_LIMIT
    while c < nbytes:
        c <<= 1
    return c


class IoBuffer:
    """One aligned buffer: its memory, a byte view of all of it, and its address."""

    __slots__ = ("mem", "view", "addr", "size")

    def __init__(self, size: int) -> None:
        self.mem = aligned_buffer(size)
        self.size = len(self.mem)
        self.view = memoryview(self.mem)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))

    def free(self) -> None:
        self.view.release()
        try:
            self.mem.close()
        except BufferError:
            pass  # a view of it is still alive somewhere; the GC unmaps it later


class BufferPool:
    """Free lists of IoBuffers by size class, keeping at most `max_cached_bytes` idle.

    `allocate(size)` makes a new buffer of a size class: plain memory by default, the
    device's own where it has a say (SPDK's DMA memory, spdk.py)."""

    def __init__(self, max_cached_bytes: int = 256 << 20,
                 allocate: Callable[[int], IoBuffer] = IoBuffer) -> None:
        self.max_cached_bytes = max_cached_bytes
        self._allocate = allocate
        self.cached_bytes = 0
        self.outstanding = 0  # buffers handed out and not yet released (a leak check)
        self._free: dict[int, list[IoBuffer]] = {}
        self._classes: dict[int, int] = {}  # nbytes -> size class, for the sizes seen

    def acquire(self, nbytes: int) -> IoBuffer:
        self.outstanding += 1
        c = self._classes.get(nbytes)
        if c is None:
            c = size_class(nbytes)
            if len(self._classes) < 4096:  # a workload of random sizes must not grow it
                self._classes[nbytes] = c
        free = self._free.get(c)
        if free:
            self.cached_bytes -= c
            return free.pop()
        return self._allocate(c)

    def release(self, buf: IoBuffer) -> None:
        self.outstanding -= 1
        assert self.outstanding >= 0, "a buffer was released twice"
        if self.cached_bytes + buf.size <= self.max_cached_bytes:
            self._free.setdefault(buf.size, []).append(buf)
            self.cached_bytes += buf.size
        else:
            buf.free()

    @contextmanager
    def borrow(self, nbytes: int) -> Iterator[IoBuffer]:
        buf = self.acquire(nbytes)
        try:
            yield buf
        finally:
            self.release(buf)

    def clear(self) -> None:
        for bufs in self._free.values():
            for b in bufs:
                b.free()
        self._free.clear()
        self.cached_bytes = 0
