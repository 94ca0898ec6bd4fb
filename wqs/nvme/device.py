"""Block devices opened with O_DIRECT: a raw block device, one preallocated file, or a
partition (a byte range) of either.

The engine sees only the small `BlockDevice` interface below, so an SPDK backend can
replace `DirectDevice` without touching it. Every offset and length handed to a device
is a multiple of its `align`, and every buffer starts on a page boundary (see
`aligned_buffer`): that is what O_DIRECT demands.

Two ways to do IO:
* `read_into` / `write`: plain preadv/pwritev in the calling thread, for start-up
  (recovery, checkpoints) and administration, where nothing else waits;
* `open_ring()`: an IO ring owned by one event loop, for the data path: Linux native AIO
  with eventfd completions (aio.py) or, where AIO is unavailable or not wanted, the
  same interface over a few threads (threadring.py).

SPDK's user-space NVMe driver (spdk.py) is the other backend: its rings have no fd and
are polled by the loop (`watch_ring`).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from wqs.errors import DeviceError
from wqs.nvme import aio
from wqs.nvme.buffers import PAGE_SIZE, aligned_buffer, round_up  # noqa: F401 - re-exported
from wqs.nvme.threadring import ThreadRing

log = logging.getLogger("wqs.nvme")

IO_ENGINES = ("auto", "aio", "threads")

# ioctl numbers from <linux/fs.h>.
BLKSSZGET = 0x1268  # logical block size, int
BLKGETSIZE64 = 0x80081272  # size in bytes, u64

# Files on a filesystem: 4 KiB satisfies O_DIRECT on every Linux filesystem we target.
FILE_ALIGN = 4096


class IoRing(Protocol):
    """Asynchronous IO for one event loop (aio.AioRing, threadring.ThreadRing, ...).

    read/writev prepare an IO; submit() hands what was prepared to the device; when `fd`
    is readable, complete() runs callback(arg, result) for each finished IO, result
    being the bytes moved or -errno. The caller keeps buffers alive until then.
    A ring whose `fd` is -1 is polled instead (a reactor.Poller: spdk.SpdkRing).
    """

    fd: int
    in_flight: int

    @property
    def pending(self) -> int: ...

    def read(self, offset: int, addr: int, nbytes: int,
             callback: Callable[[Any, int], None], arg: Any) -> None: ...

    def writev(self, offset: int, iov: list[tuple[int, int]],
               callback: Callable[[Any, int], None], arg: Any, dsync: bool = False) -> None: ...

    def submit(self) -> None: ...

    def complete(self) -> int: ...

    def close(self) -> None: ...


class BlockDevice(Protocol):
    """What the engine needs from a device. Offsets and lengths are multiples of align."""

    path: str
    size: int
    align: int
    io_engine: str  # how its rings do IO: "aio", "threads", "memory" or "spdk"

    def read_into(self, offset: int, buf: memoryview) -> None: ...

    def write(self, offset: int, buf: memoryview) -> None: ...

    def open_ring(self) -> IoRing:
        """A new IO ring on this device, for one event loop."""

    def flush(self) -> None: ...

    def close(self) -> None: ...


def watch_ring(reactor: Any, ring: IoRing) -> None:
    """Have `reactor` complete `ring`'s IO: when its fd is readable, or, for a ring with
    no fd, by polling it while IO is outstanding."""
    if ring.fd >= 0:
        reactor.add_reader(ring.fd, ring.complete)
    else:
        reactor.add_poller(ring)


def unwatch_ring(reactor: Any, ring: IoRing) -> None:
    if ring.fd >= 0:
        reactor.forget(ring.fd)
    else:
        reactor.remove_poller(ring)


def _transfer(call: Callable[..., int], fd: int, offset: int, buf: memoryview) -> int:
    """os.preadv or os.pwritev until buf is done: the bytes transferred (fewer at the end
    of the device), or -errno as AIO reports it."""
    done = 0
    try:
        while done < len(buf):
            n = call(fd, [buf[done:]], offset + done)
            if n <= 0:
                break
            done += n
    except OSError as e:
        return -(e.errno or errno.EIO)
    return done


def describe_io_result(what: str, res: int) -> str:
    """A failed IO's result (-errno, or a short count) in words."""
    return os.strerror(-res) if res < 0 else f"short {what} of {res} B"


@dataclass(frozen=True)
class DeviceGeometry:
    size: int
    align: int
    is_block_device: bool


def probe_geometry(fd: int) -> DeviceGeometry:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        size = struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
        lbs = struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0]
        return DeviceGeometry(size=size, align=max(lbs, 512), is_block_device=True)
    if stat.S_ISREG(st.st_mode):
        return DeviceGeometry(size=st.st_size, align=FILE_ALIGN, is_block_device=False)
    raise DeviceError(f"not a block device or regular file (mode {oct(st.st_mode)})")


class DirectDevice:
    """A block device or regular file opened with O_DIRECT.

    `io_engine` picks how its rings do IO: "aio" (Linux native AIO; an error if it is not
    available), "threads" (`io_threads` threads per ring), or "auto" (AIO where
    available, else threads, with a warning that says why). `lock`: take an exclusive
    flock, so a second daemon or `wqs format` cannot write under this one; the shard
    processes of one daemon open the device unlocked while their supervisor holds it.
    """

    def __init__(self, path: str, *, io_engine: str = "auto", io_threads: int = 16,
                 lock: bool = True, lock_wait_s: float = 0.0) -> None:
        if io_engine not in IO_ENGINES:
            raise DeviceError(
                f"io_engine must be one of {', '.join(IO_ENGINES)}, not {io_engine!r}")
        assert io_threads >= 1
        self.path = path
        self.io_threads = io_threads
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
        except FileNotFoundError:
            raise DeviceError(f"{path}: no such device or file") from None
        except OSError as e:
            raise DeviceError(f"{path}: cannot open with O_DIRECT: {e.strerror}") from None
        try:
            if lock:
                self._lock(lock_wait_s)
            geometry = probe_geometry(self._fd)
            reason = aio.unavailable_reason() if io_engine != "threads" else None
            if io_engine == "aio" and reason is not None:
                raise DeviceError(f"{path}: io_engine aio is not available: {reason}")
        except Exception:
            os.close(self._fd)
            raise
        self.size = geometry.size
        self.align = geometry.align
        self.is_block_device = geometry.is_block_device
        if io_engine != "threads" and reason is None:
            self.io_engine = "aio"
        else:
            if io_engine == "auto":
                log.warning("%s: %s; IO rings use %d threads instead", path, reason, io_threads)
            self.io_engine = "threads"
        self._closed = False

    def _lock(self, wait_s: float) -> None:
        """Take the exclusive lock, waiting up to wait_s for another holder to let go
        (the processes of a daemon that was just killed are still exiting)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise DeviceError(
                        f"{self.path} is in use by another process (a running wqsd?)") from None
                time.sleep(0.05)

    @property
    def fd(self) -> int:
        return self._fd

    @classmethod
    def create_file(cls, path: str, size: int, **options: Any) -> "DirectDevice":
        """Create and preallocate a regular file of `size` bytes (the embedded default)."""
        if size <= 0 or size % FILE_ALIGN:
            raise DeviceError(f"device size {size} must be a positive multiple of {FILE_ALIGN}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            os.close(fd)
            os.unlink(path)
            raise DeviceError(f"{path}: cannot preallocate {size} bytes: {e.strerror}") from None
        os.close(fd)
        return cls(path, **options)

    def check_io(self, offset: int, length: int) -> None:
        assert not self._closed, "device is closed"
        assert offset % self.align == 0, f"unaligned offset {offset}"
        assert length % self.align == 0, f"unaligned length {length}"
        if offset < 0 or offset + length > self.size:
            raise DeviceError(f"IO [{offset}, {offset + length}) outside device of {self.size} B")

    def read_into(self, offset: int, buf: memoryview) -> None:
        self.check_io(offset, len(buf))
        res = _transfer(os.preadv, self._fd, offset, buf)
        if res != len(buf):
            raise DeviceError(f"{self.path}: read at {offset} failed: "
                              f"{describe_io_result('read', res)}")

    def write(self, offset: int, buf: memoryview) -> None:
        self.check_io(offset, len(buf))
        res = _transfer(os.pwritev, self._fd, offset, buf)
        if res != len(buf):
            raise DeviceError(f"{self.path}: write at {offset} failed: "
                              f"{describe_io_result('write', res)}")

    def open_ring(self, base: int = 0) -> IoRing:
        assert not self._closed, "device is closed"
        if self.io_engine == "aio":
            return aio.AioRing(self._fd, base)
        return ThreadRing(self._fd, base, self.io_threads)

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)


class DevicePart:
    """Bytes [offset, offset + size) of another device, seen as a device of its own:
    one shard's partition. Closing it leaves the device open."""

    def __init__(self, device: Any, offset: int, size: int, index: int) -> None:
        assert offset % device.align == 0 and size % device.align == 0
        assert 0 <= offset and offset + size <= device.size
        self.device = device
        self.offset = offset
        self.size = size
        self.align = device.align
        self.io_engine = device.io_engine
        self.path = f"{device.path}#{index}"

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or offset + length > self.size:
            raise DeviceError(f"IO [{offset}, {offset + length}) outside {self.path} "
                              f"of {self.size} B")

    def read_into(self, offset: int, buf: memoryview) -> None:
        self._check(offset, len(buf))
        self.device.read_into(self.offset + offset, buf)

    def write(self, offset: int, buf: memoryview) -> None:
        self._check(offset, len(buf))
        self.device.write(self.offset + offset, buf)

    def open_ring(self, base: int = 0) -> IoRing:
        return self.device.open_ring(self.offset + base)

    def __getattr__(self, name: str) -> Any:
        # What else the device offers (SPDK's alloc_buffer), at the device's level.
        if name == "alloc_buffer":
            return getattr(self.device, name)
        raise AttributeError(name)

    def flush(self) -> None:
        self.device.flush()

    def close(self) -> None:
        pass
