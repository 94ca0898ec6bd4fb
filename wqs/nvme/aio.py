"""Batches of O_DIRECT reads or writes through Linux native AIO (io_submit/io_getevents).

Why: the engine reads and writes a batch of blocks at once (get_many, a commit group).
Handing each IO to a pool thread costs tens of µs of interpreter time per IO on a busy
process (every hand-off fights for the GIL), more than the IO itself. Here a batch is
one io_submit and a few io_getevents calls, which block without the GIL, whatever the
queue depth. This is what fio's libaio engine does.

Why by hand: the calls are four system calls on two fixed kernel structs (stable ABI
since Linux 2.6), filled here with one numpy operation per field. python-libaio builds
a ctypes object graph per IO (about 2x the CPU per 64 KiB read in our measurement) and
needs the libaio shared library; the io_uring binding on PyPI accepts only bytearray
buffers, which are not aligned for O_DIRECT.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from wqs.errors import DeviceError

IOCB_CMD_PREAD = 0
IOCB_CMD_PWRITE = 1
MAX_EVENTS = 256  # IOs in flight per context; a larger batch goes in rounds
MAX_CONTEXTS = 8  # contexts per device: 256 events each count against fs.aio-max-nr


@dataclass(frozen=True)
class _Syscalls:
    setup: int
    destroy: int
    submit: int
    getevents: int


# io_setup, io_destroy, io_submit, io_getevents by architecture (asm/unistd.h).
_SYSCALLS = {
    "x86_64": _Syscalls(206, 207, 209, 208),
    "aarch64": _Syscalls(0, 1, 2, 4),
}

# struct iocb and struct io_event from <linux/aio_abi.h>, little-endian layout.
_IOCB = np.dtype([
    ("data", "<u8"), ("key", "<u4"), ("rw_flags", "<i4"), ("opcode", "<u2"), ("prio", "<i2"),
    ("fd", "<u4"), ("buf", "<u8"), ("nbytes", "<u8"), ("offset", "<i8"), ("reserved2", "<u8"),
    ("flags", "<u4"), ("resfd", "<u4"),
])
_EVENT = np.dtype([("data", "<u8"), ("obj", "<u8"), ("res", "<i8"), ("res2", "<i8")])
assert _IOCB.itemsize == 64 and _EVENT.itemsize == 32


def _libc_syscall() -> ctypes._CFuncPtr:
    fn = ctypes.CDLL(None, use_errno=True).syscall  # CDLL calls release the GIL
    fn.restype = ctypes.c_long
    fn.argtypes = [ctypes.c_long] * 6
    return fn


def unavailable_reason() -> str | None:
    """Why native AIO cannot be used here, or None if it can."""
    if platform.machine() not in _SYSCALLS or not np.little_endian:
        return f"native AIO system call numbers are not known for {platform.machine()}"
    try:
        ctx = _Context(_libc_syscall(), _SYSCALLS[platform.machine()], 1)
    except OSError as e:
        return f"io_setup failed: {e.strerror} (fs.aio-max-nr, or a sandbox without AIO)"
    ctx.destroy()
    return None


def _address(buf: memoryview) -> int:
    """Where a buffer's memory starts (for the kernel to read or write it)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(buf))  # writable: the quick way
    except TypeError:
        return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


class _Context:
    """One kernel AIO context with its iocb and event arrays; used by one batch at a time."""

    def __init__(self, syscall: ctypes._CFuncPtr, nums: _Syscalls, nr_events: int) -> None:
        self._syscall = syscall
        self._nums = nums
        ctx_id = ctypes.c_ulong(0)
        if syscall(nums.setup, nr_events, ctypes.addressof(ctx_id), 0, 0, 0) < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.id = ctx_id.value
        self.iocbs = np.zeros(nr_events, dtype=_IOCB)
        self.iocbs["data"] = np.arange(nr_events)  # a completion names its iocb slot
        self.iocb_ptrs = (self.iocbs.ctypes.data
                          + np.arange(nr_events, dtype=np.uint64) * _IOCB.itemsize)
        self.events = np.zeros(nr_events, dtype=_EVENT)

    def submit(self, ptrs: np.ndarray) -> int:
        """io_submit the iocbs `ptrs` points at; how many the kernel took, or -errno."""
        n = self._syscall(self._nums.submit, self.id, len(ptrs), ptrs.ctypes.data, 0, 0)
        return n if n >= 0 else -ctypes.get_errno()

    def reap(self, min_nr: int, max_nr: int) -> np.ndarray:
        """Wait for at least min_nr completions (at most max_nr); their events."""
        while True:
            n = self._syscall(self._nums.getevents, self.id, min_nr, max_nr,
                              self.events.ctypes.data, 0)
            if n >= 0:
                return self.events[:n]
            err = ctypes.get_errno()
            if err != errno.EINTR:
                raise OSError(err, os.strerror(err))

    def destroy(self) -> None:
        # io_destroy waits for the context's IOs in flight before it returns.
        self._syscall(self._nums.destroy, self.id, 0, 0, 0, 0)


class AioQueue:
    """Batches of reads or writes on one file descriptor. Thread-safe: each batch takes
    a context of its own, so concurrent batches never see each other's completions.

    Contexts are made as concurrent batches need them, up to MAX_CONTEXTS; beyond that
    (or when the kernel's fs.aio-max-nr is used up) a batch waits for one to be free.
    """

    def __init__(self, fd: int) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise DeviceError(reason)
        self._fd = fd
        self._syscall = _libc_syscall()
        self._nums = _SYSCALLS[platform.machine()]
        self._free: list[_Context] = []
        self._all: list[_Context] = []
        self._pid = os.getpid()
        self._changed = threading.Condition(threading.Lock())

    def batch(self, opcode: int) -> "AioBatch":
        with self._changed:
            if os.getpid() != self._pid:
                # A forked child does not inherit AIO contexts: start afresh (the
                # parent's are not the child's to destroy).
                self._free, self._all, self._pid = [], [], os.getpid()
            ctx = None
            while ctx is None:
                if self._free:
                    ctx = self._free.pop()
                elif len(self._all) < MAX_CONTEXTS and (ctx := self._new_context()):
                    self._all.append(ctx)
                else:
                    self._changed.wait()  # until another batch gives its context back
        return AioBatch(self, ctx, opcode, self._fd)

    def _new_context(self) -> _Context | None:
        """A new context, or None if the system is out of AIO events but this queue
        has contexts of its own that will come free."""
        try:
            return _Context(self._syscall, self._nums, MAX_EVENTS)
        except OSError as e:
            if e.errno == errno.EAGAIN and self._all:
                return None
            raise DeviceError(f"io_setup failed: {e.strerror} (fs.aio-max-nr is system-wide; "
                              "raise it, or set io_engine: threads)") from None

    def _give_back(self, ctx: _Context, sound: bool) -> None:
        with self._changed:
            if sound:
                self._free.append(ctx)
            else:
                ctx.destroy()  # waits for its IOs, so no buffer is in use after this
                self._all.remove(ctx)
            self._changed.notify()

    def close(self) -> None:
        with self._changed:
            for ctx in self._all if os.getpid() == self._pid else []:
                ctx.destroy()
            self._all.clear()
            self._free.clear()


class AioBatch:
    """One batch: add() submits requests at once, finish() waits for all of them.

    Requests are numbered in the order they were added; `results[i]` ends up as the
    bytes request i transferred, or -errno. Up to MAX_EVENTS are in flight; add() waits
    for completions when the context is full.
    """

    def __init__(self, queue: AioQueue, ctx: _Context, opcode: int, fd: int) -> None:
        self._queue = queue
        self._ctx = ctx
        self._opcode = opcode
        self._fd = fd
        self._free_slots = list(range(MAX_EVENTS))
        self._slot_request = np.zeros(MAX_EVENTS, dtype=np.int64)
        self._sizes: list[int] = []
        self._completed: list[int] = []  # finished requests not yet handed over
        self._submit_error = 0  # once io_submit fails, nothing more is submitted
        self.results: list[int] = []

    def add(self, requests: Sequence[tuple[int, memoryview]]) -> None:
        first = len(self.results)
        self.results.extend([0] * len(requests))
        self._sizes.extend(len(buf) for _, buf in requests)
        pos = 0
        while pos < len(requests):
            if self._submit_error:
                for i in range(first + pos, first + len(requests)):
                    self.results[i] = -self._submit_error
                return
            if not self._free_slots:
                self._reap(1)
                continue
            k = min(len(self._free_slots), len(requests) - pos)
            slots = np.array([self._free_slots.pop() for _ in range(k)], dtype=np.int64)
            part = requests[pos : pos + k]
            iocbs = self._ctx.iocbs
            iocbs["opcode"][slots] = self._opcode
            iocbs["fd"][slots] = self._fd
            iocbs["offset"][slots] = [off for off, _ in part]
            iocbs["nbytes"][slots] = [len(buf) for _, buf in part]
            # The caller keeps the buffers alive until finish() returns.
            iocbs["buf"][slots] = [_address(buf) for _, buf in part]
            self._slot_request[slots] = np.arange(first + pos, first + pos + k)
            taken = self._ctx.submit(self._ctx.iocb_ptrs[slots])
            if taken < 0 and taken == -errno.EAGAIN and len(self._free_slots) + k < MAX_EVENTS:
                taken = 0  # the kernel is out of room: wait for some IOs, then go on
            elif taken < 0:
                self._submit_error = -taken
                taken = 0
            self._free_slots.extend(slots[taken:].tolist())  # not submitted: free again
            pos += taken
            if taken < k and not self._submit_error:
                self._reap(1)

    def finish(self, on_complete: Callable[[int], None] | None = None) -> list[int]:
        """Wait for every request; call on_complete(i) for each one that transferred all
        its bytes, as it completes (so the caller's work overlaps the rest of the IO).
        An exception from on_complete is raised once every IO has completed."""
        error: BaseException | None = None
        sound = True
        try:
            while True:
                while self._completed:
                    i = self._completed.pop()
                    if on_complete is not None and error is None and \
                            self.results[i] == self._sizes[i]:
                        try:
                            on_complete(i)
                        except BaseException as e:
                            error = e
                if len(self._free_slots) == MAX_EVENTS:
                    break
                self._reap(1)
        except OSError as e:
            sound = False
            raise DeviceError(f"io_getevents failed: {e.strerror}") from None
        finally:
            self._queue._give_back(self._ctx, sound)
        if error is not None:
            raise error
        return self.results

    def _reap(self, min_nr: int) -> None:
        in_flight = MAX_EVENTS - len(self._free_slots)
        events = self._ctx.reap(min_nr, in_flight)
        slots = events["data"].astype(np.int64)
        requests = self._slot_request[slots].tolist()
        for i, res in zip(requests, events["res"].tolist()):
            self.results[i] = res
        self._completed.extend(requests)
        self._free_slots.extend(slots.tolist())
