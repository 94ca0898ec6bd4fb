"""A BlockDevice in RAM, for measuring the engine's CPU ceiling.

With this device an IO costs one memcpy and no waiting, so what the engine does over it
is bounded by its own CPU (and the GIL) alone: how fast it could go on a disk that
never makes it wait. A real disk's DMA spares even the memcpy, so the ceiling measured
here is a little low, by one 64 KiB copy (a few µs) per IO.

Not for storing anything: nothing survives the process, and nothing is checked for
O_DIRECT alignment beyond what BlockDevice promises.
"""

from __future__ import annotations

import mmap
from typing import Callable, Iterable, Sequence

ALIGN = 4096


class MemoryDevice:
    """BlockDevice over one anonymous mapping of `size` bytes."""

    io_engine = "memory"

    def __init__(self, size: int) -> None:
        assert size > 0 and size % ALIGN == 0
        self.path = f"<memory {size} B>"
        self.size = size
        self.align = ALIGN
        self._mem = mmap.mmap(-1, size)
        self._view = memoryview(self._mem)

    def read_into(self, offset: int, buf: memoryview) -> None:
        self._check(offset, len(buf))
        buf[:] = self._view[offset : offset + len(buf)]

    def write(self, offset: int, buf: memoryview) -> None:
        self._check(offset, len(buf))
        self._view[offset : offset + len(buf)] = buf

    def read_many(self, requests: Sequence[tuple[int, memoryview]],
                  on_complete: Callable[[int], None] | None = None) -> None:
        for i, (offset, buf) in enumerate(requests):
            self.read_into(offset, buf)
            if on_complete is not None:
                on_complete(i)

    def write_many(self, requests: Iterable[tuple[int, memoryview]]) -> None:
        for offset, buf in requests:
            self.write(offset, buf)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._view.release()
        self._mem.close()

    def _check(self, offset: int, length: int) -> None:
        assert offset % ALIGN == 0 and length % ALIGN == 0, "unaligned IO"
        assert 0 <= offset and offset + length <= self.size, "IO outside the device"
