"""Block devices opened with O_DIRECT: a raw block device or one preallocated file.

The engine sees only the small `BlockDevice` interface below, so an io_uring or an SPDK
backend can replace `DirectDevice` without touching it. Every offset and length handed
to a device is a multiple of its `align`, and every buffer starts on a page boundary
(see `aligned_buffer`): that is what O_DIRECT demands.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from typing import Protocol

from wqs.errors import DeviceError

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

    def read_into(self, offset: int, buf: memoryview) -> None: ...

    def write(self, offset: int, buf: memoryview) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """A zero-filled, page-aligned buffer, usable for O_DIRECT IO.

    Anonymous mmap memory is page aligned by construction, which is why it is used
    rather than bytearray (whose address alignment is not guaranteed).
    """
    assert nbytes > 0
    return mmap.mmap(-1, round_up(nbytes, PAGE_SIZE))


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

    os.preadv/os.pwritev release the GIL, so the engine's callers can keep many IOs in
    flight from a thread pool.
    """

    def __init__(self, path: str, *, sync_writes: bool = False) -> None:
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
        self._closed = False

    @classmethod
    def create_file(cls, path: str, size: int) -> "DirectDevice":
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
        return cls(path)

    def _check(self, offset: int, length: int) -> None:
        assert not self._closed, "device is closed"
        assert offset % self.align == 0, f"unaligned offset {offset}"
        assert length % self.align == 0, f"unaligned length {length}"
        if offset < 0 or offset + length > self.size:
            raise DeviceError(f"IO [{offset}, {offset + length}) outside device of {self.size} B")

    def read_into(self, offset: int, buf: memoryview) -> None:
        self._check(offset, len(buf))
        done = 0
        while done < len(buf):
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n <= 0:
                raise DeviceError(f"{self.path}: short read at {offset + done}")
            done += n

    def write(self, offset: int, buf: memoryview) -> None:
        self._check(offset, len(buf))
        done = 0
        while done < len(buf):
            try:
                n = os.pwritev(self._fd, [buf[done:]], offset + done)
            except OSError as e:
                raise DeviceError(f"{self.path}: write at {offset + done} failed: {e}") from None
            if n <= 0:
                raise DeviceError(f"{self.path}: short write at {offset + done}")
            done += n

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)
