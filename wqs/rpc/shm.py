"""Memory a client shares with the daemons on its own host: `SharedMemory`.

A segment is a memfd (never a name in /dev/shm that another process could guess), sized
once and sealed against shrinking and growing, so a daemon that maps it can never have
its pages pulled away (F_SEAL_SHRINK is what the daemon insists on). It is handed to
each local daemon connection once, over the Unix socket (SCM_RIGHTS); after that a GET
or PUT of a block that lives in it moves only (segment, offset, length) over the socket,
and the daemon reads into or writes from the memory itself.

Put the blocks there yourself: numpy (`np.frombuffer(mem.buffer, ...)`) and torch
(`torch.frombuffer(mem.buffer, ...)`) arrays over `mem.buffer` are registered memory,
and any slice of them passed as a get_many out buffer or a put_many payload takes the
one-sided path. `block_views` lays blocks out so that the daemon can read a block from
the SSD with O_DIRECT straight into it: each block's payload starts 64 bytes into a
4 KiB-aligned slot, after the room the on-device entry header takes.

`SharedMemoryMap` finds the segment and offset of a buffer by its address. `Bounce` is
the client's own shared memory for the buffers a caller did not put there.
"""

from __future__ import annotations

import bisect
import ctypes
import fcntl
import mmap
import os
import threading
from typing import Any, Callable

from wqs.errors import WQSError
from wqs.rdma.wire import Slots

ENTRY_HEADER = 64  # the on-device entry header (wqs/engine/FORMAT.md)
SLOT_ALIGN = 4096  # the device's IO unit: a direct read lands on this boundary
MAX_SEGMENT_ID = 0xFFFF  # segment ids are u16 on the wire
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def slot_size(block_size: int) -> int:
    """Bytes of one slot of block_views: the entry header's room, the payload, padding to
    the next 4 KiB (what the daemon reads from the device in one go)."""
    return (ENTRY_HEADER + block_size + SLOT_ALIGN - 1) // SLOT_ALIGN * SLOT_ALIGN


class SharedMemory:
    """`size` bytes of memory the client shares with local daemons (zero-filled).

    Made by `Client.shared_memory(size)`, which registers it with the client; close it
    (or the client) to give it back. Thread-safe to read and write like any buffer."""

    def __init__(self, size: int, name: str = "wqs", segment_id: int = 0) -> None:
        if size <= 0:
            raise ValueError(f"shared memory of {size} bytes")
        self.size = size
        self.segment_id = segment_id
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEALS)
            self._mem = mmap.mmap(self.fd, size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self.buffer = memoryview(self._mem)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._mem))
        # (first byte, stride, count) of each block_views layout: blocks there may be read
        # straight from the device into their slot.
        self.slotted: list[tuple[int, int, int]] = []
        self.closed = False
        self.on_close: list[Any] = []

    def block_views(self, block_size: int, count: int | None = None,
                    start: int = 0) -> list[memoryview]:
        """`count` writable views of block_size bytes, each placed for a direct device
        read (its payload 64 bytes into a 4 KiB-aligned slot); from byte `start`
        (a multiple of 4096) on, as many as fit when count is None."""
        if block_size <= 0 or start % SLOT_ALIGN:
            raise ValueError("block_size must be positive and start a multiple of 4096")
        stride = slot_size(block_size)
        fit = (self.size - start) // stride
        n = fit if count is None else count
        if n > fit or n < 0:
            raise ValueError(f"{n} slots of {stride} bytes do not fit in {self.size - start} "
                             f"bytes from {start}")
        self.slotted.append((start, stride, n))
        first = start + ENTRY_HEADER
        return [self.buffer[first + k * stride : first + k * stride + block_size]
                for k in range(n)]

    def in_slot(self, offset: int, length: int) -> bool:
        """Whether [offset, offset + length) is a block of a block_views layout."""
        for start, stride, n in self.slotted:
            k, within = divmod(offset - start, stride)
            if 0 <= k < n and within == ENTRY_HEADER and ENTRY_HEADER + length <= stride:
                return True
        return False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for cb in self.on_close:
            cb(self)
        try:
            self.buffer.release()
            self._mem.close()
        except BufferError:
            pass  # arrays over it still live: the mapping goes with the last of them
        os.close(self.fd)

    def __enter__(self) -> "SharedMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.size


def buffer_address(view: memoryview) -> int | None:
    """The address of a byte view's first byte, or None if it cannot be had (read-only
    views: bytes objects never live in shared memory anyway)."""
    if view.readonly or not view.nbytes:
        return None
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class SharedMemoryMap:
    """The client's live segments, found by address. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._starts: list[int] = []
        self._segs: list[SharedMemory] = []
        self._next_id = 1

    def create(self, size: int) -> SharedMemory:
        with self._lock:
            if len(self._segs) >= MAX_SEGMENT_ID:
                raise WQSError(f"more than {MAX_SEGMENT_ID} shared memory segments")
            used = {s.segment_id for s in self._segs}
            seg_id = self._next_id
            while seg_id in used:
                seg_id = seg_id % MAX_SEGMENT_ID + 1
            self._next_id = seg_id % MAX_SEGMENT_ID + 1
            mem = SharedMemory(size, segment_id=seg_id)
            k = bisect.bisect(self._starts, mem.address)
            self._starts.insert(k, mem.address)
            self._segs.insert(k, mem)
        mem.on_close.append(self._forget)
        return mem

    def _forget(self, mem: SharedMemory) -> None:
        with self._lock:
            if mem in self._segs:
                k = self._segs.index(mem)
                del self._starts[k], self._segs[k]

    def find(self, view: memoryview) -> tuple[SharedMemory, int] | None:
        """(segment, offset) of the bytes of `view`, if they lie in a live segment."""
        if not self._starts:
            return None
        addr = buffer_address(view)
        if addr is None:
            return None
        k = bisect.bisect(self._starts, addr) - 1
        if k < 0:
            return None
        mem = self._segs[k]
        offset = addr - mem.address
        if offset + view.nbytes > mem.size or mem.closed:
            return None
        return mem, offset

    def segments(self) -> list[SharedMemory]:
        with self._lock:
            return list(self._segs)

    def close(self) -> None:
        for mem in self.segments():
            mem.close()


class Bounce:
    """Shared memory for blocks whose buffer is not in the client's shared memory (a
    bytearray, LMCache's or vLLM's own tensors) on a link where blocks move one-sided: a
    local daemon's Unix socket or an RDMA link. The SDK copies a put's bytes in and a
    get's bytes out: one copy by the client, where the inline path over a Unix socket
    costs two (the daemon's send, the client's receive), and the daemon reads from the
    SSD straight into it. Every block gets an entry-shaped slot (its payload 64 bytes into
    a 4 KiB-aligned slot), so the daemon's direct reads and writes apply. `size` bytes,
    mapped on first use (0: none; then such blocks go inline, or fail on RDMA).
    Thread-safe."""

    def __init__(self, create: Callable[[int], SharedMemory], size: int) -> None:
        assert size >= 0 and size % SLOT_ALIGN == 0, size
        self._create = create
        self._lock = threading.Lock()
        self._slots = Slots(size) if size else None
        self.size = size
        self.memory: SharedMemory | None = None

    def take(self, n: int) -> tuple[SharedMemory, int] | None:
        """(memory, payload offset) of a slot for an n-byte block, or None when the
        bounce memory is full (or off)."""
        if self._slots is None:
            return None
        with self._lock:
            if self.memory is None:
                self.memory = self._create(self.size)
            start = self._slots.take(ENTRY_HEADER + n)
        return None if start is None else (self.memory, start + ENTRY_HEADER)

    def give(self, offset: int, n: int) -> None:
        assert self._slots is not None
        with self._lock:
            self._slots.give(offset - ENTRY_HEADER, ENTRY_HEADER + n)
