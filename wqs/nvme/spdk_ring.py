"""An IO ring over one NVMe queue pair, polled by the event loop: queue accounting and
completion bookkeeping for the SPDK backend, with no library in it.

The ring turns the engine's IOs (a read into one buffer, a gather write of several)
into NVMe commands on a `Qpair` (spdk_lib.IoQpair; a double of it in the tests): one
command per buffer, each at its own LBA, since the engine's buffers are whole 4 KiB
units laid back to back. An IO completes when its last command does; its result is the
bytes moved, or the first failure as -errno (a gather write that fails part-way is a
torn write, which the engine's checksums and recovery already handle).

Accounting: at most `depth` commands are outstanding; more IOs wait in the queue and go
out as commands complete. A queue pair with no free request answers -ENOMEM: the IO
waits for the next submit. A command that the driver refuses outright (-EINVAL, -ENXIO
for a disconnected queue pair) fails its IO without blocking the ones behind it.

Completions: the driver reports each command as `command_done(tag, status)` while the
ring polls it (in `submit`, which must push commands out, and in `complete`); the ring
only records them there, and runs the IOs' callbacks in `complete`, never in `submit`,
as every IoRing does. Owned by one loop thread; no locks.

Spinning (poll_wait_s 0): a poll that finds nothing gives the core up to any other
process that wants it (sched_yield) and comes straight back otherwise. A client on the
shard's core then runs when it has work instead of waiting for the time slice of an
empty loop; and where short sleeps are dear (a VM: a 20 µs sleep measured 50-110 µs
long and 20-27 µs of CPU), spinning costs less than sleeping.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections import deque
from typing import Any, Callable, Protocol

from wqs.errors import DeviceError
from wqs.nvme.spdk_target import describe_status, split_status, status_errno

log = logging.getLogger("wqs.nvme")

Callback = Callable[[Any, int], None]

RING_DEPTH = 256  # commands outstanding per ring: a TCP target's default queue is 128
MAX_IOV = 1024  # buffers in one gather write (as aio.IOV_MAX)
ADMIN_POLL_S = 1.0  # keep-alives and admin completions: well inside any keep-alive timeout
CLOSE_TIMEOUT_S = 30.0  # longest close() waits for commands in flight
ERROR_LOG_INTERVAL_S = 10.0  # one log line per distinct failure this often, not per command


class Qpair(Protocol):
    """One IO queue pair on one namespace, LBAs in sectors of `sector_size` bytes.

    read/write return 0 when the command is queued, -errno when refused (-ENOMEM: no
    free request, retry later). process() sends what was queued and reports finished
    commands through the ring's command_done(tag, status word); its result is how many
    it reported, or -errno when the queue pair failed (disconnected)."""

    sector_size: int

    def read(self, addr: int, lba: int, count: int, tag: int) -> int: ...

    def write(self, addr: int, lba: int, count: int, tag: int, fua: bool) -> int: ...

    def process(self) -> int: ...

    def process_admin(self) -> int: ...


class _Io:
    """One IO of the engine: its commands, and what they came to."""

    __slots__ = ("write", "offset", "iov", "fua", "cb", "arg", "next", "pos", "left",
                 "error", "total")

    def __init__(self, write: bool, offset: int, iov: list[tuple[int, int]], fua: bool,
                 cb: Callback, arg: Any) -> None:
        self.write = write
        self.offset = offset
        self.iov = iov
        self.fua = fua
        self.cb = cb
        self.arg = arg
        self.next = 0  # index of the next buffer to issue
        self.pos = 0  # its byte offset from `offset`
        self.left = 0  # commands issued and not completed
        self.error = 0  # the first failure, as -errno
        self.total = sum(n for _, n in iov)


class SpdkRing:
    """IoRing over a Qpair; a reactor Poller (no fd: the loop polls it while busy)."""

    fd = -1

    def __init__(self, qpair: Qpair, base: int = 0, depth: int = RING_DEPTH, *,
                 poll_wait_s: float = 20e-6, idle_poll_s: float = ADMIN_POLL_S,
                 external_memory: bool = False, name: str = "spdk") -> None:
        assert depth >= 1 and base >= 0
        self._qpair = qpair
        self._base = base  # added to every offset (a shard's partition)
        self._shift = qpair.sector_size.bit_length() - 1
        assert 1 << self._shift == qpair.sector_size, "sector size is a power of two"
        self.depth = depth
        self.poll_wait_s = poll_wait_s
        self.idle_poll_s = idle_poll_s
        # Whether IOs may use memory the driver did not allocate (a client's shared
        # memory, read into and written from directly by the engine). A PCIe device
        # moves data by DMA, so only into SPDK's DMA memory: False, and the engine
        # goes through its own buffers and a copy. A fabric's driver copies between
        # its socket and any memory: True there.
        self.external_memory = external_memory
        self.name = name
        self._free = list(range(depth - 1, -1, -1))  # command tags
        self._cmds: list[_Io | None] = [None] * depth  # tag -> its IO while outstanding
        self._queued: deque[_Io] = deque()
        self._done: deque[_Io] = deque()
        self.in_flight = 0  # IOs out of the queue whose callback has not run
        self.commands = 0  # commands outstanding
        self.failed: str | None = None  # why the queue pair stopped working
        self._admin_due = time.monotonic() + ADMIN_POLL_S
        self._logged: dict[str, float] = {}
        self._generation = _fork_generation[0]
        self._closed = False

    @property
    def pending(self) -> int:
        """IOs prepared, in flight or completed but not yet called back."""
        return self.in_flight + len(self._queued)

    # ---- preparing -----------------------------------------------------------------

    def read(self, offset: int, addr: int, nbytes: int, callback: Callback, arg: Any) -> None:
        self._queued.append(_Io(False, offset, [(addr, nbytes)], False, callback, arg))

    def writev(self, offset: int, iov: list[tuple[int, int]], callback: Callback, arg: Any,
               dsync: bool = False) -> None:
        """A gather write; dsync: each command with Force Unit Access (durable on
        completion, as RWF_DSYNC)."""
        assert 0 < len(iov) <= MAX_IOV
        self._queued.append(_Io(True, offset, list(iov), dsync, callback, arg))

    # ---- submitting and completing -------------------------------------------------

    def submit(self) -> None:
        """Issue queued IOs while commands are free, then let the driver send them."""
        if not self._queued or self._closed:
            return
        self._check_owner()
        issued = self._issue()
        if issued:
            self._process()  # a fabric queue pair sends its commands when polled

    def _issue(self) -> int:
        issued = 0
        queued, free, cmds, qpair = self._queued, self._free, self._cmds, self._qpair
        shift, base = self._shift, self._base
        while queued and free:
            io = queued[0]
            iov = io.iov
            while io.next < len(iov) and free:
                addr, n = iov[io.next]
                assert n and not n & ((1 << shift) - 1), f"IO of {n} B is not whole sectors"
                tag = free.pop()
                lba = (base + io.offset + io.pos) >> shift
                if io.write:
                    rc = qpair.write(addr, lba, n >> shift, tag, io.fua)
                else:
                    rc = qpair.read(addr, lba, n >> shift, tag)
                if rc == -errno.ENOMEM:  # the queue pair is full: later
                    free.append(tag)
                    return issued
                io.next += 1
                io.pos += n
                if rc < 0:
                    free.append(tag)
                    io.error = io.error or rc
                    self._note_failure(f"{'write' if io.write else 'read'} refused by the "
                                       f"driver: {_strerror(rc)}")
                    continue
                cmds[tag] = io
                io.left += 1
                self.commands += 1
                issued += 1
            if io.next < len(iov):
                return issued  # out of tags part-way: the rest of it goes first next time
            queued.popleft()
            self.in_flight += 1
            if not io.left:  # every command of it was refused
                self._done.append(io)
        return issued

    def command_done(self, tag: int, status: int) -> None:
        """One command finished (called by the driver inside process()): bookkeeping
        only, the IO's callback runs in complete()."""
        io = self._cmds[tag]
        if io is None and self._closed:
            return  # a command close() gave up waiting for
        assert io is not None, f"completion for a free command tag {tag}"
        self._cmds[tag] = None
        self._free.append(tag)
        self.commands -= 1
        io.left -= 1
        if status & 0xFFFE:  # anything but the phase bit: a failed command
            sct, sc = split_status(status)
            io.error = io.error or -status_errno(sct, sc)
            self._note_failure(f"{'write' if io.write else 'read'} failed: "
                               f"{describe_status(sct, sc)}")
        if not io.left and io.next == len(io.iov):
            self._done.append(io)

    def complete(self) -> int:
        """Poll the queue pair, run the callbacks of every IO that finished; how many.
        Also polls the controller's admin queue (keep-alives) every ADMIN_POLL_S."""
        if self._closed:
            return 0
        self._check_owner()
        if self.commands:
            outstanding = self.commands
            self._process()
            if self.commands == outstanding and not self.poll_wait_s:
                os.sched_yield()  # spinning, and nothing came: see the module's docstring
        now = time.monotonic()
        if now >= self._admin_due:
            self._admin_due = now + ADMIN_POLL_S
            rc = self._qpair.process_admin()
            if rc < 0:
                self._fail(f"controller admin queue failed: {_strerror(rc)}")
        done, n = self._done, 0
        while done:
            io = done.popleft()
            self.in_flight -= 1
            n += 1
            io.cb(io.arg, io.error or io.total)
        if self._queued and self._free:
            self.submit()  # IOs waiting for commands that just came free
        return n

    def _check_owner(self) -> None:
        if _fork_generation[0] != self._generation:
            raise DeviceError("an SPDK ring cannot be used across fork(): open the device "
                              "in the child")

    def _process(self) -> None:
        rc = self._qpair.process()
        if rc < 0:
            self._fail(f"queue pair failed: {_strerror(rc)}")

    def _fail(self, why: str) -> None:
        """The queue pair is gone (the target went away, the controller failed): fail
        every command outstanding, as the driver would not report them any more."""
        if self.failed is None:
            self.failed = why
            log.error("%s: %s; failing %d commands in flight", self.name, why, self.commands)
        for tag, io in enumerate(self._cmds):
            if io is not None:
                self.command_done(tag, _ABORTED_SQ_DELETION)

    def _note_failure(self, what: str) -> None:
        now = time.monotonic()
        if now - self._logged.get(what, -ERROR_LOG_INTERVAL_S) >= ERROR_LOG_INTERVAL_S:
            self._logged[what] = now
            log.error("%s: %s", self.name, what)

    def close(self) -> None:
        """Wait for the commands in flight (so the driver writes no buffer after this),
        then drop every IO without its callback, as AioRing.close does."""
        if self._closed:
            return
        self._closed = True
        if _fork_generation[0] != self._generation:
            return  # the parent's: nothing of it is ours to wait for
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        while self.commands and time.monotonic() < deadline:
            if self._qpair.process() < 0:
                break
        if self.commands:
            log.error("%s: %d commands still in flight at close", self.name, self.commands)
        self._queued.clear()
        self._done.clear()


# Bumped in every forked child: a ring made before the fork is the parent's (SPDK's
# state does not survive fork). Checked per call without a getpid() system call.
_fork_generation = [0]
os.register_at_fork(after_in_child=lambda: _fork_generation.__setitem__(
    0, _fork_generation[0] + 1))

# Generic status 0x08 "aborted: SQ deletion", as SPDK reports commands of a queue pair
# it tore down: the status word of a command the ring fails itself.
_ABORTED_SQ_DELETION = 0x08 << 1


def _strerror(rc: int) -> str:
    return f"{os.strerror(-rc)} ({rc})" if rc < 0 else str(rc)
