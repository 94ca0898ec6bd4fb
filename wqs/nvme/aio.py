"""O_DIRECT reads and writes through Linux native AIO, completed on an event loop.

One `AioRing` is one kernel AIO context, owned by one loop thread. IOs are prepared
during a turn and go to the kernel together in one io_submit at the turn's end
(`submit`); every iocb carries IOCB_FLAG_RESFD, so each completion bumps an eventfd the
loop watches, and `complete` reaps whatever finished without waiting and runs each IO's
callback. Nothing blocks and no thread is involved: this is CacheLib Navy's
AsyncIoContext on an epoll loop, and fio's libaio engine's submit/reap split.

Why by hand: these are four system calls on two fixed kernel structs (stable ABI since
Linux 2.6), packed here with struct. python-libaio builds a ctypes object graph per IO
(about 2x the CPU per 64 KiB read in our measurement); PyPI's io_uring binding takes
only bytearray buffers, which are not aligned for O_DIRECT, and `liburing` dies with an
illegal instruction on some CPUs.

Buffers are given as (address, length): the caller keeps their memory alive until the
callback has run (the engine's buffer pool does).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from array import array
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from wqs.errors import DeviceError

IOCB_CMD_PREAD = 0
IOCB_CMD_PWRITE = 1
IOCB_CMD_PWRITEV = 8
IOCB_FLAG_RESFD = 1
RWF_DSYNC = 2  # per-IO O_DSYNC (Linux 4.13+): `engine.sync` without a blocking flush
RING_DEPTH = 512  # IOs in flight per ring; counted against the system's fs.aio-max-nr
IOV_MAX = 1024  # buffers in one vectored write (Linux's UIO_MAXIOV)

Callback = Callable[[Any, int], None]  # callback(arg, result): bytes moved, or -errno

# Bumped in every forked child: a ring made before the fork is not the child's (the
# kernel context belongs to the parent). Checked per call without a getpid() syscall.
_fork_generation = [0]
os.register_at_fork(after_in_child=lambda: _fork_generation.__setitem__(0,
                                                                        _fork_generation[0] + 1))


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

# struct iocb from <linux/aio_abi.h>, little-endian: data, key, rw_flags, opcode, prio,
# fd, buf, nbytes, offset, reserved2, flags, resfd.
_IOCB = struct.Struct("<QIiHhIQQqQII")
_EVENT_SIZE = 32  # struct io_event: data, obj, res, res2 (four 64-bit words)
assert _IOCB.size == 64


def _libc_syscall() -> Any:
    fn = ctypes.CDLL(None, use_errno=True).syscall
    fn.restype = ctypes.c_long
    fn.argtypes = [ctypes.c_long] * 6
    return fn


def unavailable_reason() -> str | None:
    """Why native AIO cannot be used here, or None if it can."""
    if platform.machine() not in _SYSCALLS or struct.pack("=H", 1) != b"\1\0":
        return f"native AIO system call numbers are not known for {platform.machine()}"
    syscall, nums = _libc_syscall(), _SYSCALLS[platform.machine()]
    ctx = ctypes.c_ulong(0)
    if syscall(nums.setup, 1, ctypes.addressof(ctx), 0, 0, 0) < 0:
        err = ctypes.get_errno()
        return f"io_setup failed: {os.strerror(err)} (fs.aio-max-nr, or a sandbox without AIO)"
    syscall(nums.destroy, ctx.value, 0, 0, 0, 0)
    return None


class AioRing:
    """An AIO context with its iocbs, completion events and eventfd, for one loop.

    `fd` becomes readable when completions wait; the loop then calls `complete`. IOs
    beyond RING_DEPTH wait in a queue and go out as earlier ones complete.
    """

    def __init__(self, fd: int, base: int = 0, depth: int = RING_DEPTH) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise DeviceError(reason)
        self._dev_fd = fd
        self._base = base  # added to every offset (a partition of a larger device)
        self.depth = depth
        self._syscall = _libc_syscall()
        self._nums = _SYSCALLS[platform.machine()]
        ctx = ctypes.c_ulong(0)
        if self._syscall(self._nums.setup, depth, ctypes.addressof(ctx), 0, 0, 0) < 0:
            err = ctypes.get_errno()
            raise DeviceError(f"io_setup({depth}) failed: {os.strerror(err)} (fs.aio-max-nr "
                              "is system-wide; raise it, or set io_engine: threads)")
        self._ctx = ctx.value
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._iocbs = ctypes.create_string_buffer(depth * _IOCB.size)
        self._iocb_base = ctypes.addressof(self._iocbs)
        self._events = ctypes.create_string_buffer(depth * _EVENT_SIZE)
        self._event_words = memoryview(self._events).cast("B").cast("q")
        self._no_wait = ctypes.create_string_buffer(16)  # struct timespec {0, 0}
        self._free = list(range(depth))
        # Per slot while in flight: (callback, arg, iovec array kept alive).
        self._slots: list[tuple[Callback, Any, Any] | None] = [None] * depth
        self._queued: deque[tuple] = deque()
        self._pid = os.getpid()
        self._generation = _fork_generation[0]
        self.in_flight = 0  # submitted to the kernel, not yet completed
        self._closed = False

    @property
    def pending(self) -> int:
        """IOs prepared or in flight: what must complete before the ring is idle."""
        return self.in_flight + len(self._queued)

    # ---- preparing -----------------------------------------------------------------

    def read(self, offset: int, addr: int, nbytes: int, callback: Callback, arg: Any) -> None:
        """Read nbytes at offset into the memory at addr; callback(arg, result) later."""
        self._queued.append((IOCB_CMD_PREAD, offset, addr, nbytes, None, 0, callback, arg))

    def writev(self, offset: int, iov: list[tuple[int, int]], callback: Callback, arg: Any,
               dsync: bool = False) -> None:
        """Write the buffers (address, length) back to back from offset (a gather write)."""
        assert 0 < len(iov) <= IOV_MAX
        flags = RWF_DSYNC if dsync else 0
        if len(iov) == 1:
            addr, n = iov[0]
            self._queued.append((IOCB_CMD_PWRITE, offset, addr, n, None, flags, callback, arg))
            return
        vec = array("Q")
        for addr, n in iov:
            vec.append(addr)
            vec.append(n)
        self._queued.append((IOCB_CMD_PWRITEV, offset, vec.buffer_info()[0], len(iov), vec,
                             flags, callback, arg))

    # ---- submitting and completing -------------------------------------------------

    def submit(self) -> None:
        """Hand every prepared IO that fits in the ring to the kernel, in one io_submit."""
        if not self._queued or not self._free:
            return
        self._check_owner()
        take = min(len(self._queued), len(self._free))
        slots = [self._free.pop() for _ in range(take)]
        ptrs = array("Q")
        pack, iocbs, base, resfd = _IOCB.pack_into, self._iocbs, self._iocb_base, self.fd
        queued = self._queued
        for k in range(take):
            op, offset, addr, nbytes, keep, rw_flags, cb, arg = queued[k]
            slot = slots[k]
            pack(iocbs, slot * 64, slot, 0, rw_flags, op, 0, self._dev_fd, addr, nbytes,
                 offset + self._base, 0, IOCB_FLAG_RESFD, resfd)
            self._slots[slot] = (cb, arg, keep)
            ptrs.append(base + slot * 64)
        taken = self._syscall(self._nums.submit, self._ctx, take, ptrs.buffer_info()[0], 0, 0)
        failed_errno = 0
        if taken < 0:
            failed_errno = ctypes.get_errno()
            taken = 0
        for _ in range(taken):
            queued.popleft()
        self.in_flight += taken
        for slot in slots[taken:]:
            self._slots[slot] = None
            self._free.append(slot)
        if failed_errno and failed_errno != errno.EAGAIN:
            # The kernel refused the first IO it did not take (EINVAL, EBADF, ...): fail
            # that one, so the rest are not held behind it for ever.
            op, _, _, _, _, _, cb, arg = queued.popleft()
            cb(arg, -failed_errno)
            self.submit()

    def complete(self) -> int:
        """Run the callbacks of every IO that has completed; how many. Never waits."""
        self._check_owner()
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        done = 0
        words = self._event_words
        while self.in_flight:
            n = self._syscall(self._nums.getevents, self._ctx, 0, self.depth,
                              ctypes.addressof(self._events), ctypes.addressof(self._no_wait))
            if n < 0:
                err = ctypes.get_errno()
                if err == errno.EINTR:
                    continue
                raise DeviceError(f"io_getevents failed: {os.strerror(err)}")
            if n == 0:
                break
            self.in_flight -= n
            finished = []
            for i in range(n):
                slot = words[4 * i]
                entry = self._slots[slot]
                self._slots[slot] = None
                self._free.append(slot)
                finished.append((entry, words[4 * i + 2]))
            # Callbacks after the bookkeeping: one may prepare (not submit) more IO.
            for (cb, arg, _), res in finished:
                cb(arg, res)
            done += n
            if n < self.depth:
                break
        return done

    def _check_owner(self) -> None:
        if _fork_generation[0] != self._generation:
            raise DeviceError("an AIO ring cannot be used across fork(): open the device "
                              "in the child")

    def close(self) -> None:
        """Destroy the context: io_destroy waits for IOs in flight, so no buffer is in
        use by the kernel afterwards. Their callbacks never run."""
        if self._closed:
            return
        self._closed = True
        if os.getpid() == self._pid:
            self._syscall(self._nums.destroy, self._ctx, 0, 0, 0, 0)
        os.close(self.fd)
        self._queued.clear()
