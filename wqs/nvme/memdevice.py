"""A BlockDevice in RAM: for tests of the engine's parts, and for measuring its CPU ceiling.

With this device an IO costs one memcpy and no waiting, so what the engine does over it
is bounded by its own CPU alone: how fast it could go on a disk that never makes it
wait. A real disk's DMA spares even the memcpy, so that ceiling is a little low, by one
64 KiB copy (a few µs) per IO.

Nothing survives the process. `fail_writes_after` makes every write after the first N
fail with EIO (crash and error-path tests); `tear_write` cuts the next write short.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from typing import Any, Callable

from wqs.nvme.threadring import DoneQueue

ALIGN = 4096


class MemoryRing(DoneQueue):
    """IoRing over memory: submit() does the copies at once; the callbacks run when the
    loop next calls complete(), as with a real device (never inside submit)."""

    def __init__(self, device: "MemoryDevice", base: int) -> None:
        super().__init__()
        self._device = device
        self._base = base
        self._queued: list[tuple] = []

    @property
    def pending(self) -> int:
        return self.in_flight + len(self._queued)

    def read(self, offset: int, addr: int, nbytes: int,
             callback: Callable[[Any, int], None], arg: Any) -> None:
        self._queued.append((False, offset, [(addr, nbytes)], callback, arg))

    def writev(self, offset: int, iov: list[tuple[int, int]],
               callback: Callable[[Any, int], None], arg: Any, dsync: bool = False) -> None:
        self._queued.append((True, offset, list(iov), callback, arg))

    def submit(self) -> None:
        if not self._queued:
            return
        for write, offset, iov, cb, arg in self._queued:
            self.in_flight += 1
            self._finished(cb, arg, self._device.transfer(write, self._base + offset, iov))
        self._queued.clear()

    def close(self) -> None:
        os.close(self.fd)


class MemoryDevice:
    """BlockDevice over one anonymous mapping of `size` bytes."""

    io_engine = "memory"

    def __init__(self, size: int) -> None:
        assert size > 0 and size % ALIGN == 0
        self.path = f"<memory {size} B>"
        self.size = size
        self.align = ALIGN
        self._mem = mmap.mmap(-1, size)
        self._addr = ctypes.addressof(ctypes.c_char.from_buffer(self._mem))
        self.writes = 0  # write IOs so far (tests count them)
        self.fail_writes_after: int | None = None
        self.tear_write: int | None = None  # bytes the next write keeps, then it fails

    def read_into(self, offset: int, buf: memoryview) -> None:
        self._check(offset, len(buf))
        buf[:] = self._mem[offset : offset + len(buf)]

    def write(self, offset: int, buf: memoryview) -> None:
        self._check(offset, len(buf))
        self._mem[offset : offset + len(buf)] = bytes(buf)

    def transfer(self, write: bool, offset: int, iov: list[tuple[int, int]]) -> int:
        """One ring IO: the bytes moved, or -errno."""
        total = sum(n for _, n in iov)
        self._check(offset, total)
        if write:
            self.writes += 1
            if self.fail_writes_after is not None and self.writes > self.fail_writes_after:
                return -errno.EIO
        keep = total
        if write and self.tear_write is not None:
            keep, self.tear_write = self.tear_write, None
        pos = offset
        for addr, n in iov:
            n = min(n, offset + keep - pos)
            if n <= 0:
                break
            if write:
                ctypes.memmove(self._addr + pos, addr, n)
            else:
                ctypes.memmove(addr, self._addr + pos, n)
            pos += n
        return total if keep == total else -errno.EIO

    def open_ring(self, base: int = 0) -> MemoryRing:
        return MemoryRing(self, base)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass  # the mapping lives as long as the object: a test may reopen the device

    def _check(self, offset: int, length: int) -> None:
        assert offset % ALIGN == 0 and length % ALIGN == 0, "unaligned IO"
        assert 0 <= offset and offset + length <= self.size, "IO outside the device"
