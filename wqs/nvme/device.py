"""Block devices opened with O_DIRECT: a raw block device or one preallocated file.

The engine sees only the small `BlockDevice` interface below, so an io_uring or an SPDK
backend can replace `DirectDevice` without touching it. Every offset and length handed
to a device is a multiple of its `align`, and every buffer starts on a page boundary
(see `aligned_buffer`): that is what O_DIRECT demands.

Single reads and writes are plain preadv/pwritev in the calling thread. Batches
(`read_many`, `write_many`) go to the device's IO engine: Linux native AIO (one
io_submit for the batch, see aio.py) or, where AIO is unavailable or not wanted, a pool
of threads each doing one IO at a time.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol, Sequence

from wqs.errors import DeviceError
from wqs.nvme import aio

log = logging.getLogger("wqs.nvme")

IO_ENGINES = ("auto", "aio", "threads")

# ioctl numbers from <linux/fs.h>.
BLKSSZGET = 0x1268  # logical block size, int
BLKGETSIZE64 = 0x80081272  # size in bytes, u64

# Files on a filesystem: 4 KiB satisfies O_DIRECT on every Linux filesystem we target.
FILE_ALIGN = 4096
PAGE_SIZE = mmap.PAGESIZE


class BlockDevice(Protocol):
    """What the engine needs from a device. Offsets and lengths are multiples of align."""

    path: str
    size: int
    align: int
    io_engine: str  # how batches are done: "aio" or "threads"

    def read_into(self, offset: int, buf: memoryview) -> None: ...

    def write(self, offset: int, buf: memoryview) -> None: ...

    def read_many(self, requests: Sequence[tuple[int, memoryview]],
                  on_complete: Callable[[int], None] | None = None) -> None:
        """Fill every buffer from its offset, in parallel. on_complete(i) runs in the
        calling thread as soon as request i has its bytes, while others are still in
        flight. Returns (or raises, if any read failed) once none is in flight."""

    def write_many(self, requests: Iterable[tuple[int, memoryview]]) -> None:
        """Write every buffer at its offset, in parallel; each request is started as
        soon as the iterable yields it, so the caller can prepare the next one meanwhile.
        Returns (or raises, if any write failed) once none is in flight."""

    def flush(self) -> None: ...

    def close(self) -> None: ...


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """A zero-filled, page-aligned buffer, usable for O_DIRECT IO.

    Anonymous mmap memory is page aligned by construction, which is why it is used
    rather than bytearray (whose address alignment is not guaranteed).
    """
    assert nbytes > 0
    return mmap.mmap(-1, round_up(nbytes, PAGE_SIZE))


def _transfer(call: Callable[[int, list[memoryview], int], int], fd: int, offset: int,
              buf: memoryview) -> int:
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


def _why(what: str, res: int) -> str:
    """A failed IO's result (-errno, or a short count) in words."""
    return os.strerror(-res) if res < 0 else f"short {what} of {res} B"


class _ThreadBatch:
    """AioBatch's interface over a thread pool: one pool task (a _transfer) per IO."""

    def __init__(self, pool: ThreadPoolExecutor, fd: int, opcode: int) -> None:
        self._pool = pool
        self._fd = fd
        self._call = os.preadv if opcode == aio.IOCB_CMD_PREAD else os.pwritev
        self._futures: dict[Future[int], int] = {}
        self._sizes: list[int] = []
        self.results: list[int] = []

    def add(self, requests: Sequence[tuple[int, memoryview]]) -> None:
        for offset, buf in requests:
            future = self._pool.submit(_transfer, self._call, self._fd, offset, buf)
            self._futures[future] = len(self.results)
            self.results.append(0)
            self._sizes.append(len(buf))

    def finish(self, on_complete: Callable[[int], None] | None = None) -> list[int]:
        error: BaseException | None = None
        for f in as_completed(self._futures):  # all of them: the buffers are in use
            i = self._futures[f]
            self.results[i] = f.result()
            if on_complete is not None and error is None and self.results[i] == self._sizes[i]:
                try:
                    on_complete(i)
                except BaseException as e:
                    error = e
        if error is not None:
            raise error
        return self.results


def round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


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

    os.preadv/os.pwritev release the GIL, so single IOs from many threads overlap too.
    `io_engine` picks how batches run: "aio" (Linux native AIO; an error if it is not
    available), "threads" (a pool of `io_threads`), or "auto" (AIO where available,
    else threads, with a warning that says why).
    """

    def __init__(self, path: str, *, sync_writes: bool = False, io_engine: str = "auto",
                 io_threads: int = 16) -> None:
        if io_engine not in IO_ENGINES:
            raise DeviceError(
                f"io_engine must be one of {', '.join(IO_ENGINES)}, not {io_engine!r}")
        assert io_threads >= 1
        self.path = path
        flags = os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC
        if sync_writes:
            flags |= os.O_DSYNC
        try:
            self._fd = os.open(path, flags)
        except FileNotFoundError:
            raise DeviceError(f"{path}: no such device or file") from None
        except OSError as e:
            raise DeviceError(f"{path}: cannot open with O_DIRECT: {e.strerror}") from None
        try:
            # One owner at a time: a second daemon, or `wqs format` while a daemon runs,
            # must not write under the first one.
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise DeviceError(f"{path} is in use by another process (a running wqsd?)") from None
        try:
            geometry = probe_geometry(self._fd)
        except Exception:
            os.close(self._fd)
            raise
        self.size = geometry.size
        self.align = geometry.align
        self.is_block_device = geometry.is_block_device
        self._aio: aio.AioQueue | None = None
        self._pool: ThreadPoolExecutor | None = None
        reason = aio.unavailable_reason() if io_engine != "threads" else None
        if io_engine == "aio" and reason is not None:
            os.close(self._fd)
            raise DeviceError(f"{path}: io_engine aio is not available: {reason}")
        if io_engine != "threads" and reason is None:
            self._aio = aio.AioQueue(self._fd)
            self.io_engine = "aio"
        else:
            if io_engine == "auto":
                log.warning("%s: %s; batches use %d IO threads instead", path, reason,
                            io_threads)
            self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="wqs-io")
            self.io_engine = "threads"
        self._closed = False

    @classmethod
    def create_file(cls, path: str, size: int, *, io_engine: str = "auto",
                    io_threads: int = 16) -> "DirectDevice":
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
        return cls(path, io_engine=io_engine, io_threads=io_threads)

    def _check(self, offset: int, length: int) -> None:
        assert not self._closed, "device is closed"
        assert offset % self.align == 0, f"unaligned offset {offset}"
        assert length % self.align == 0, f"unaligned length {length}"
        if offset < 0 or offset + length > self.size:
            raise DeviceError(f"IO [{offset}, {offset + length}) outside device of {self.size} B")

    def read_into(self, offset: int, buf: memoryview) -> None:
        self._check(offset, len(buf))
        res = _transfer(os.preadv, self._fd, offset, buf)
        if res != len(buf):
            raise DeviceError(f"{self.path}: read at {offset} failed: {_why('read', res)}")

    def write(self, offset: int, buf: memoryview) -> None:
        self._check(offset, len(buf))
        res = _transfer(os.pwritev, self._fd, offset, buf)
        if res != len(buf):
            raise DeviceError(f"{self.path}: write at {offset} failed: {_why('write', res)}")

    def read_many(self, requests: Sequence[tuple[int, memoryview]],
                  on_complete: Callable[[int], None] | None = None) -> None:
        for offset, buf in requests:
            self._check(offset, len(buf))
        batch = self._batch(aio.IOCB_CMD_PREAD)
        try:
            batch.add(requests)
        finally:
            results = batch.finish(on_complete)
        self._raise_failures("read", requests, results)

    def write_many(self, requests: Iterable[tuple[int, memoryview]]) -> None:
        done: list[tuple[int, memoryview]] = []
        batch = self._batch(aio.IOCB_CMD_PWRITE)
        try:
            for offset, buf in requests:  # each one is submitted as soon as it exists
                self._check(offset, len(buf))
                done.append((offset, buf))
                batch.add([(offset, buf)])
        finally:
            results = batch.finish()
        self._raise_failures("write", done, results)

    def _batch(self, opcode: int) -> aio.AioBatch | _ThreadBatch:
        if self._aio is not None:
            return self._aio.batch(opcode)
        assert self._pool is not None
        return _ThreadBatch(self._pool, self._fd, opcode)

    def _raise_failures(self, what: str, requests: Sequence[tuple[int, memoryview]],
                        results: list[int]) -> None:
        bad = [i for i, (res, (_, buf)) in enumerate(zip(results, requests)) if res != len(buf)]
        if bad:
            offset, res = requests[bad[0]][0], results[bad[0]]
            raise DeviceError(f"{self.path}: {what} at {offset} failed: {_why(what, res)} "
                              f"({len(bad)} of {len(requests)} IOs in the batch failed)")

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._aio is not None:
                self._aio.close()
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            os.close(self._fd)
