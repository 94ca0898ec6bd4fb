"""The SPDK device backend: an NVMe namespace driven from user space by SPDK's NVMe
driver (PCIe, or NVMe over fabrics such as TCP), as a BlockDevice.

Selected by the device name (`device: "spdk:trtype:TCP adrfam:IPv4 traddr:10.0.0.5
trsvcid:4420 subnqn:nqn.2016-06.io.spdk:cnode1 ns:1"`, see spdk_target.py) and
configured by `engine.spdk` (config.SpdkConfig: where libspdk is, DMA memory, polling).

Per process, one controller connection and one IO queue pair (spdk_lib.py), shared by
the device's synchronous IO (start-up, checkpoints) and the process's ring
(spdk_ring.py), which the process's event loop polls while IO is outstanding. IO
buffers are SPDK DMA memory (`alloc_buffer`, handed to the engine's buffer pool), so
PUT payloads are received and GET answers sent straight from the memory the driver
transfers. Over a fabric (NVMe/TCP) the ring also reads into and writes from a same-host
client's shared memory directly, as the AIO backend does; a PCIe device can only move
data in DMA memory, so there the engine copies through its own buffers.

Processes: SPDK's environment cannot be initialised twice in one process nor carried
over a fork(). A daemon's supervisor forks its shard processes, so it never touches
SPDK itself: `in_child` runs what it needs to read (the shard table) in a short-lived
child, and every shard connects on first use in its own process.

Exclusive use: nothing in NVMe stops a second host process from writing the same
namespace, so a lock file per namespace (under /run/lock, or the temp directory) keeps
a second wqsd or `wqs format` on this host off it, as flock does for a device file.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import logging
import multiprocessing
import os
import tempfile
import time
import weakref
from typing import Any, Callable

from wqs.config import SpdkConfig
from wqs.errors import DeviceError, WQSError
from wqs.nvme.buffers import IoBuffer
from wqs.nvme.spdk_ring import RING_DEPTH, SpdkRing
from wqs.nvme.spdk_target import SpdkTarget, describe_status, parse_device, split_status

log = logging.getLogger("wqs.nvme")

BOUNCE_BYTES = 1 << 20  # DMA buffer for synchronous IO (start-up, checkpoints), per chunk
SYNC_TIMEOUT_S = 60.0  # a synchronous command that takes longer fails
PROBE_TIMEOUT_S = 120.0  # connecting and reading the first unit in a child process
LOCK_DIRS = ("/run/lock", tempfile.gettempdir())


class DmaBuffer(IoBuffer):
    """An IoBuffer in SPDK DMA memory. free() only lets go of it: the memory goes back
    to SPDK when the last view of it is gone (a GET answer may still be sending)."""

    __slots__ = ()

    def __init__(self, lib: Any, addr: int, size: int) -> None:  # noqa: D107 - no super()
        self.mem = (ctypes.c_char * size).from_address(addr)
        finalizer = weakref.finalize(self.mem, lib.spdk_free, addr)
        finalizer.atexit = False  # the process is ending: nothing to give back
        self.size = size
        self.view = memoryview(self.mem).cast("B")
        self.addr = addr

    def free(self) -> None:
        self.view.release()
        self.mem = None


class _Connection:
    """This process's controller, queue pair and synchronous-IO state."""

    def __init__(self, target: SpdkTarget, config: SpdkConfig) -> None:
        from wqs.nvme import spdk_lib

        self.pid = os.getpid()
        self.lib = spdk_lib.environment(config.lib_dir, config.mem_size, config.hugepages,
                                        target.is_pcie)
        self.ctrl = spdk_lib.Controller(self.lib, target)
        self.qpair = spdk_lib.IoQpair(self.ctrl)
        self.sync = self.qpair.view(self._sync_done)
        self._sync_status: dict[int, int] = {}
        self._sync_tag = 0
        bounce = spdk_lib.dma_alloc(self.lib, BOUNCE_BYTES)
        if not bounce:
            self.ctrl.close()
            raise DeviceError(f"no SPDK DMA memory for a {BOUNCE_BYTES >> 20} MiB buffer "
                              "(engine.spdk.mem_size)")
        self.bounce = DmaBuffer(self.lib, bounce, BOUNCE_BYTES)
        self.warned_dma = False

    def _sync_done(self, tag: int, status: int) -> None:
        self._sync_status[tag] = status

    def run(self, what: str, issue: Callable[[int], int]) -> None:
        """Issue one command (issue(tag) -> rc) and poll until it completes."""
        self._sync_tag = tag = (self._sync_tag + 1) & 0xFFFFFFFF
        rc = issue(tag)
        deadline = time.monotonic() + SYNC_TIMEOUT_S
        while rc == -errno.ENOMEM and time.monotonic() < deadline:  # the ring holds them
            self.sync.process()
            rc = issue(tag)
        if rc < 0:
            raise DeviceError(f"{what}: the driver refused it: {os.strerror(-rc)}")
        while tag not in self._sync_status:
            rc = self.sync.process()
            if rc < 0:
                raise DeviceError(f"{what}: the queue pair failed: {os.strerror(-rc)}")
            if time.monotonic() > deadline:
                raise DeviceError(f"{what}: no completion within {SYNC_TIMEOUT_S:.0f}s")
        status = self._sync_status.pop(tag)
        if status & 0xFFFE:
            raise DeviceError(f"{what} failed: {describe_status(*split_status(status))}")

    def close(self) -> None:
        self.ctrl.close()


class SpdkDevice:
    """A BlockDevice on an NVMe namespace through SPDK (see the module's docstring).

    connect=False: do not connect in this process (a daemon's supervisor); size and
    align then come from `in_child`, which connects in a child process instead."""

    io_engine = "spdk"

    def __init__(self, name: str, config: SpdkConfig, *, connect: bool = True,
                 lock: bool = True, lock_wait_s: float = 0.0) -> None:
        self.target = parse_device(name)
        self.path = self.target.name()
        self.config = config
        self.size = 0
        self.align = 0
        self._conn: _Connection | None = None
        self._lock_fd: int | None = _take_lock(self.target, lock_wait_s) if lock else None
        self._closed = False
        if connect:
            try:
                self._connection()
            except BaseException:
                self.close()
                raise

    # ---- this process's connection ----------------------------------------------------

    def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and conn.pid == os.getpid():
            return conn
        assert not self._closed, "device is closed"
        conn = _Connection(self.target, self.config)
        if self.size and (conn.ctrl.size, conn.ctrl.sector_size) != (self.size, self.align):
            conn.close()
            raise DeviceError(f"{self.path} changed under us: {conn.ctrl.size} B in "
                              f"{conn.ctrl.sector_size} B sectors, was {self.size} B in "
                              f"{self.align} B")
        self._conn = conn
        self.size, self.align = conn.ctrl.size, conn.ctrl.sector_size
        log.info("%s: connected (%d MiB in %d B sectors, max transfer %d KiB)", self.path,
                 self.size >> 20, self.align, conn.ctrl.max_xfer >> 10)
        return conn

    def in_child(self, fn: Callable[["SpdkDevice"], Any],
                 timeout_s: float = PROBE_TIMEOUT_S) -> Any:
        """fn(device) run in a forked child that connects there (so this process never
        initialises SPDK); its result. Sets this object's size and align."""
        ctx = multiprocessing.get_context("fork")
        receiver, sender = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_child_main, args=(self.path, self.config, fn, sender),
                            name="wqs-spdk-probe")
        child.start()
        sender.close()
        try:
            if not receiver.poll(timeout_s):
                child.kill()
                raise DeviceError(f"{self.path}: no answer from the controller within "
                                  f"{timeout_s:.0f}s")
            try:
                ok, value = receiver.recv()
            except EOFError:
                child.join(5)
                raise DeviceError(f"{self.path}: the process connecting to it died (exit "
                                  f"code {child.exitcode}; SPDK's messages are above)") from None
        finally:
            receiver.close()
            child.join(5)
        if not ok:
            raise value
        (self.size, self.align), result = value
        return result

    # ---- BlockDevice ----------------------------------------------------------------------

    def check_io(self, offset: int, length: int) -> None:
        assert not self._closed, "device is closed"
        assert offset % self.align == 0, f"unaligned offset {offset}"
        assert length % self.align == 0, f"unaligned length {length}"
        if offset < 0 or offset + length > self.size:
            raise DeviceError(f"IO [{offset}, {offset + length}) outside {self.path} of "
                              f"{self.size} B")

    def read_into(self, offset: int, buf: memoryview) -> None:
        conn = self._connection()
        self.check_io(offset, len(buf))
        bounce, sync, shift = conn.bounce, conn.sync, _shift(self.align)
        for pos in range(0, len(buf), BOUNCE_BYTES):
            n = min(BOUNCE_BYTES, len(buf) - pos)
            at = offset + pos
            conn.run(f"{self.path}: read at {at}",
                     lambda tag: sync.read(bounce.addr, at >> shift, n >> shift, tag))
            buf[pos : pos + n] = bounce.view[:n]

    def write(self, offset: int, buf: memoryview) -> None:
        conn = self._connection()
        self.check_io(offset, len(buf))
        bounce, sync, shift = conn.bounce, conn.sync, _shift(self.align)
        for pos in range(0, len(buf), BOUNCE_BYTES):
            n = min(BOUNCE_BYTES, len(buf) - pos)
            at = offset + pos
            bounce.view[:n] = buf[pos : pos + n]
            conn.run(f"{self.path}: write at {at}",
                     lambda tag: sync.write(bounce.addr, at >> shift, n >> shift, tag, False))

    def flush(self) -> None:
        conn = self._connection()
        conn.run(f"{self.path}: flush", conn.sync.flush_cache)

    def open_ring(self, base: int = 0) -> SpdkRing:
        conn = self._connection()
        view = conn.qpair.view()
        ring = SpdkRing(view, base, RING_DEPTH, poll_wait_s=self.config.poll_wait_us / 1e6,
                        external_memory=not self.target.is_pcie, name=self.path)
        conn.qpair.attach(view, ring.command_done)
        return ring

    def alloc_buffer(self, nbytes: int) -> IoBuffer:
        """An IO buffer in DMA memory. Over NVMe/TCP the driver copies through a socket
        and plain memory also works: when DMA memory runs out there, a plain buffer (and
        a warning); PCIe DMA needs it, so there it is an error."""
        from wqs.nvme import spdk_lib

        conn = self._connection()
        addr = spdk_lib.dma_alloc(conn.lib, nbytes)
        if addr:
            return DmaBuffer(conn.lib, addr, nbytes)
        if self.target.is_pcie:
            raise DeviceError(f"out of SPDK DMA memory for a {nbytes} B buffer: raise "
                              f"engine.spdk.mem_size ({self.config.mem_size >> 20} MiB)")
        if not conn.warned_dma:
            conn.warned_dma = True
            log.warning("%s: out of SPDK DMA memory (engine.spdk.mem_size is %d MiB); "
                        "using plain memory for further IO buffers", self.path,
                        self.config.mem_size >> 20)
        return IoBuffer(nbytes)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._conn is not None and self._conn.pid == os.getpid():
            self._conn.close()
        self._conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def check_shards(target: SpdkTarget, shards: int) -> None:
    """A PCIe controller is driven by one process (SPDK's multi-process mode, which
    would let several share it, is not used): one shard there."""
    if target.is_pcie and shards > 1:
        raise DeviceError(f"{target.name()}: a PCIe controller is driven by one process, "
                          f"so it holds one shard, not {shards} (wqs format --shards 1; "
                          "workers: 1)")


def _shift(align: int) -> int:
    return align.bit_length() - 1


def _child_main(name: str, config: SpdkConfig, fn: Callable[[SpdkDevice], Any],
                sender: Any) -> None:
    try:
        device = SpdkDevice(name, config, lock=False)
        try:
            result = ((device.size, device.align), fn(device))
        finally:
            device.close()
        sender.send((True, result))
    except WQSError as e:
        sender.send((False, e))
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        sender.send((False, DeviceError(f"{type(e).__name__}: {e}")))
    finally:
        sender.close()
        os._exit(0)  # not the parent's atexit handlers


def _take_lock(target: SpdkTarget, wait_s: float) -> int:
    """An exclusive flock on this namespace's lock file; its fd."""
    key = hashlib.sha1(f"{target.trid()} ns:{target.ns}".encode()).hexdigest()[:16]
    directory = next((d for d in LOCK_DIRS if os.access(d, os.W_OK)), LOCK_DIRS[-1])
    path = os.path.join(directory, f"wqs-spdk-{key}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {target.name()}\n".encode())
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise DeviceError(f"{target.name()} is in use by another process on this "
                                  f"host (a running wqsd? lock file {path})") from None
            time.sleep(0.05)
