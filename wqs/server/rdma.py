"""A connection's RDMA link, daemon side: the verbs under a LinkMachine, on the shard's loop.

A client that sent RDMA_CONNECT over its TCP connection gets one: a queue pair whose
completion channel the loop watches. Frames arrive as receives and are handed to the
connection as if read from its socket; answers leave as SENDs. The one-sided items of
GET_SHM and PUT_SHM name the client's memory regions (REGISTER_MR): a hit is copied into
a registered staging slot and RDMA-written to the client, then the answer is sent (RC
delivers it after the data); a payload is RDMA-read into a staging slot and copied into
the entry buffer it is written from. (One copy by the daemon's CPU each way: registering
the engine's IO buffers themselves is the next step.)

Staging is one registered region per link, cut into slots (wire.Slots); what does not
fit waits for nothing: the item is answered BUSY and the client asks again.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
from typing import TYPE_CHECKING, Any, Callable

from wqs.rdma.link import LinkMachine, post_actions
from wqs.rdma.verbs import Link, Nic
from wqs.rdma.wire import Endpoint, Memory, Slots, check_peer
from wqs.server.segments import MAX_SEGMENTS, SegmentError

if TYPE_CHECKING:
    from wqs.server.connection import Connection

log = logging.getLogger("wqs.server")

RECV_DEPTH = 32  # receives posted: requests a client may have in flight on the link
RECV_SIZE = 132 << 10  # the largest frame without payloads: 4096 items of 32 bytes
SEND_DEPTH = 64
STAGING_BYTES = 64 << 20  # registered memory per link for blocks on their way


class Staging:
    """A registered region for blocks on their way, cut into slots (wire.Slots)."""

    def __init__(self, nic: Nic, size: int) -> None:
        self.mem = mmap.mmap(-1, size)
        self.view = memoryview(self.mem)
        anchor = ctypes.c_char.from_buffer(self.mem)
        self.addr = ctypes.addressof(anchor)
        del anchor  # (an export of the mapping: it would keep it from being closed)
        self.mr = nic.register(self.addr, size, remote=False)
        self.slots = Slots(size)
        self.take, self.give = self.slots.take, self.slots.give

    def close(self) -> None:
        self.mr.close()
        self.view.release()
        self.mem.close()


class ServerLink:
    def __init__(self, conn: "Connection", nic: Nic, remote: Endpoint) -> None:
        self.conn = conn
        self.loop = conn.shard.loop
        self.verbs = Link(nic, RECV_DEPTH, RECV_SIZE, SEND_DEPTH)
        try:
            check_peer(self.verbs.endpoint(), remote)
            self.machine = LinkMachine(RECV_DEPTH, RECV_SIZE, SEND_DEPTH, remote,
                                       counts_answers=False)
            self.staging = Staging(nic, STAGING_BYTES)
            self.machine.start()
            self._perform()  # receives posted before the QP can take SENDs
            self.verbs.connect(remote)
        except BaseException:
            self.verbs.close()
            raise
        self.memory: dict[int, Memory] = {}
        self.backlog: list[bytes] = []  # frames received while the connection is paused
        self.loop.add_reader(self.verbs.fd, self._on_event)

    def endpoint(self) -> Endpoint:
        return self.verbs.endpoint()

    # ---- frames ----------------------------------------------------------------------

    def _on_event(self) -> None:
        try:
            completions = self.verbs.events()
        except Exception as e:  # noqa: BLE001 - a device that went away
            self.machine.fail(f"completion channel: {e}")
            self.conn.close()
            return
        for c in completions:
            for frame in self.machine.completed(c, self.verbs.received):
                self.backlog.append(frame)
        if not self.machine.state.usable:
            log.warning("%s: RDMA link failed: %s", self.conn.peer, self.machine.state.reason)
            self.conn.close()
            return
        self._perform()
        self.conn.feed_backlog()

    def send(self, frame: bytes, on_sent: Callable[[], None] | None) -> None:
        if not self.machine.send(frame, on_sent) and on_sent is not None:
            on_sent()  # the link is down: nothing will be delivered
        self._perform()

    def _perform(self) -> None:
        post_actions(self.machine, self.verbs)

    # ---- the client's memory -----------------------------------------------------------

    def register(self, memory: Memory) -> None:
        if memory.segment in self.memory:
            raise SegmentError(f"segment {memory.segment} is already registered")
        if len(self.memory) >= MAX_SEGMENTS:
            raise SegmentError(f"more than {MAX_SEGMENTS} memory regions on one link")
        self.memory[memory.segment] = memory

    def unregister(self, segment: int) -> None:
        if self.memory.pop(segment, None) is None:
            raise SegmentError(f"segment {segment} is not registered on this link")

    def range(self, segment: int, offset: int, length: int) -> Memory:
        mem = self.memory.get(segment)
        if mem is None:
            raise SegmentError(f"segment {segment} is not registered on this link")
        if offset + length > mem.size:
            raise SegmentError(f"bytes {offset}..{offset + length} are outside segment "
                               f"{segment} of {mem.size} bytes")
        return mem

    def write_hit(self, mem: Memory, offset: int, views: list[memoryview]) -> bool:
        """Copy a hit into staging and RDMA-write it to the client; False (nothing
        done) if staging is full."""
        n = sum(len(v) for v in views)
        slot = self.staging.take(n)
        if slot is None:
            return False
        at = slot
        for v in views:
            self.staging.view[at : at + len(v)] = v
            at += len(v)
        st = self.staging
        self.machine.transfer(True, [(st.addr + slot, n, st.mr.lkey)], mem.addr + offset,
                              mem.rkey, lambda ok: st.give(slot, n))
        self._perform()
        return True

    def read_payload(self, mem: Memory, offset: int, targets: list[memoryview],
                     done: Callable[[bool], None]) -> bool:
        """RDMA-read a payload into staging, then copy it into targets; done(ok). False
        (nothing done) if staging is full."""
        n = sum(len(t) for t in targets)
        slot = self.staging.take(n)
        if slot is None:
            return False
        st = self.staging

        def landed(ok: bool) -> None:
            if ok:
                at = slot
                for t in targets:
                    t[:] = st.view[at : at + len(t)]
                    at += len(t)
            st.give(slot, n)
            done(ok)

        self.machine.transfer(False, [(st.addr + slot, n, st.mr.lkey)], mem.addr + offset,
                              mem.rkey, landed)
        self._perform()
        return True

    def close(self) -> None:
        self.machine.fail("the connection closed")
        self.loop.forget(self.verbs.fd)
        self.verbs.close()
        self.staging.close()


def open_nic(config: Any) -> tuple[Nic | None, str]:
    """The shard's RDMA device per config.rdma, and what to say about it."""
    rc = config.rdma
    if rc.enabled == "off":
        return None, "off (rdma.enabled)"
    from wqs.rdma.wire import RdmaError

    try:
        nic = Nic(rc.device, rc.port, rc.gid_index)
    except RdmaError as e:
        if rc.enabled == "on":
            raise
        return None, f"not served: {e}"
    return nic, f"{nic.name} port {nic.port}"
