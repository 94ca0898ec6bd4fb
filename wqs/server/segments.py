"""Shared-memory segments a same-host client registered on one connection.

A client hands the daemon a memfd over its Unix socket (SCM_RIGHTS) together with a
REGISTER frame; the daemon maps it and from then on reads GET_SHM answers into it and
PUT_SHM payloads out of it, by (segment, offset, length), so block bytes never cross
the socket.

What keeps a lying client from hurting the daemon or anyone else:

* Only a memfd sealed against shrinking is accepted (F_SEAL_SHRINK, checked with
  F_GET_SEALS): its pages can never disappear under the mapping, so no access through
  it can raise SIGBUS, which Python could not survive. A plain file, a pipe, an
  unsealed memfd are refused with an error that says so.
* Its size must be what the frame says, within the daemon's limit, and every (offset,
  length) a request names is checked against it before anything is read or written.
* A segment belongs to one connection: its ids mean nothing on another one, and it is
  unmapped when the connection closes (or on UNREGISTER), once no device IO that
  targets it is still in flight (`hold`/`unhold`).

Owned by the shard's loop, like the connection it belongs to.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import stat
from dataclasses import dataclass, field

from wqs.errors import WQSError

MAX_SEGMENTS = 256  # per connection
MAX_SEGMENT_BYTES = 1 << 40
F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)
F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)


class SegmentError(WQSError):
    """A segment (or a range of one) a request names cannot be used; the request is
    refused with BAD_REQUEST and this text."""


@dataclass(eq=False)
class Segment:
    id: int
    size: int
    mem: mmap.mmap
    view: memoryview
    addr: int  # where it is mapped in this process (for device IO straight into it)
    users: int = 0  # device IO in flight that reads or writes it
    dead: bool = False  # unregistered: unmapped once users drops to 0


@dataclass
class Segments:
    max_segments: int = MAX_SEGMENTS
    max_bytes: int = MAX_SEGMENT_BYTES
    by_id: dict[int, Segment] = field(default_factory=dict)

    def register(self, segment_id: int, fd: int, size: int) -> Segment:
        """Map the memfd `fd` as segment_id (the fd is closed either way)."""
        try:
            if segment_id in self.by_id:
                raise SegmentError(f"segment {segment_id} is already registered")
            if len(self.by_id) >= self.max_segments:
                raise SegmentError(f"more than {self.max_segments} segments on one connection")
            if not 0 < size <= self.max_bytes:
                raise SegmentError(f"segment of {size} bytes: must be 1..{self.max_bytes}")
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SegmentError("a segment must be a memfd, not a "
                                   f"{_kind(st.st_mode)}")
            try:
                seals = fcntl.fcntl(fd, F_GET_SEALS)
            except OSError:
                raise SegmentError("a segment must be a memfd (memfd_create with "
                                   "MFD_ALLOW_SEALING): this file cannot be sealed") from None
            if not seals & F_SEAL_SHRINK:
                raise SegmentError("a segment must be sealed against shrinking "
                                   "(F_SEAL_SHRINK): the daemon will not map memory that "
                                   "can be truncated under it")
            if st.st_size != size:
                raise SegmentError(f"segment {segment_id} is {st.st_size} bytes, the frame "
                                   f"says {size}")
            mem = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        anchor = ctypes.c_char.from_buffer(mem)
        addr = ctypes.addressof(anchor)
        del anchor  # (an export of the mapping: it would keep it from being closed)
        seg = Segment(segment_id, size, mem, memoryview(mem), addr)
        self.by_id[segment_id] = seg
        return seg

    def get(self, segment_id: int) -> Segment:
        seg = self.by_id.get(segment_id)
        if seg is None:
            raise SegmentError(f"segment {segment_id} is not registered on this connection")
        return seg

    def range(self, segment_id: int, offset: int, length: int) -> Segment:
        """The segment, if [offset, offset + length) lies inside it."""
        seg = self.get(segment_id)
        if offset + length > seg.size:
            raise SegmentError(f"bytes {offset}..{offset + length} are outside segment "
                               f"{segment_id} of {seg.size} bytes")
        return seg

    def unregister(self, segment_id: int) -> None:
        seg = self.get(segment_id)
        del self.by_id[segment_id]
        self._retire(seg)

    @staticmethod
    def hold(seg: Segment) -> None:
        seg.users += 1

    def unhold(self, seg: Segment) -> None:
        seg.users -= 1
        assert seg.users >= 0, "segment released twice"
        if seg.dead and not seg.users:
            _unmap(seg)

    def close(self) -> None:
        """Unregister everything (the connection closed)."""
        segs, self.by_id = list(self.by_id.values()), {}
        for seg in segs:
            self._retire(seg)

    @staticmethod
    def _retire(seg: Segment) -> None:
        seg.dead = True
        if not seg.users:
            _unmap(seg)

    def __len__(self) -> int:
        return len(self.by_id)


def _unmap(seg: Segment) -> None:
    try:
        seg.view.release()
        seg.mem.close()
    except BufferError:
        pass  # a view of it still lives (an answer being built): unmapped when it goes


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISSOCK, "socket"), (stat.S_ISFIFO, "pipe"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "file of another kind"
