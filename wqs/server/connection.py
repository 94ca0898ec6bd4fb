"""One client connection on a shard's loop: socket, session, receive buffer, send queue.

Receiving: each readiness is one recv_into. Between frames the bytes go into the
connection's receive buffer and every complete frame in it is handled at once; once a
PUT's item table is in, its payload bytes are received straight into the entry buffers
the engine staged for them (the bytes already buffered are copied over first), so a
PUT payload is not copied by the CPU on its way to the device.

Sending: answers are queued as lists of buffers (frame bytes, then views of the engine's
read buffers) and sent with one sendmsg per connection at the end of the loop's turn;
whatever the socket does not take waits for writability. A GET's read buffers go back
to the engine once the kernel has taken their bytes.

Limits (each a unit held until released once, like Seastar's semaphore units): payload
bytes staged for PUTs and held for unsent GET answers count against this connection's
budget and the shard's; past either, or past MAX_PENDING requests in flight, the
connection stops reading (its requests wait in the kernel, then in the client) until
enough is released to fall under the low mark. Nothing is buffered without bound.

Same-host clients connect over the shard's Unix socket instead ("local"): the same
frames, plus REGISTER (a memfd arrives with it, SCM_RIGHTS) and GET_SHM / PUT_SHM, whose
blocks are read into and written from the client's registered memory
(wqs/server/segments.py), so only item tables cross the socket.

Owned by the shard's loop.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any, Callable

from wqs.engine import format as fmt
from wqs.engine.core import DEFERRED, GetOp, PutOp
from wqs.errors import BlockTooLarge, ProtocolError
from wqs.rpc import protocol as p
from wqs.rpc.session import READY, ServerSession, Verdict
from wqs.server.segments import Segment, SegmentError, Segments

if TYPE_CHECKING:
    from wqs.server.rdma import ServerLink
    from wqs.server.shard import Shard

log = logging.getLogger("wqs.server")

RX_BUFFER = 256 << 10  # holds any frame without payloads (a table of 4096 items is 96 KiB)
RX_AFTER_PUT = 4 << 10  # after a PUT, read little: the next bytes are likely a payload
IOV_MAX = 1024  # Linux's limit on buffers per sendmsg
RECV_IOV = 64  # entry buffers filled by one recvmsg_into
MAX_PENDING = 256  # requests in flight per connection before it stops reading
# Answer bytes queued but not sent (a client that sends but does not read): past this,
# stop reading its requests until the socket has taken half of them.
MAX_UNSENT = 4 << 20
# File descriptors a local client may have sent ahead of the REGISTER frames they go
# with; more is a protocol error (each REGISTER carries one, in its own sendmsg).
MAX_FDS = 8
FDS_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
GET = p.Opcode.GET
GET_SHM, PUT_SHM = p.Opcode.GET_SHM, p.Opcode.PUT_SHM
OPS = {p.Opcode.PUT: "put", p.Opcode.GET: "get", p.Opcode.EXISTS: "exists",
       p.Opcode.DELETE: "delete", p.Opcode.LOOKUP_PREFIX: "lookup_prefix",
       p.Opcode.PING: "ping", GET_SHM: "get_shm", PUT_SHM: "put_shm", p.Opcode.PIN: "pin"}


_SHM_OPS = frozenset({p.Opcode.REGISTER, p.Opcode.UNREGISTER, GET_SHM, p.Opcode.REGISTER_MR})
ENTRY_HEADER = fmt.ENTRY_HEADER_SIZE  # a slot's room in front of its payload
UNIT = fmt.UNIT  # slots start on it


class _ShmGet:
    """A GET_SHM being served: one answer row per item, filled as reads complete."""

    __slots__ = ("rid", "items", "segs", "rows", "waiting", "charged", "started")

    def __init__(self, rid: int, items: tuple[p.ShmItem, ...], segs: list[Segment],
                 started: float) -> None:
        self.rid = rid
        self.items = items
        self.segs = segs
        self.rows: list[Any] = [None] * len(items)
        self.waiting = 1  # reads outstanding, plus one until all are started
        self.charged = 0  # budget units held for reads into the engine's buffers
        self.started = started


def _slot(it: p.ShmItem, seg: Segment) -> memoryview | None:
    """The entry-shaped slot around item it (SHM_SLOT: its payload 64 bytes into a
    unit-aligned slot, padding after it), if the item has one inside its segment."""
    start = it.offset - ENTRY_HEADER
    if not it.flags & p.SHM_SLOT or start < 0 or start % UNIT:
        return None
    end = start + (ENTRY_HEADER + it.length + UNIT - 1) // UNIT * UNIT
    return seg.view[start:end] if end <= seg.size else None


class _PutFrame:
    """A PUT whose payloads are being received: one staged op (or None, for an item the
    engine refused: its bytes are received and dropped) per item."""

    __slots__ = ("rid", "ops", "statuses", "targets", "ti", "charged", "started", "waiting",
                 "refuse", "failed", "opcode", "segs")

    def __init__(self, rid: int, started: float, opcode: p.Opcode = p.Opcode.PUT) -> None:
        self.rid = rid
        self.opcode = opcode  # PUT, or PUT_SHM (payloads from registered memory)
        self.segs: list[Segment] = []  # PUT_SHM: client memory written from, held
        self.ops: list[PutOp | None] = []
        self.statuses: list[int] = []
        self.targets: list[memoryview] = []  # where the payload bytes go, in order
        self.ti = 0  # the first target not yet filled
        self.charged = 0  # budget units held for the staged payloads
        self.started = started
        self.waiting = 0  # committed puts not yet written
        self.refuse: tuple[p.Status, str] | None = None  # the answer for the whole frame
        self.failed = 0  # puts whose write failed


class Connection:
    def __init__(self, shard: "Shard", sock: socket.socket, peer: Any,
                 local: bool = False) -> None:
        self.shard = shard
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        sock.setblocking(False)
        self.local = local  # over the shard's Unix socket: shared memory is allowed
        if not local:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.segments = Segments()
        self.fds: list[int] = []  # received with the bytes, waiting for their REGISTER
        self.rdma: ServerLink | None = None  # frames travel on an RDMA link instead
        self.need = 0  # payload bytes the frame waiting for budget needs staged
        self.session = ServerSession(shard.options.auth_token, shard.limits, shard.index,
                                     shard.ports, shard.instance if shard.local_paths else b"",
                                     shard.local_paths)
        self.limits = shard.limits
        self.rx = bytearray(RX_BUFFER)
        self.rxv = memoryview(self.rx)
        self.rstart = self.rend = 0
        self.want = RX_BUFFER
        self.header: p.FrameHeader | None = None  # a frame whose body is not in yet
        self.put: _PutFrame | None = None  # a PUT whose payloads are being received
        self.sink = memoryview(bytearray(0))  # receives payloads of refused items
        self.out: list[Any] = []  # buffers to send, in order
        self.out_callbacks: list[tuple[int, Callable[[], None]]] = []  # (end offset, cb)
        self.queued = 0  # bytes ever queued
        self.sent = 0  # bytes ever sent
        self.held = 0  # budget units held: staged PUT payload and unsent GET answers
        self.pending = 0  # requests in flight
        self.reading = False
        self.writing = False
        self.closing = False  # close once the queue is sent (after an error answer)
        self.closed = False
        self.last_rx = time.monotonic()
        self.dirty = False  # queued output not yet flushed this turn

    # ---- reading ---------------------------------------------------------------------

    def start(self) -> None:
        self._resume()

    def _resume(self) -> None:
        if not self.reading and not self.closed and not self.closing:
            self.reading = True
            self.shard.loop.add_reader(self.fd, self.on_readable)
            if self.rdma is not None and self.rdma.backlog:
                self.shard.loop.call_soon(self.feed_backlog)

    def _pause(self) -> None:
        if self.reading:
            self.reading = False
            self.shard.loop.remove_reader(self.fd)

    def over_budget(self) -> bool:
        return (self.held > self.shard.options.max_connection_bytes
                or self.pending >= MAX_PENDING or self.queued - self.sent > MAX_UNSENT
                or self.shard.budget.over())

    def _room_for(self, n: int) -> bool:
        """Whether n more bytes may be staged now (a frame larger than a whole budget
        still goes, alone)."""
        limit = self.shard.options.max_connection_bytes
        return (self.held == 0 or self.held + n <= limit) and self.shard.budget.room_for(n)

    def _wait_for_budget(self) -> None:
        self._pause()
        self.shard.budget.wait(self)

    def on_readable(self) -> None:
        self._safely(self._receive)

    def _safely(self, step: Callable[[], None]) -> None:
        """Run a receive step; a bad frame is answered (when it can be) and closes the
        connection, a broken socket closes it."""
        try:
            step()
        except p.FrameRejected as e:
            if e.opcode not in (p.Opcode.HELLO, p.Opcode.AUTH):
                verdict = self.session.admit(e.request_id, e.opcode)
                if verdict is not None:  # the handshake first: say so, not what was wrong
                    self._verdict(verdict)
                    return
            log.info("%s: rejected frame: %s", self.peer, e)
            self._answer_error(e.request_id, e.opcode, e.status, str(e)[:1000], close=True)
        except ProtocolError as e:
            log.info("%s: protocol error, closing: %s", self.peer, e)
            self.close()
        except BlockingIOError:
            return  # a readiness with nothing to read after all: wait for the next
        except OSError as e:
            log.debug("%s: connection ended: %s", self.peer, e)
            self.close()

    def _receive(self) -> None:
        if self.rdma is not None:  # the socket only tells that the client went away
            if self.sock.recv(1):
                raise ProtocolError("bytes on the TCP connection of an RDMA link")
            self.close()
            return
        put = self.put
        if put is not None:  # straight into the staged entry buffers, many at once
            bufs = put.targets[put.ti : put.ti + RECV_IOV]
            due = sum(map(len, bufs))
            if put.ti + len(bufs) == len(put.targets):
                # With the last of them, the start of what follows (the next frame's
                # header and table) into the receive buffer, in the same call.
                if self.rend + RX_AFTER_PUT > RX_BUFFER:
                    self._compact()
                bufs.append(self.rxv[self.rend : self.rend + RX_AFTER_PUT])
            n = self._recv_local(bufs) if self.local else self.sock.recvmsg_into(bufs)[0]
            if not n:
                raise ConnectionError("peer closed mid-payload")
            self.last_rx = time.monotonic()
            put.ti = p.advance_targets(put.targets, put.ti, min(n, due))
            if n > due:
                self.rend += n - due
            if put.ti == len(put.targets):
                self._put_received(put)
                self._parse()
            return
        if self.rend + self.want > RX_BUFFER:
            self._compact()
        # Never full: a frame without payloads fits, and a PUT waiting for budget stops
        # the reading (it does not resume before that PUT can be staged).
        assert self.rend < RX_BUFFER, "receive buffer full"
        view = self.rxv[self.rend : self.rend + self.want]
        n = self._recv_local([view]) if self.local else self.sock.recv_into(view)
        if not n:
            if self.header is not None or self.rstart != self.rend:
                raise ConnectionError("peer closed mid-frame")
            self.close()
            return
        self.last_rx = time.monotonic()
        self.rend += n
        self._parse()

    def _recv_local(self, bufs: list[memoryview]) -> int:
        """recvmsg_into on the Unix socket, keeping the file descriptors that come along."""
        n, ancdata, flags, _ = self.sock.recvmsg_into(bufs, FDS_SPACE)
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
                self.fds.extend(fds)
        if flags & socket.MSG_CTRUNC or len(self.fds) > MAX_FDS:
            raise ProtocolError(f"more than {MAX_FDS} file descriptors sent ahead of their "
                                "REGISTER frames")
        return n

    def feed_backlog(self) -> None:
        """Frames the RDMA link received, into the receive buffer and handled, as far as
        the connection takes requests now (paused: they wait in the backlog)."""
        link = self.rdma
        while link is not None and link.backlog and self.reading and not self.closed:
            frame = link.backlog[0]
            if self.rend + len(frame) > RX_BUFFER:
                self._compact()
                if self.rend + len(frame) > RX_BUFFER:
                    break  # the frames already buffered go first
            del link.backlog[0]
            self.rx[self.rend : self.rend + len(frame)] = frame
            self.rend += len(frame)
            self._safely(self._parse)

    def _compact(self) -> None:
        left = self.rend - self.rstart
        self.rx[:left] = self.rxv[self.rstart : self.rend]
        self.rstart, self.rend = 0, left

    def _parse(self) -> None:
        """Handle every complete frame in the receive buffer."""
        rxv = self.rxv
        self.want = RX_BUFFER
        while not self.closed and not self.closing:
            if self.over_budget():  # the frames still buffered wait for the resume
                self._pause()
                if self.shard.budget.over():
                    self.shard.budget.wait(self)
                return
            avail = self.rend - self.rstart
            h = self.header
            if h is None:
                if avail < 32:
                    break
                h = p.parse_header(rxv[self.rstart : self.rstart + 32], self.limits,
                                   response=False)
                self.rstart += 32
                avail -= 32
                self.header = h
            if h.opcode == p.Opcode.PUT:
                table = h.count * p.ITEM.size
                if avail < table:
                    break
                payload = h.body_len - table
                if not self._room_for(payload):
                    self._wait_for_budget()  # staged when enough is released
                    break
                self.header = None
                self._start_put(h, rxv[self.rstart : self.rstart + table])
                self.rstart += table
                put = self.put
                if put is None:
                    continue
                # The payload bytes already here go into their targets; the rest come
                # straight from the socket.
                while put.ti < len(put.targets) and self.rstart < self.rend:
                    target = put.targets[put.ti]
                    k = min(len(target), self.rend - self.rstart)
                    target[:k] = rxv[self.rstart : self.rstart + k]
                    self.rstart += k
                    put.ti = p.advance_targets(put.targets, put.ti, k)
                if put.ti < len(put.targets):
                    self.want = RX_AFTER_PUT
                    break
                self._put_received(put)
                continue
            if avail < h.body_len:
                break
            if h.opcode is PUT_SHM:  # its payloads are staged from the client's memory
                items = p.parse_shm_table(h, rxv[self.rstart : self.rstart + h.body_len])
                need = sum(it.length for it in items)
                if not self._room_for(need):
                    self.need = need
                    self._wait_for_budget()  # staged when enough is released
                    break
                self.rstart += h.body_len
                self.header = None
                self._put_shm(h, items)
                continue
            body = bytes(rxv[self.rstart : self.rstart + h.body_len])
            self.rstart += h.body_len
            self.header = None
            self._request(h, body)
        if self.rstart == self.rend:
            self.rstart = self.rend = 0

    # ---- requests ---------------------------------------------------------------------

    def _request(self, h: p.FrameHeader, body: bytes) -> None:
        op = h.opcode
        rid = h.request_id
        shard = self.shard
        if op is GET and self.rdma is not None:
            self._answer_error(rid, op, p.Status.BAD_REQUEST, "inline payloads do not "
                               "travel on an RDMA link: use GET_SHM")
            return
        if op is GET and self.session.state is READY and not shard.draining:
            ids = [body[i : i + 16] for i in range(0, len(body), 16)]
            if shard.count == 1 or shard.misrouted(ids) is None:
                self._get(rid, ids)
                return
        if op == p.Opcode.HELLO:
            self._verdict(self.session.on_hello(p.decode_body(h, body)))
            return
        if op == p.Opcode.AUTH:
            self._verdict(self.session.on_auth(p.decode_body(h, body)))
            return
        verdict = self.session.admit(rid, op)
        if verdict is not None:
            self._verdict(verdict)
            return
        if op == p.Opcode.PING:
            self._send([p.frame_ping_response(rid)])
            return
        if op in _SHM_OPS:
            self._shm_request(h, body)
            return
        if op == p.Opcode.RDMA_CONNECT:
            self._rdma_connect(rid, body)
            return
        milliseconds = -1
        if op == p.Opcode.PIN:  # milliseconds, reserved (checked by the decoder), ids
            milliseconds = p.PIN_BODY.unpack_from(body)[0]
            body = body[p.PIN_BODY.size:]
        ids = p.unpack_ids(body)
        if shard.draining:
            self._answer_error(rid, op, p.Status.BUSY, "the node is draining")
            return
        misrouted = shard.misrouted(ids)
        if misrouted is not None:
            self._answer_error(rid, op, p.Status.WRONG_SHARD, misrouted)
            return
        core = shard.core
        if op == p.Opcode.EXISTS:
            self._send([p.frame_bits_response(op, rid, core.exists_many(ids))])
            shard.observe("exists", 0.0)
        elif op == p.Opcode.LOOKUP_PREFIX:
            self._send([p.frame_lookup_response(rid, core.lookup_prefix(ids))])
            shard.observe("lookup_prefix", 0.0)
        elif op == p.Opcode.PIN:
            found, pinned = core.pin_many(ids, milliseconds / 1000)
            self._send([p.frame_pin_response(rid, found, pinned)])
            shard.observe("pin", 0.0)
        elif op == p.Opcode.DELETE:
            self.pending += 1
            started = time.perf_counter()
            core.delete_many(ids, lambda found: self._deleted(rid, started, found))
        else:
            self._answer_error(rid, op, p.Status.BAD_REQUEST, f"{op.name} is not valid here")

    def _get(self, rid: int, ids: list[bytes]) -> None:
        # Hits past what this connection and the shard may still hold, or past one
        # response frame, are answered BUSY unread: the client asks for them again.
        shard = self.shard
        self.pending += 1
        if len(ids) == 1:  # the first hit always goes: no budget to split
            state = [rid, time.perf_counter(), 0, ids[0]]
            reserved = shard.core.reader.get_one(ids[0], self._got_one, state)
            if reserved and not state[2]:  # still reading: its buffer is held now
                state[2] = reserved
                self.held += reserved
                shard.budget.used += reserved
            return
        room = min(self.limits.max_body - len(ids) * p.ITEM.size,
                   shard.options.max_connection_bytes - self.held, shard.budget.room())
        state = [rid, time.perf_counter(), 0]  # the last: budget units charged
        get = shard.core.get(ids, self._got, state, room if room > 0 else 1)
        if not state[2] and get.remaining:  # still reading: its buffers are held now
            state[2] = get.reserved
            self._charge(get.reserved)

    def _verdict(self, v: Verdict) -> None:
        if v.response is not None:
            self._send([p.encode_response(v.response, self.limits)])
        if v.close:
            self._close_after_send()

    def _answer_error(self, rid: int, op: p.Opcode, status: p.Status, message: str,
                      close: bool = False) -> None:
        self._send([p.encode_response(p.ErrorResponse(rid, op, status, message), self.limits)])
        if status != p.Status.BUSY:
            self.shard.error(OPS.get(op, "other"), status.name)
        if close:
            self._close_after_send()

    def _got(self, op: GetOp) -> None:
        state = op.arg
        rid, started = state[0], state[1]
        self.pending -= 1
        results = op.results
        if not state[2]:  # answered at once: charge it now, until it is sent
            state[2] = op.reserved
            self._charge(op.reserved)
        nbytes = state[2]
        if self.closed:
            self._release_results(results)
            self._uncharge(nbytes)
            return
        rows, views = [], []
        OK, NOT_FOUND, BUSY = p.Status.OK, p.Status.NOT_FOUND, p.Status.BUSY
        for block_id, r in zip(op.ids, results):
            if r is None:
                rows.append((block_id, 0, NOT_FOUND))
            elif r is DEFERRED:
                rows.append((block_id, 0, BUSY))  # did not fit: the client asks again
            else:
                rows.append((block_id, r.nbytes, OK))
                views.extend(r.views)

        def sent() -> None:
            self._release_results(results)
            self._uncharge(nbytes)

        self._send([p.frame_get_head(rid, rows), *views], sent)
        self.shard.observe("get", time.perf_counter() - started)

    def _got_one(self, state: list, result: Any) -> None:
        """The answer to a GET of one block (see _got for batches)."""
        rid, started, charged, block_id = state
        self.pending -= 1
        if result is None:
            if charged:
                self._uncharge(charged)
            if not self.closed:
                self._send([p.frame_get_head(rid, ((block_id, 0, p.Status.NOT_FOUND),))])
            self.shard.recorder.observe("get", time.perf_counter() - started)
            return
        if not charged:  # answered at once (the DRAM tier): held until it is sent
            charged = state[2] = result.nbytes
            self.held += charged
            self.shard.budget.used += charged
        if self.closed:
            self.shard.core.release(result)
            self._uncharge(charged)
            return
        head = p.frame_get_head(rid, ((block_id, result.nbytes, p.Status.OK),))
        self._send([head, *result.views], lambda: self._sent_one(result, charged))
        self.shard.recorder.observe("get", time.perf_counter() - started)

    def _sent_one(self, result: Any, charged: int) -> None:
        self.shard.core.release(result)
        self._uncharge(charged)

    def _release_results(self, results: list) -> None:
        release = self.shard.core.release
        for r in results:
            if r is not None and r is not DEFERRED:
                release(r)

    def _deleted(self, rid: int, started: float, found: list[bool]) -> None:
        self.pending -= 1
        if not self.closed:
            self._send([p.frame_bits_response(p.Opcode.DELETE, rid, found)])
        self.shard.observe("delete", time.perf_counter() - started)
        self._maybe_resume()

    # ---- shared memory (local connections) ------------------------------------------

    def _rdma_connect(self, rid: int, body: bytes) -> None:
        """Set up this connection's RDMA link; the answer (over TCP) is the node's end."""
        nic = self.shard.nic
        op = p.Opcode.RDMA_CONNECT
        if self.local or self.rdma is not None:
            self._answer_error(rid, op, p.Status.BAD_REQUEST, "RDMA_CONNECT is taken once, "
                               "on a TCP connection")
            return
        if nic is None:
            self._answer_error(rid, op, p.Status.BAD_REQUEST,
                               f"RDMA is not served by this node: {self.shard.rdma_note}")
            return
        from wqs.rdma.wire import Endpoint, RdmaError
        from wqs.server.rdma import ServerLink

        try:
            link = ServerLink(self, nic, Endpoint.unpack(p.decode_body(
                p.FrameHeader(op, 0, rid, p.Status.OK, 0, len(body)), body).endpoint))
        except (RdmaError, ProtocolError) as e:
            self._answer_error(rid, op, p.Status.BAD_REQUEST, f"RDMA link refused: {e}")
            return
        except Exception as e:  # noqa: BLE001 - a verb failed: the client falls back
            log.warning("%s: RDMA link could not be set up: %s", self.peer, e)
            self._answer_error(rid, op, p.Status.SERVER_ERROR, f"RDMA link failed: {e}")
            return
        self._send([p.encode_response(p.RdmaConnectResponse(rid, link.endpoint().pack()))])
        self.flush()  # over TCP, before anything else goes by the link
        self.rdma = link
        log.info("%s: RDMA link up (QP %d)", self.peer, link.verbs.qp.qp_num)

    def _shm_request(self, h: p.FrameHeader, body: bytes) -> None:
        op, rid = h.opcode, h.request_id
        if not self.local and self.rdma is None:
            self._answer_error(rid, op, p.Status.BAD_REQUEST,
                               f"{op.name} is served on the node's local socket or an RDMA "
                               "link only")
            return
        try:
            if op == p.Opcode.REGISTER_MR or (op == p.Opcode.UNREGISTER and self.rdma):
                if self.rdma is None:
                    raise SegmentError("REGISTER_MR is for RDMA links (use REGISTER)")
                if op == p.Opcode.UNREGISTER:
                    self.rdma.unregister(p.decode_body(h, body).segment)
                else:
                    from wqs.rdma.wire import Memory

                    self.rdma.register(Memory.unpack(p.decode_body(h, body).memory))
                self._send([p.frame_empty_response(op, rid)])
            elif op == p.Opcode.REGISTER and self.rdma is not None:
                raise SegmentError("an RDMA link registers memory with REGISTER_MR")
            elif op == p.Opcode.REGISTER:
                msg = p.decode_body(h, body)
                if not self.fds:
                    raise SegmentError("REGISTER came without a file descriptor (send the "
                                       "memfd with the frame, SCM_RIGHTS)")
                self.segments.register(msg.segment, self.fds.pop(0), msg.size)
                self._send([p.frame_empty_response(op, rid)])
            elif op == p.Opcode.UNREGISTER:
                self.segments.unregister(p.decode_body(h, body).segment)
                self._send([p.frame_empty_response(op, rid)])
            else:
                self._get_shm(rid, p.parse_shm_table(h, body))
        except SegmentError as e:
            self._answer_error(rid, op, p.Status.BAD_REQUEST, str(e))

    def _shm_ranges(self, rid: int, op: p.Opcode, items: tuple[p.ShmItem, ...]
                    ) -> list[Any] | None:
        """The segment of each item (a mapped Segment; on an RDMA link, the client's
        Memory region), every range checked; None (answered) if one is not valid, or the
        request may not be served now."""
        resolve = self.rdma.range if self.rdma is not None else self.segments.range
        try:
            segs = [resolve(it.segment, it.offset, it.length) for it in items]
        except SegmentError as e:
            self._answer_error(rid, op, p.Status.BAD_REQUEST, str(e))
            return None
        if self.shard.draining:
            self._answer_error(rid, op, p.Status.BUSY, "the node is draining")
            return None
        misrouted = self.shard.misrouted([it.block_id for it in items])
        if misrouted is not None:
            self._answer_error(rid, op, p.Status.WRONG_SHARD, misrouted)
            return None
        return segs

    def _get_shm(self, rid: int, items: tuple[p.ShmItem, ...]) -> None:
        """Each hit goes into the client's memory: read from the device straight into
        its slot where the item allows (SHM_SLOT), else copied there from the DRAM tier
        or the engine's buffers. The answer says, per item, whether it is there."""
        segs = self._shm_ranges(rid, GET_SHM, items)
        if segs is None:
            return
        shard = self.shard
        get = _ShmGet(rid, items, segs, time.perf_counter())
        self.pending += 1
        get_into = shard.core.reader.get_into
        batch = []
        remote = self.rdma is not None
        for k, (it, seg) in enumerate(zip(items, segs)):
            if remote:
                batch.append(k)
                continue
            Segments.hold(seg)  # mapped until the answer is written into it
            slot = _slot(it, seg)
            if slot is not None:
                get.waiting += 1
                if get_into(it.block_id, slot, seg.addr + it.offset - ENTRY_HEADER,
                            self._got_shm_one, (get, k)):
                    continue
                get.waiting -= 1
            batch.append(k)
        if len(batch) == 1 and len(items) == 1:  # the common case, without a batch
            get.waiting += 1
            reserved = shard.core.reader.get_one(items[0].block_id, self._got_shm_one,
                                                 (get, 0))
            if reserved and get.waiting > 1:  # still reading: its buffer is held now
                get.charged = reserved
                self._charge(reserved)
        elif batch:
            get.waiting += 1
            room = min(shard.options.max_connection_bytes - self.held, shard.budget.room())
            op = shard.core.get([items[k].block_id for k in batch], self._got_shm_batch,
                                (get, batch), room if room > 0 else 1)
            if op.remaining and not get.charged:  # still reading: its buffers are held
                get.charged = op.reserved
                self._charge(op.reserved)
        get.waiting -= 1  # every read is started: the last to finish answers
        if not get.waiting:
            self._answer_shm_get(get)

    def _got_shm_one(self, arg: tuple, result: Any) -> None:
        get, k = arg
        self._place(get, k, result)
        self._shm_read_done(get)

    def _got_shm_batch(self, op: GetOp) -> None:
        get, batch = op.arg
        for k, r in zip(batch, op.results):
            self._place(get, k, r)
        self._shm_read_done(get)

    def _shm_read_done(self, get: "_ShmGet") -> None:
        """One of get's reads has placed its hits: its buffers are back, the budget too;
        the last read to finish answers."""
        if get.charged:
            self._uncharge(get.charged)
            get.charged = 0
        get.waiting -= 1
        if not get.waiting:
            self._answer_shm_get(get)

    def _place(self, get: "_ShmGet", k: int, r: Any) -> None:
        """Item k's answer row; a hit not already in place is copied into the client's
        memory (it stays mapped: held) and its buffers go back to the engine."""
        it, seg = get.items[k], get.segs[k]
        if r is None:
            get.rows[k] = (it.block_id, it.offset, 0, it.segment, p.Status.NOT_FOUND)
            return
        if r is DEFERRED:  # past this connection's budget: the client asks again
            get.rows[k] = (it.block_id, it.offset, 0, it.segment, p.Status.BUSY)
            return
        if r.nbytes > it.length:
            get.rows[k] = (it.block_id, it.offset, r.nbytes, it.segment, p.Status.TOO_LARGE)
        elif self.rdma is not None:  # RDMA-written; the answer follows it on the QP
            ok = self.rdma.write_hit(seg, it.offset, r.views)
            get.rows[k] = (it.block_id, it.offset, r.nbytes if ok else 0, it.segment,
                           p.Status.OK if ok else p.Status.BUSY)
        else:
            if r.views[0].obj is not seg.mem:  # not read straight into the slot
                at, dest = it.offset, seg.view
                for v in r.views:
                    dest[at : at + len(v)] = v
                    at += len(v)
            get.rows[k] = (it.block_id, it.offset, r.nbytes, it.segment, p.Status.OK)
        self.shard.core.release(r)

    def _answer_shm_get(self, get: "_ShmGet") -> None:
        self.pending -= 1
        if self.rdma is None:
            for seg in get.segs:
                self.segments.unhold(seg)
        if not self.closed:
            self._send([p.frame_shm_get_response(get.rid, get.rows)])
        self.shard.observe("get_shm", time.perf_counter() - get.started)

    def _put_shm(self, h: p.FrameHeader, items: tuple[p.ShmItem, ...]) -> None:
        """Stage each block from the client's memory and commit it (the answer once
        every one is written, as for a PUT)."""
        rid = h.request_id
        verdict = self.session.admit(rid, PUT_SHM)
        if verdict is not None:
            self._verdict(verdict)
            return
        if not self.local and self.rdma is None:
            self._answer_error(rid, PUT_SHM, p.Status.BAD_REQUEST, "PUT_SHM is served on "
                               "the node's local socket or an RDMA link only")
            return
        segs = self._shm_ranges(rid, PUT_SHM, items)
        if segs is None:
            return
        if self.rdma is not None:
            self._put_rdma(rid, items, segs)
            return
        core = self.shard.core
        stage_into = core.writer.stage_into
        put = _PutFrame(rid, time.perf_counter(), PUT_SHM)
        for it, seg in zip(items, segs):
            slot = _slot(it, seg)
            op = None
            if slot is not None:  # written to the device from the client's memory
                op = stage_into(it.block_id, it.length, slot,
                                seg.addr + it.offset - ENTRY_HEADER)
                if op is not None:
                    Segments.hold(seg)  # mapped until the write is done
                    put.segs.append(seg)
            if op is None:
                try:
                    op = core.stage(it.block_id, it.length)
                except BlockTooLarge:
                    put.ops.append(None)
                    put.statuses.append(p.Status.TOO_LARGE)
                    continue
                at, src = it.offset, seg.view
                for t in op.targets:
                    t[:] = src[at : at + len(t)]
                    at += len(t)
                put.charged += it.length
            put.ops.append(op)
            put.statuses.append(p.Status.OK)
        self._charge(put.charged)
        self.pending += 1
        self._put_received(put)

    def _put_rdma(self, rid: int, items: tuple[p.ShmItem, ...], segs: list[Any]) -> None:
        """Each payload RDMA-read from the client into its staged entry buffers; the puts
        are committed once all have landed."""
        core, link = self.shard.core, self.rdma
        put = _PutFrame(rid, time.perf_counter(), PUT_SHM)
        put.waiting = 1  # reads outstanding, plus one until every read is started

        def landed(ok: bool) -> None:
            if not ok:
                put.failed += 1
            put.waiting -= 1
            if not put.waiting:
                self._rdma_put_landed(put)

        for it, mem in zip(items, segs):
            try:
                op = core.stage(it.block_id, it.length)
            except BlockTooLarge:
                put.ops.append(None)
                put.statuses.append(p.Status.TOO_LARGE)
                continue
            put.waiting += 1
            if not link.read_payload(mem, it.offset, op.targets, landed):
                put.waiting -= 1
                core.discard(op)
                put.ops.append(None)
                put.statuses.append(p.Status.BUSY)  # no staging room now: ask again
                continue
            put.ops.append(op)
            put.statuses.append(p.Status.OK)
            put.charged += it.length
        self._charge(put.charged)
        self.pending += 1
        landed(True)

    def _rdma_put_landed(self, put: _PutFrame) -> None:
        if put.failed:  # the link failed under the reads: nothing is written
            for op in put.ops:
                if op is not None:
                    self.shard.core.discard(op)
            self.pending -= 1
            self._uncharge(put.charged)
            return
        put.waiting = 0
        self._put_received(put)

    # ---- PUT ---------------------------------------------------------------------------

    def _start_put(self, h: p.FrameHeader, table: memoryview) -> None:
        verdict = self.session.admit(h.request_id, p.Opcode.PUT)
        if verdict is not None:  # refused before anything is reserved for it
            self._verdict(verdict)
            return
        items = p.parse_item_table(h, table, self.limits)
        put = _PutFrame(h.request_id, time.perf_counter())
        shard = self.shard
        refuse = None
        if shard.draining:
            refuse = (p.Status.BUSY, "the node is draining")
        else:
            misrouted = shard.misrouted([it.block_id for it in items])
            if misrouted is not None:
                refuse = (p.Status.WRONG_SHARD, misrouted)
        core = shard.core
        for it in items:
            op = None
            status = p.Status.OK
            if refuse is None:
                try:
                    op = core.stage(it.block_id, it.length)
                except BlockTooLarge:
                    status = p.Status.TOO_LARGE
            put.ops.append(op)
            put.statuses.append(status)
            if op is not None:
                put.targets.extend(op.targets)
                put.charged += it.length
            elif it.length:
                put.targets.extend(self._sink_views(it.length))
        put.targets = [t for t in put.targets if len(t)]
        if self.rdma is not None and refuse is None:
            refuse = (p.Status.BAD_REQUEST,
                      "inline payloads do not travel on an RDMA link: use PUT_SHM")
        put.refuse = refuse
        self._charge(put.charged)
        self.put = put
        self.pending += 1

    def _sink_views(self, n: int) -> list[memoryview]:
        """Where the bytes of a refused item go: one scratch buffer, reused."""
        if len(self.sink) < min(n, 1 << 20):
            self.sink = memoryview(bytearray(min(n, 1 << 20)))
        step = len(self.sink)
        return [self.sink[: min(step, n - k)] for k in range(0, n, step)]

    def _put_received(self, put: _PutFrame) -> None:
        """Every payload byte is in: commit the staged puts (written at turn end)."""
        self.put = None
        if put.refuse is not None:
            self.pending -= 1
            self._answer_error(put.rid, p.Opcode.PUT, *put.refuse)
            return
        put.waiting = sum(op is not None for op in put.ops)
        if not put.waiting:
            self._put_done(put)
            return
        commit = self.shard.core.commit
        for i, op in enumerate(put.ops):
            if op is not None:
                commit(op, self._put_written, (put, i))

    def _put_written(self, op: PutOp) -> None:
        put, i = op.arg
        if op.error is not None:
            put.statuses[i] = p.Status.NO_SPACE if op.no_space else p.Status.SERVER_ERROR
            put.failed += 1
        put.waiting -= 1
        if not put.waiting:
            self._put_done(put)

    def _put_done(self, put: _PutFrame) -> None:
        self.pending -= 1
        for seg in put.segs:
            self.segments.unhold(seg)
        self._uncharge(put.charged)
        if not self.closed:
            self._send([p.frame_put_response(put.rid, put.statuses, put.opcode)])
        op = OPS[put.opcode]
        if put.failed:
            self.shard.error(op, "SERVER_ERROR")
        self.shard.observe(op, time.perf_counter() - put.started)

    def _abandon_put(self) -> None:
        """The peer went away mid-payload: nothing of that frame is written."""
        put, self.put = self.put, None
        if put is None:
            return
        for op in put.ops:
            if op is not None:
                self.shard.core.discard(op)
        self.pending -= 1
        self._uncharge(put.charged)

    # ---- budget -------------------------------------------------------------------------

    def _charge(self, n: int) -> None:
        self.held += n
        self.shard.budget.take(n)

    def _uncharge(self, n: int) -> None:
        self.held -= n
        assert self.held >= 0, "budget released twice"
        self.shard.budget.give(n)
        self._maybe_resume()

    def _maybe_resume(self) -> None:
        if self.reading or self.closed or self.closing:
            return
        h = self.header
        if h is not None and h.opcode in (p.Opcode.PUT, PUT_SHM):  # waiting to stage it
            need = h.body_len - h.count * p.ITEM.size if h.opcode == p.Opcode.PUT else self.need
            if not self._room_for(need):
                self.shard.budget.wait(self)
                return
        elif not (self.held <= self.shard.options.max_connection_bytes // 2
                  and self.pending < MAX_PENDING // 2
                  and self.queued - self.sent <= MAX_UNSENT // 2
                  and not self.shard.budget.over()):
            return
        self._resume()
        if self.rstart != self.rend or self.put is not None:
            self.shard.loop.call_soon(self._parse_later)

    def _parse_later(self) -> None:
        if not self.closed and self.put is None:
            self._safely(self._parse)

    # ---- sending ------------------------------------------------------------------------

    def _send(self, bufs: list[Any], on_sent: Callable[[], None] | None = None) -> None:
        if self.closed:
            if on_sent is not None:
                on_sent()
            return
        if self.rdma is not None:  # one frame, one SEND
            self.rdma.send(b"".join(bufs), on_sent)
            return
        for b in bufs:  # byte buffers and byte memoryviews: len() is their size
            self.queued += len(b)
        self.out.extend(bufs)
        if on_sent is not None:
            self.out_callbacks.append((self.queued, on_sent))
        if not self.dirty:
            self.dirty = True
            self.shard.dirty.append(self)

    def flush(self) -> None:
        """Send what is queued, as far as the socket takes it (the turn's end)."""
        self.dirty = False
        out = self.out
        while out and not self.closed:
            batch = out[:IOV_MAX]
            try:
                n = self.sock.sendmsg(batch)
            except BlockingIOError:
                n = 0
            except OSError as e:
                log.debug("%s: send failed: %s", self.peer, e)
                self.close()
                return
            self.sent += n
            k = 0
            for b in batch:
                size = len(b)
                if n < size:
                    break
                n -= size
                k += 1
            if k:
                del out[:k]
            if n:
                out[0] = memoryview(out[0])[n:]
            if k < len(batch):
                break  # the socket is full
        self._run_sent_callbacks()
        if not self.reading:
            self._maybe_resume()
        if out and not self.closed:
            if not self.writing:
                self.writing = True
                self.shard.loop.add_writer(self.fd, self._on_writable)
        else:
            if self.writing:
                self.writing = False
                self.shard.loop.remove_writer(self.fd)
            if self.closing:
                self.close()

    def _on_writable(self) -> None:
        self.flush()

    def _run_sent_callbacks(self) -> None:
        cbs = self.out_callbacks
        k = 0
        while k < len(cbs) and cbs[k][0] <= self.sent:
            k += 1
        if k:
            done, self.out_callbacks = cbs[:k], cbs[k:]
            for _, cb in done:
                cb()

    def _close_after_send(self) -> None:
        self.closing = True
        self._pause()

    # ---- end ------------------------------------------------------------------------

    def stalled(self, now: float) -> str | None:
        """Why the connection should be dropped now, or None."""
        opts = self.shard.options
        mid_frame = self.header is not None or self.put is not None or self.rstart != self.rend
        if mid_frame and self.reading and now - self.last_rx > opts.frame_timeout_s:
            return f"stalled mid-frame for {opts.frame_timeout_s}s"
        if opts.idle_timeout_s is not None and not mid_frame and not self.pending \
                and now - self.last_rx > opts.idle_timeout_s:
            return f"idle for {opts.idle_timeout_s}s"
        return None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._abandon_put()
        self.segments.close()  # each unmapped once no read into it is in flight
        if self.rdma is not None:
            self.rdma.close()
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.shard.loop.forget(self.fd)
        try:
            self.sock.close()
        except OSError:
            pass
        # Queued answers are never sent: what they hold goes back now.
        self.out.clear()
        callbacks, self.out_callbacks = self.out_callbacks, []
        for _, cb in callbacks:
            cb()
        self.shard.forget(self)
