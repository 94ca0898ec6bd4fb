"""The IO ring's interface over a few threads, for systems where native AIO is refused.

Each IO is one preadv/pwritev in a pool thread (they release the GIL); its result goes
onto a queue and the thread bumps an eventfd, so the owning loop completes it exactly
as it completes AIO. That is a hand-off between threads per IO, which native AIO avoids:
it is the fallback (`io_engine: threads`, or `auto` where io_setup fails), not the path
to measure.
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import threading
from collections import deque
from typing import Any

from wqs.nvme.aio import IOV_MAX, Callback


class DoneQueue:
    """Completions waiting for the loop: (callback, arg, result) on a deque, signalled by
    an eventfd the loop watches. For rings that complete IO outside the kernel's AIO."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._done: deque[tuple[Callback, Any, int]] = deque()
        self.in_flight = 0

    def _finished(self, cb: Callback, arg: Any, res: int) -> None:
        """One IO is done (any thread): queue its callback, wake the loop."""
        self._done.append((cb, arg, res))  # deque.append is atomic
        try:
            os.eventfd_write(self.fd, 1)
        except OSError:
            pass  # closed under us: the ring is gone

    def complete(self) -> int:
        """Run the callbacks of the IOs done so far (the loop's thread)."""
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        n = 0
        while self._done:
            cb, arg, res = self._done.popleft()
            self.in_flight -= 1
            cb(arg, res)
            n += 1
        return n


def _memory(addr: int, nbytes: int) -> memoryview:
    return memoryview((ctypes.c_char * nbytes).from_address(addr)).cast("B")


class ThreadRing(DoneQueue):
    """AioRing's interface (read, writev, submit, complete, fd) over `threads` threads."""

    def __init__(self, fd: int, base: int = 0, threads: int = 16) -> None:
        assert threads >= 1
        super().__init__()
        self._dev_fd = fd
        self._base = base
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._queued: list[tuple] = []
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name=f"wqs-io-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    @property
    def pending(self) -> int:
        return self.in_flight + len(self._queued)

    def read(self, offset: int, addr: int, nbytes: int, callback: Callback, arg: Any) -> None:
        self._queued.append((False, offset, [(addr, nbytes)], 0, callback, arg))

    def writev(self, offset: int, iov: list[tuple[int, int]], callback: Callback, arg: Any,
               dsync: bool = False) -> None:
        assert 0 < len(iov) <= IOV_MAX
        self._queued.append((True, offset, list(iov), os.RWF_DSYNC if dsync else 0,
                             callback, arg))

    def submit(self) -> None:
        for item in self._queued:
            self.in_flight += 1
            self._work.put(item)
        self._queued.clear()

    def _run(self) -> None:
        while (item := self._work.get()) is not None:
            write, offset, iov, flags, cb, arg = item
            bufs = [_memory(a, n) for a, n in iov]
            total = sum(n for _, n in iov)
            res = 0
            try:
                while res < total:  # a short transfer is retried for the rest
                    rest = _skip(bufs, res)
                    if write:
                        n = os.pwritev(self._dev_fd, rest, self._base + offset + res, flags)
                    else:
                        n = os.preadv(self._dev_fd, rest, self._base + offset + res)
                    if n <= 0:
                        break
                    res += n
            except OSError as e:
                res = -(e.errno or errno.EIO)
            self._finished(cb, arg, res)

    def close(self) -> None:
        """Finish the IOs already handed to the threads, then stop them."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._work.put(None)
        for t in self._threads:
            t.join()
        os.close(self.fd)


def _skip(bufs: list[memoryview], n: int) -> list[memoryview]:
    """The buffers left after the first n bytes."""
    out = []
    for b in bufs:
        if n >= len(b):
            n -= len(b)
            continue
        out.append(b[n:])
        n = 0
    return out
