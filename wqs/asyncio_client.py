"""`wqs.AsyncClient`: the WQS SDK on the asyncio event loop itself, without threads.

The same calls and results as `wqs.Client` (put_many, get_many, exists_many, delete_many,
lookup_prefix, put, get, exists, delete, ping), as coroutines::

    async with wqs.AsyncClient(["10.0.0.1:7070", "10.0.0.2:7070"]) as client:
        ok = await client.put_many(zip(ids, blocks))
        hits = await client.get_many(ids, outs=buffers)   # straight into the buffers

It speaks the data-plane protocol on the running loop, on the sans-IO pieces the
synchronous SDK uses (framing and parsing in wqs/rpc/protocol.py, the handshake rules in
wqs/rpc/session.py, placement by wqs.ring): every connection is an
`asyncio.BufferedProtocol`, one per shard of each node (times `connections_per_node`),
opened on first use and kept. Many requests are in flight on a connection at once,
matched by request id, so any number of coroutines share the connections; a batch
sends every node's and shard's share back to back and then waits for all the answers.

Copies. GET payloads are received by the socket straight into their destination: the
caller's `outs[i]`, or a fresh buffer per hit when there are no outs (then copied once
into the bytes object returned, as Client does; pass outs to avoid that copy). The
exceptions are small ones (under 64 KiB, cheaper to copy than to receive one by one)
and whatever part of a payload arrived in the same read as its frame's header; those
bytes are copied once out of the connection's receive buffer. PUT payloads are written
from the caller's buffers in pieces of 256 KiB, the next piece only once the transport
has sent the previous one, so the most the transport ever copies is the part of one
piece the kernel did not take at once.

Failures are per block, as with `wqs.Client`: a node that cannot be reached makes its
blocks misses (None) and its puts False within `timeout_s`, with the reason in
`results.errors[i]`, and is then not tried again for `RETRY_INTERVAL_S`. A node that
answers with a wrong token, or without one when the client has one, raises AuthError;
a peer that does not speak the protocol, ProtocolError. A node restarted with another
number of shards is re-learnt (its HELLO lists its shards; a block it refuses with
WRONG_SHARD is sent again where it now belongs).

Use one AsyncClient on one event loop (the loop it is first used on); `close()` it, or
`async with`. Host names are resolved by asyncio's resolver (the loop's default
executor, a thread); with IP addresses in `servers` the client runs no thread at all.
Membership from etcd is not supported here (its watcher is a thread): list `servers`.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from typing import Any, Callable, Iterable, Sequence

from wqs.client import BatchResult, NodeDown, _buffer, _writable
from wqs.config import ClientConfig, with_token_file, load_client_config, parse_hostport
from wqs.errors import (BlockTooLarge, ConfigError, NodeUnavailable, ProtocolError,
                        RemoteError, WQSError)
from wqs.ids import BlockIdLike, to_block_id
from wqs.ring import HashRing, shard_of, weight_unit_for
from wqs.rpc import protocol as p
from wqs.rpc.pipeline import RETRY_INTERVAL_S
from wqs.rpc.session import ClientSession

log = logging.getLogger("wqs.client")

__all__ = ["AsyncClient"]

RX_BUFFER = 256 << 10  # the receive buffer of a connection; grows for a larger frame part
DIRECT_MIN = 64 << 10  # a payload at least this large is received straight into its place
SEND_PIECE = 256 << 10  # PUT payloads go to the transport in pieces of at most this
DISCARD = 1 << 20  # scratch that payloads nobody wants any more are received into
RELAYOUT_ROUNDS = 2  # a block whose node changed its shards is sent again this often

_OK, _BUSY, _NOT_FOUND = p.Status.OK, p.Status.BUSY, p.Status.NOT_FOUND


class _ShardsChanged(NodeUnavailable):
    """The node's shards are not what the client routed by: send the blocks again."""


# ---- one call, one request ----------------------------------------------------------


class _Call:
    """One round of a batch call: its requests in flight, its deadline, and the blocks
    to send again because their node's shards changed."""

    __slots__ = ("loop", "timeout_s", "deadline", "pending", "reqs", "future", "retry",
                 "last", "on_fail")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float,
                 deadline: float, on_fail: Callable[[list[int], WQSError], None],
                 last: bool) -> None:
        self.loop = loop
        self.timeout_s = timeout_s
        self.deadline = deadline  # loop.time()
        self.pending = 0
        self.reqs: set[_Req] = set()
        self.future: asyncio.Future | None = None
        self.retry: dict[str, list[int]] = {}
        self.last = last  # no more rounds: a changed layout fails the blocks
        self.on_fail = on_fail

    def failed(self, address: str, which: list[int], error: WQSError) -> None:
        """These blocks' request failed: try them again next round if their node was
        re-cut into other shards, else they fail."""
        if isinstance(error, _ShardsChanged) and not self.last:
            self.retry.setdefault(address, []).extend(which)
        else:
            self.on_fail(which, error)

    def finished(self, req: "_Req") -> None:
        self.reqs.discard(req)
        self.pending -= 1
        if self.pending == 0 and self.future is not None and not self.future.done():
            self.future.set_result(None)


class _Req:
    """A frame in flight and what to do with its answer (a message, an _Answer for an
    OK GET, or the exception that failed it)."""

    __slots__ = ("call", "conn", "opcode", "on_answer", "ids", "outs", "rid")

    def __init__(self, call: _Call | None, conn: "_Conn", opcode: p.Opcode,
                 on_answer: Callable[["_Req", Any], None], ids: Sequence[bytes] = (),
                 outs: Sequence[memoryview] | None = None) -> None:
        self.call = call
        self.conn = conn
        self.opcode = opcode
        self.on_answer = on_answer
        self.ids = ids
        self.outs = outs
        self.rid = 0


class _Answer:
    """An OK GET answer being received: its rows, each OK payload's destination, and how
    far the payload bytes (all of them back to back, in row order) have come."""

    __slots__ = ("req", "rows", "values", "too_small", "targets", "starts", "large", "li",
                 "ti", "off")

    def __init__(self, req: _Req | None, rows: tuple[p.ItemEntry, ...]) -> None:
        self.req = req
        self.rows = rows
        self.values: list[Any] = [None] * len(rows)
        self.too_small: dict[int, int] = {}  # row -> its length: the out buffer is smaller
        self.targets: list[memoryview] = []  # non-empty destinations, in stream order

    def start(self) -> None:
        """Index the targets: where each starts in the stream, which are large."""
        self.starts, pos = [], 0
        for t in self.targets:
            self.starts.append(pos)
            pos += len(t)
        self.large = [j for j, t in enumerate(self.targets) if len(t) >= DIRECT_MIN]
        self.li = self.ti = self.off = 0

    @property
    def complete(self) -> bool:
        return self.ti == len(self.targets)

    def current(self) -> memoryview:
        return self.targets[self.ti][self.off:]

    def current_is_large(self) -> bool:
        return len(self.targets[self.ti]) >= DIRECT_MIN

    def run(self) -> int:
        """Bytes from here to the start of the next large payload (0: none follows)."""
        if self.li == len(self.large):
            return 0
        return self.starts[self.large[self.li]] - self.starts[self.ti] - self.off

    def advance(self, n: int) -> None:
        targets = self.targets
        self.off += n
        while self.ti < len(targets) and self.off >= len(targets[self.ti]):
            self.off -= len(targets[self.ti])
            self.ti += 1
        while self.li < len(self.large) and self.large[self.li] < self.ti:
            self.li += 1


# ---- a connection -------------------------------------------------------------------


class _Conn(asyncio.BufferedProtocol):
    """One connection to one shard of a node."""

    def __init__(self, client: "AsyncClient", node: "_Node", shard: int, host: str,
                 port: int) -> None:
        self.client = client
        self.node = node
        self.shard = shard
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.transport: asyncio.Transport | None = None
        self.limits = p.DEFAULT_LIMITS  # the node's, once its HELLO answered
        self.hello: p.HelloResponse | None = None
        self.rids = itertools.count(1)
        self.inflight: dict[int, _Req] = {}
        self.rx = bytearray(RX_BUFFER)
        self.rxv = memoryview(self.rx)
        self.rstart = self.rend = 0
        self.header: p.FrameHeader | None = None  # of a frame whose body is incomplete
        self.answer: _Answer | None = None  # an OK GET answer's payloads being received
        self.read_limit = 0  # read no further than this (the rest of a GET's table)
        self.direct = False  # get_buffer handed out a payload's own destination
        self.queue: collections.deque[tuple[_Req | None, Any, bool]] = collections.deque()
        self.sending: _Req | None = None  # whose frame is partly with the transport
        self.paused = False
        self.closed = False
        self.error: WQSError | None = None
        self.scratch: memoryview | None = None

    # ---- asyncio's side ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # Told to pause as soon as anything waits in the transport: the next piece of a
        # payload is written only after that is sent (see _drain).
        transport.set_write_buffer_limits(high=0)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        reason = f"{self.address}: connection lost: {exc or 'closed by the node'}"
        if self.inflight:
            self.client._mark_down(self.node, reason)
        self.fail(NodeUnavailable(reason))
        node = self.node
        if self.hello is not None and not any(not c.closed for c in node.all_conns()):
            # Nothing was lost, but nothing is left either (the node restarted?): learn
            # its shards again when it is next used, it may come back cut otherwise.
            self.client._drop(node, NodeUnavailable(reason))

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._drain()

    def get_buffer(self, sizehint: int) -> memoryview:
        answer = self.answer
        limit = self.read_limit
        if answer is not None:  # receiving payloads: nothing else is buffered now
            if answer.current_is_large():
                self.direct = True
                return answer.current()
            limit = answer.run()  # small ones through rx, up to the next large one
        self.direct = False
        if self.rend == len(self.rx):  # full: move what is left to the front, or grow
            self._room(0)
        free = self.rxv[self.rend:]
        return free[:limit] if limit else free

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self.direct:
                self.direct = False
                answer = self.answer
                answer.advance(nbytes)
                if answer.complete:
                    self.answer = None
                    self._got(answer)
                    if not self.closed:
                        self._parse()
                return
            self.rend += nbytes
            self._parse()
        except ProtocolError as e:
            if self.hello is None:  # not a WQS peer, or another version: misconfiguration
                self.fail(ProtocolError(f"{self.address}: {e}"))
            else:
                self.client._mark_down(self.node, f"{self.address}: {e}")

    def eof_received(self) -> bool:
        return False  # close; connection_lost follows

    # ---- receiving ---------------------------------------------------------------------

    def _room(self, n: int) -> None:
        """Make rx hold n bytes from rstart on, with room after rend for more."""
        left = self.rend - self.rstart
        n = max(n, left + 1)
        if self.rstart + n <= len(self.rx):
            return
        if n > len(self.rx):  # a frame part larger than the buffer (a long item table)
            rx = bytearray(max(n, 2 * len(self.rx)))
            rx[:left] = self.rxv[self.rstart:self.rend]
            self.rx, self.rxv = rx, memoryview(rx)
        else:
            self.rx[:left] = self.rxv[self.rstart:self.rend]
        self.rstart, self.rend = 0, left

    def _parse(self) -> None:
        rxv = self.rxv
        while not self.closed:
            answer = self.answer
            if answer is not None:
                while not answer.complete and self.rstart < self.rend:
                    target = answer.targets[answer.ti]
                    k = min(len(target) - answer.off, self.rend - self.rstart)
                    target[answer.off:answer.off + k] = rxv[self.rstart:self.rstart + k]
                    self.rstart += k
                    answer.advance(k)
                if not answer.complete:
                    break  # the rest comes by get_buffer
                self.answer = None
                self._got(answer)
                continue
            avail = self.rend - self.rstart
            h = self.header
            if h is None:
                if avail < p.HEADER.size:
                    break
                h = p.parse_header(rxv[self.rstart:self.rstart + p.HEADER.size], self.limits,
                                   response=True)
                self.rstart += p.HEADER.size
                avail -= p.HEADER.size
                self.header = h
            if p.carries_payloads(h):
                table = h.count * p.ITEM.size
                if avail < table:
                    self._room(table)
                    self.read_limit = table - avail  # not into the payloads yet
                    rxv = self.rxv
                    break
                self.read_limit = 0
                rows = p.parse_item_table(h, rxv[self.rstart:self.rstart + table], self.limits)
                self.rstart += table
                self.header = None
                self.answer = self._start_answer(h, rows)
                continue
            if avail < h.body_len:
                self._room(h.body_len)
                rxv = self.rxv
                break
            body = bytes(rxv[self.rstart:self.rstart + h.body_len])
            self.rstart += h.body_len
            self.header = None
            self._answer(h, p.decode_body(h, body))
        if self.rstart == self.rend:
            self.rstart = self.rend = 0

    def _discard(self, n: int) -> list[memoryview]:
        """Destinations for n payload bytes nobody will read."""
        if self.scratch is None:
            self.scratch = memoryview(bytearray(DISCARD))
        return [self.scratch[:min(DISCARD, n - k)] for k in range(0, n, DISCARD)]

    def _start_answer(self, h: p.FrameHeader, rows: tuple[p.ItemEntry, ...]) -> _Answer:
        req = self.inflight.get(h.request_id)
        if req is not None:
            if req.opcode != p.Opcode.GET or len(rows) != len(req.ids) or \
                    any(r.block_id != b for r, b in zip(rows, req.ids)):
                raise ProtocolError(f"GET #{h.request_id}: the answer does not match the request")
        answer = _Answer(req, rows)
        outs = req.outs if req is not None else None
        targets, values = answer.targets, answer.values
        for i, row in enumerate(rows):
            if row.status != _OK:
                continue
            n = row.length
            if req is None:  # given up on: drained
                targets.extend(self._discard(n))
                continue
            if outs is not None:
                out = outs[i]
                if out.nbytes < n:
                    answer.too_small[i] = n
                    targets.extend(self._discard(n))
                    continue
                view = out[:n]
                values[i] = view
            else:
                values[i] = buf = bytearray(n)
                view = memoryview(buf)
            if n:
                targets.append(view)
        answer.start()
        return answer

    def _got(self, answer: _Answer) -> None:
        req = answer.req
        if req is not None and self.inflight.get(req.rid) is req:
            del self.inflight[req.rid]
            self.client._answered(req, answer)

    def _answer(self, h: p.FrameHeader, msg: Any) -> None:
        req = self.inflight.pop(h.request_id, None)
        if req is None:
            return  # the answer to a request given up on
        if h.opcode != req.opcode:
            raise ProtocolError(f"#{h.request_id}: a {h.opcode.name} answer to a "
                                f"{req.opcode.name} request")
        self.client._answered(req, msg)

    # ---- sending -----------------------------------------------------------------------

    def add(self, req: _Req) -> int | None:
        """Register req: its request id; None if the connection is closed (req was
        answered with the error)."""
        call = req.call
        if call is not None:
            call.pending += 1
            call.reqs.add(req)
        if self.closed:
            self.client._answered(req, self.error or NodeUnavailable(
                f"{self.address}: connection closed"), failed=True)
            return None
        req.rid = rid = next(self.rids)
        self.inflight[rid] = req
        return rid

    def write(self, req: _Req, bufs: Sequence[Any]) -> None:
        """Queue a frame (its request registered with add) and send what the transport
        takes now."""
        last = len(bufs) - 1
        self.queue.extend((req, b, i == last) for i, b in enumerate(bufs))
        if not self.paused:
            self._drain()

    def _drain(self) -> None:
        """Hand queued bytes to the transport until it holds some back (pause_writing):
        a large buffer from where it lies, a piece at a time; runs of small ones (frame
        heads, small payloads) joined into one write, not a system call each."""
        queue, transport = self.queue, self.transport
        while queue and not self.paused and not self.closed:
            req, buf, last = queue[0]
            n = len(buf)  # bytes, or a memoryview cast to bytes
            if n >= DIRECT_MIN:
                if n > SEND_PIECE:
                    transport.write(buf[:SEND_PIECE])
                    queue[0] = (req, buf[SEND_PIECE:], last)
                    self.sending = req
                else:
                    transport.write(buf)
                    queue.popleft()
                    self.sending = None if last else req
                continue
            group, total = [], 0
            while queue and (n := len(queue[0][1])) < DIRECT_MIN and total + n <= SEND_PIECE:
                req, buf, last = queue.popleft()
                group.append(buf)
                total += n
                self.sending = None if last else req
            transport.write(group[0] if len(group) == 1 else b"".join(group))

    def forget(self, reqs: set[_Req]) -> None:
        """Given up on these requests: their answers are drained, not delivered; frames
        of theirs not yet begun are not sent."""
        for req in reqs:
            if self.inflight.get(req.rid) is req:
                del self.inflight[req.rid]
        answer = self.answer
        if answer is not None and answer.req in reqs and not answer.complete:
            # Its payloads may be landing in the caller's buffers: not any more.
            rest = len(answer.targets[answer.ti]) - answer.off + sum(
                len(t) for t in answer.targets[answer.ti + 1:])
            answer.req = None
            answer.targets = self._discard(rest)
            answer.start()
        if any(r in reqs and r is not self.sending for r, _, _ in self.queue):
            self.queue = collections.deque(e for e in self.queue
                                           if e[0] not in reqs or e[0] is self.sending)

    def fail(self, error: WQSError) -> None:
        """Close, answering everything in flight with error."""
        if self.closed:
            return
        self.closed = True
        self.error = error
        inflight, self.inflight = self.inflight, {}
        self.answer = None
        self.queue.clear()
        if self.transport is not None:
            self.transport.abort()
        for req in inflight.values():
            self.client._answered(req, error, failed=True)

    async def roundtrip(self, msg: p.Request) -> p.Response:
        """One handshake request and its answer."""
        fut = asyncio.get_running_loop().create_future()

        def done(req: _Req, answer: Any) -> None:
            if not fut.done():
                if isinstance(answer, BaseException):
                    fut.set_exception(answer)
                else:
                    fut.set_result(answer)

        req = _Req(None, self, msg.opcode, done)
        rid = self.add(req)
        if rid is not None:
            frame = p.encode_request(msg)
            self.write(req, [frame[:8] + rid.to_bytes(8, "little") + frame[16:]])
        return await fut


# ---- a node -------------------------------------------------------------------------


class _Node:
    """A node's shards (learnt from its HELLO), the connections to each, its back-off."""

    def __init__(self, address: str, per: int) -> None:
        self.address = address
        self.host, self.port = parse_hostport(address)
        self.per = per
        self.ports: tuple[int, ...] | None = None  # every shard's data port, once known
        self.conns: list[list[_Conn | None]] = []
        self.rr = itertools.count()
        self.opening: dict[tuple[int, int], asyncio.Task] = {}
        self.generation = 0  # bumped whenever the node's connections are dropped
        self.down_until = 0.0
        self.last_error: str | None = None

    def live(self, shard: int) -> _Conn | None:
        """A live connection to shard, round robin over the slots; None if the slot's
        connection must be opened first (also when the layout is unknown)."""
        if self.ports is None or shard >= len(self.ports):
            return None
        conn = self.conns[shard][next(self.rr) % self.per if self.per > 1 else 0]
        return conn if conn is not None and not conn.closed else None

    def ready(self) -> bool:
        return self.ports is not None and all(
            c is not None and not c.closed for slots in self.conns for c in slots)

    def all_conns(self) -> list[_Conn]:
        return [c for slots in self.conns for c in slots if c is not None]


# ---- the client ---------------------------------------------------------------------


class AsyncClient:
    """A WQS cluster, seen from asyncio. Constructed like `wqs.Client`:
    `AsyncClient(servers, **options)` or `AsyncClient(config=ClientConfig(...))`.

    Connections open on first use (`await client.connect()` opens them all up front, and
    raises AuthError or ProtocolError for a misconfigured node there and then)."""

    def __init__(self, servers: Sequence[str] | None = None, *,
                 config: ClientConfig | None = None, **options: Any) -> None:
        if config is None:
            config = ClientConfig(servers=list(servers or []), **options)
        elif servers or options:
            raise TypeError("pass either a config or servers and options, not both")
        if config.etcd is not None:
            raise ConfigError("etcd: AsyncClient takes a static list of servers (the etcd "
                              "watcher is a thread); use wqs.Client for etcd membership")
        if config.transport in ("shm", "rdma"):
            raise ConfigError(f"transport: AsyncClient speaks TCP only, not "
                              f"{config.transport}; use wqs.Client for it")
        if config.auth_token is None and config.auth_token_file is not None:
            config = with_token_file(config)
        self.config = config
        weights = config.weights or {}
        weights = {a: weights.get(a, 1.0) for a in config.servers}
        self.ring = HashRing(weights, weight_unit=weight_unit_for(weights.values()))
        self._nodes: dict[str, _Node] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.failed_requests = 0  # requests that met a down or failing node
        self._closed = False

    @classmethod
    def from_config(cls, path: str) -> "AsyncClient":
        return cls(config=load_client_config(path))

    @property
    def nodes(self) -> tuple[str, ...]:
        return self.ring.nodes

    def node_errors(self) -> dict[str, str | None]:
        """Per node, the last error that made it unavailable (None: it is healthy)."""
        return {a: (n.last_error if (n := self._nodes.get(a)) else None)
                for a in self.ring.nodes}

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every connection (what is in flight fails with NodeUnavailable)."""
        self._closed = True
        for node in self._nodes.values():
            for task in node.opening.values():
                task.cancel()
            for conn in node.all_conns():
                conn.fail(NodeUnavailable(f"{node.address}: client closed"))
        await asyncio.sleep(0)  # let the transports finish closing

    async def connect(self) -> None:
        """Open the connections to every shard of every node now. A node that cannot be
        reached is marked down (its blocks fail until it is back), not an error."""
        self._check_loop()
        deadline = self._loop.time() + self.config.timeout_s

        async def one(address: str) -> None:
            node = self._node(address)
            try:
                n = await self._layout(node, deadline)
                await self._gather([self._connection(node, shard, deadline, slot)
                                    for shard in range(n) for slot in range(node.per)])
            except NodeUnavailable:
                pass

        await self._gather([one(a) for a in self.ring.nodes])

    async def shards(self, address: str) -> int:
        """How many shards the node at `address` has (connecting to it if need be)."""
        self._check_loop()
        return await self._layout(self._node(address), self._loop.time() + self.config.timeout_s)

    # ---- single blocks ---------------------------------------------------------------

    async def put(self, block_id: BlockIdLike, data: Any, *, replicas: int | None = None) -> bool:
        """Store a block. False if its node(s) could not take it; BlockTooLarge if it is
        larger than they accept."""
        results = await self.put_many([(block_id, data)], replicas=replicas)
        error = results.errors.get(0)
        if isinstance(error, BlockTooLarge):
            raise error
        return results[0]

    async def get(self, block_id: BlockIdLike, out: Any = None) -> Any:
        """The block's bytes, or None on a miss. With `out`, fill it and return
        True/False (BlockTooLarge if the block does not fit in it)."""
        if out is None:
            return (await self.get_many([block_id]))[0]
        results = await self.get_many([block_id], outs=[out])
        error = results.errors.get(0)
        if isinstance(error, BlockTooLarge):
            raise error
        return results[0] is not None

    async def exists(self, block_id: BlockIdLike) -> bool:
        return (await self.exists_many([block_id]))[0]

    async def delete(self, block_id: BlockIdLike) -> bool:
        return (await self.delete_many([block_id]))[0]

    # ---- batches ---------------------------------------------------------------------

    async def put_many(self, items: Iterable[tuple[BlockIdLike, Any]], *,
                       replicas: int | None = None) -> BatchResult:
        """Store blocks; per block True once every replica acknowledged it. The buffers
        are sent from where they lie: do not change them until this returns."""
        self._check_loop()
        ids, bufs = [], []
        for block_id, data in items:
            ids.append(to_block_id(block_id))
            bufs.append(_buffer(data))
        ok = [bool(self.ring)] * len(ids)
        errors: dict[int, WQSError] = {}

        def fail(which: list[int], error: WQSError) -> None:
            for i in which:
                ok[i] = False
                errors.setdefault(i, error)

        if ids and len(self.ring):
            plan = self._plan(ids, range(len(ids)), replicas or self.config.replicas, None)
            await self._run(plan, ids, fail, lambda call, conn, idx: self._send_puts(
                call, conn, idx, ids, bufs, fail))
        return BatchResult(ok, errors)

    async def get_many(self, block_ids: Iterable[BlockIdLike],
                       outs: Sequence[Any] | None = None) -> BatchResult:
        """Blocks in the order asked; None for a miss. Each hit is bytes received
        straight from the socket; with `outs`, it is received straight into outs[i] and
        returned as a memoryview of it (an out too small for its block is that block's
        BlockTooLarge in `results.errors`). Misses are asked of the other replicas."""
        self._check_loop()
        ids = [to_block_id(b) for b in block_ids]
        views = [_writable(o) for o in outs] if outs is not None else None
        if views is not None and len(views) != len(ids):
            raise ValueError(f"{len(ids)} ids but {len(views)} out buffers")
        results: list[Any] = [None] * len(ids)
        errors: dict[int, WQSError] = {}

        def fail(which: list[int], error: WQSError) -> None:
            for i in which:
                results[i] = None
                errors.setdefault(i, error)

        todo = list(range(len(ids))) if len(self.ring) else []
        replicas = self.config.replicas
        for attempt in range(min(replicas, len(self.ring))):
            if not todo:
                break
            for i in todo:
                errors.pop(i, None)
            plan = self._plan(ids, todo, replicas, attempt)
            await self._run(plan, ids, fail, lambda call, conn, idx: self._send_gets(
                call, conn, idx, ids, views, results, errors, fail))
            todo = [i for i in todo
                    if results[i] is None and not isinstance(errors.get(i), BlockTooLarge)]
        return BatchResult(results, errors)

    async def exists_many(self, block_ids: Iterable[BlockIdLike], *,
                          pin_s: float | None = None) -> list[bool]:
        """Whether each block is stored; a block its owner lacks is asked of its replicas.
        With pin_s, each block found is also pinned for pin_s seconds (see pin_many)."""
        if pin_s is not None:
            return (await self._pin(block_ids, pin_s))[0]
        self._check_loop()
        ids = [to_block_id(b) for b in block_ids]
        found = [False] * len(ids)
        await self._ask_replicas(ids, found, p.Opcode.EXISTS, lambda call, conn, idx:
                                 self._send_ids(call, conn, idx, ids, p.Opcode.EXISTS, found))
        return found

    async def _ask_replicas(self, ids: list[bytes], found: list[bool], opcode: p.Opcode,
                            send: Callable[[Any, Any, list[int]], None]) -> None:
        """Ask each block's owner, then its next replica for what was not found, and so
        on; send(call, conn, indexes) sends one round's requests on one connection."""
        todo = list(range(len(ids))) if len(self.ring) else []
        replicas = self.config.replicas
        for attempt in range(min(replicas, len(self.ring))):
            if not todo:
                break
            await self._run(self._plan(ids, todo, replicas, attempt), ids,
                            self._ignore(opcode), send)
            todo = [i for i in todo if not found[i]]

    async def pin_many(self, block_ids: Iterable[BlockIdLike], seconds: float) -> list[bool]:
        """Pin stored blocks for `seconds`: True where pinned now (Client.pin_many)."""
        return (await self._pin(block_ids, seconds))[1]

    async def unpin_many(self, block_ids: Iterable[BlockIdLike]) -> None:
        """Release pins (the blocks stay stored)."""
        await self._pin(block_ids, 0.0)

    async def _pin(self, block_ids: Iterable[BlockIdLike], seconds: float
                   ) -> tuple[list[bool], list[bool]]:
        self._check_loop()
        ids = [to_block_id(b) for b in block_ids]
        milliseconds = p.pin_milliseconds(seconds)
        found, pinned = [False] * len(ids), [False] * len(ids)
        await self._ask_replicas(ids, found, p.Opcode.PIN, lambda call, conn, idx:
                                 self._send_pins(call, conn, idx, ids, milliseconds, found,
                                                 pinned))
        return found, pinned

    async def delete_many(self, block_ids: Iterable[BlockIdLike]) -> list[bool]:
        """Delete blocks from every replica; True where any replica held the block."""
        self._check_loop()
        ids = [to_block_id(b) for b in block_ids]
        deleted = [False] * len(ids)
        if ids and len(self.ring):
            plan = self._plan(ids, range(len(ids)), self.config.replicas, None)
            await self._run(plan, ids, self._ignore(p.Opcode.DELETE),
                            lambda call, conn, idx: self._send_ids(
                                call, conn, idx, ids, p.Opcode.DELETE, deleted))
        return deleted

    async def lookup_prefix(self, block_ids: Iterable[BlockIdLike]) -> int:
        """How many leading blocks of a chain (e.g. from prefix_block_ids) are stored.

        A chain held by one unsharded node (and no replicas) is counted by that node, in
        one LOOKUP_PREFIX request; otherwise every node and shard answers EXISTS for its
        share at once and the leading run is counted here."""
        self._check_loop()
        ids = [to_block_id(b) for b in block_ids]
        if not ids or not len(self.ring):
            return 0
        plan = self.ring.group(ids)
        if len(plan) == 1 and self.config.replicas == 1:
            node = self._node(next(iter(plan)))
            try:
                one_shard = await self._layout(
                    node, self._loop.time() + self.config.timeout_s) == 1
            except NodeUnavailable:
                one_shard = False
            if one_shard:
                return await self._lookup_one(node, ids)
        found = await self.exists_many(ids)
        return next((i for i, hit in enumerate(found) if not hit), len(ids))

    async def _lookup_one(self, node: _Node, ids: list[bytes]) -> int:
        """LOOKUP_PREFIX on one unsharded node: chunk after chunk while each is all there."""
        total = 0
        start = 0
        while start < len(ids):
            count = [0]
            rest = list(range(start, len(ids)))
            taken: list[list[int]] = []

            def send(call: _Call, conn: _Conn, idx: list[int]) -> None:
                chunk = p.frames_for(idx, conn.limits, lambda i: p.ID_LEN - p.ITEM.size)[0]
                taken.append(chunk)
                self._send_ids(call, conn, chunk, ids, p.Opcode.LOOKUP_PREFIX, count)

            await self._run({node.address: rest}, ids, self._ignore(p.Opcode.LOOKUP_PREFIX),
                            send)
            if len(taken) > 1:  # re-cut into shards meanwhile: count them the other way
                found = await self.exists_many(ids[start:])
                return total + next((i for i, hit in enumerate(found) if not hit), len(found))
            taken = taken[0] if taken else []
            total += count[0]
            if not taken or count[0] < len(taken):
                break
            start += len(taken)
        return total

    async def ping(self) -> dict[str, float | None]:
        """Round-trip time per node (to its first shard) in seconds; None where down."""
        self._check_loop()
        out: dict[str, float | None] = {}

        async def one(address: str) -> None:
            started = time.perf_counter()
            answered: list[Any] = []
            node = self._node(address)
            call = self._call(lambda which, e: None, True)
            try:
                conn = await self._connection(node, 0, call.deadline)
                req = _Req(call, conn, p.Opcode.PING, lambda r, m: answered.append(m))
                rid = conn.add(req)
                if rid is not None:
                    conn.write(req, [p.encode_request(p.PingRequest(rid))])
                await self._wait(call)
            except NodeUnavailable:
                pass
            ok = answered and isinstance(answered[0], p.PingResponse)
            out[address] = time.perf_counter() - started if ok else None

        await self._gather([one(a) for a in self.ring.nodes])
        return {a: out[a] for a in self.ring.nodes}

    # ---- running a batch ---------------------------------------------------------------

    def _check_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError("this AsyncClient belongs to another event loop: use one "
                               "client per loop")
        if self._closed:
            raise RuntimeError("the AsyncClient is closed")

    def _node(self, address: str) -> _Node:
        node = self._nodes.get(address)
        if node is None:
            node = self._nodes[address] = _Node(address, self.config.connections_per_node)
        return node

    def _plan(self, ids: list[bytes], todo: Iterable[int], replicas: int,
              attempt: int | None) -> dict[str, list[int]]:
        """Blocks by node: to every replica (attempt None), or to replica `attempt`."""
        todo = list(todo)
        if replicas == 1 or len(self.ring) == 1:
            if len(todo) == len(ids):
                return self.ring.group(ids)
            return {a: [todo[k] for k in idx]
                    for a, idx in self.ring.group([ids[i] for i in todo]).items()}
        plan: dict[str, list[int]] = {}
        for i in todo:
            owners = self.ring.nodes_for(ids[i], replicas)
            for node in (owners if attempt is None else [owners[attempt % len(owners)]]):
                plan.setdefault(node, []).append(i)
        return plan

    def _call(self, on_fail: Callable[[list[int], WQSError], None], last: bool,
              deadline: float | None = None) -> _Call:
        timeout = self.config.timeout_s
        return _Call(self._loop, timeout, self._loop.time() + timeout if deadline is None
                     else deadline, on_fail, last)

    async def _run(self, plan: dict[str, list[int]], ids: list[bytes],
                   on_fail: Callable[[list[int], WQSError], None],
                   send: Callable[[_Call, _Conn, list[int]], None]) -> None:
        """Send every node's share (send(call, conn, blocks) per shard) and wait for the
        answers, within timeout_s; blocks whose node turned out re-cut into other shards
        go again, to where they now belong."""
        deadline = self._loop.time() + self.config.timeout_s
        for round_ in range(RELAYOUT_ROUNDS + 1):
            call = self._call(on_fail, round_ == RELAYOUT_ROUNDS, deadline)
            shares = [self._send_share(call, a, idx, ids, send) for a, idx in plan.items()]
            try:
                if len(shares) == 1 or all(
                        (n := self._nodes.get(a)) is not None and n.ready() for a in plan):
                    for share in shares:  # nothing to wait for: sent back to back
                        await share
                else:
                    await self._gather(shares)
                await self._wait(call)
            except BaseException:
                for share in shares:
                    share.close()  # those not run yet (an error, or cancelled meanwhile)
                self._abandon(call)
                raise
            if not call.retry:
                return
            plan = call.retry

    async def _gather(self, coros: list) -> None:
        """Run coroutines together; the first error they raised, once all are done."""
        if len(coros) == 1:
            await coros[0]
            return
        results = await asyncio.gather(*coros, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def _wait(self, call: _Call) -> None:
        """Until every request of call is answered; past its deadline, the connections
        still holding some are closed and their nodes marked down (which answers them)."""
        if call.pending == 0:
            return
        call.future = self._loop.create_future()
        timer = self._loop.call_at(call.deadline, self._expire, call)
        try:
            await call.future
        finally:
            timer.cancel()

    def _expire(self, call: _Call) -> None:
        for conn in {r.conn for r in call.reqs}:
            reason = f"{conn.address}: no answer within {call.timeout_s}s"
            self._mark_down(conn.node, reason)
            conn.fail(NodeUnavailable(reason))  # if it was no longer the node's

    def _abandon(self, call: _Call) -> None:
        """The caller is gone (cancelled, or an error): drop what is left of call."""
        reqs = set(call.reqs)
        for conn in {r.conn for r in reqs}:
            conn.forget(reqs)
        call.reqs.clear()
        call.pending = 0

    def _answered(self, req: _Req, msg: Any, failed: bool = False) -> None:
        if failed:
            self.failed_requests += 1
        try:
            req.on_answer(req, msg)
        except Exception:  # noqa: BLE001 - one caller's trouble must not stop the connection
            log.exception("handling the answer to %s failed", req.opcode.name)
        if req.call is not None:
            req.call.finished(req)

    async def _send_share(self, call: _Call, address: str, idx: list[int], ids: list[bytes],
                          send: Callable[[_Call, _Conn, list[int]], None]) -> None:
        """One node's blocks, split by the shard that owns each, sent on a connection to
        each shard; the blocks of a node or shard that cannot be reached fail."""
        node = self._node(address)
        try:
            n = await self._layout(node, call.deadline)
        except NodeUnavailable as e:
            self.failed_requests += 1
            call.failed(address, idx, e)
            return
        if n == 1:
            groups = {0: idx}
        else:
            groups = {}
            for i in idx:
                groups.setdefault(shard_of(ids[i], n), []).append(i)
            if not any(c is not None and not c.closed for c in node.conns[0]):
                # Shard 0 first, whose HELLO says whether the node is still cut as it was
                # (after a restart the other shards' ports may be gone, or others').
                try:
                    await self._connection(node, 0, call.deadline)
                except NodeUnavailable as e:
                    self.failed_requests += not isinstance(e, _ShardsChanged)
                    call.failed(address, idx, e)
                    return
        for shard, sidx in groups.items():
            conn = node.live(shard) if node.ports is not None and len(node.ports) == n else None
            if conn is None:
                try:
                    if node.ports is None or len(node.ports) != n:
                        raise _ShardsChanged(f"{address}: its shards changed")
                    conn = await self._connection(node, shard, call.deadline)
                except NodeUnavailable as e:
                    self.failed_requests += 1
                    call.failed(address, sidx, e)
                    continue
            send(call, conn, sidx)

    # ---- connections -------------------------------------------------------------------

    async def _layout(self, node: _Node, deadline: float) -> int:
        """The node's shard count (connecting to shard 0 to learn it, if need be)."""
        if node.ports is None:
            await self._connection(node, 0, deadline)
            if node.ports is None:
                raise NodeUnavailable(f"{node.address}: its shards changed meanwhile")
        return len(node.ports)

    async def _connection(self, node: _Node, shard: int, deadline: float,
                          slot: int | None = None) -> _Conn:
        """A connection to one shard of the node (round robin over its slots, or the
        slot given), opened if need be, waiting no longer than deadline; NodeDown while
        the node backs off."""
        conn = node.live(shard) if slot is None else None
        if conn is not None:
            return conn
        if node.ports is None:
            if shard:
                raise _ShardsChanged(f"{node.address}: its shards changed")
            slot = 0
        elif shard >= len(node.ports):
            raise _ShardsChanged(f"{node.address}: its shards changed")
        else:
            slot = next(node.rr) % node.per if slot is None else slot
            conn = node.conns[shard][slot]
            if conn is not None and not conn.closed:
                return conn
        if time.monotonic() < node.down_until:
            raise NodeDown(f"{node.address}: down ({node.last_error})")
        task = node.opening.get((shard, slot))
        if task is None:
            port = node.port if shard == 0 else node.ports[shard]
            task = self._loop.create_task(self._open(node, shard, slot, port, node.generation))
            task.add_done_callback(_retrieve)
            node.opening[(shard, slot)] = task
        left = deadline - self._loop.time()
        if left <= 0:
            raise NodeUnavailable(f"{node.address}: not connected within {self.config.timeout_s}s")
        try:
            return await asyncio.wait_for(asyncio.shield(task), left)
        except asyncio.TimeoutError:
            raise NodeUnavailable(f"{node.address}: not connected within "
                                  f"{self.config.timeout_s}s") from None

    async def _open(self, node: _Node, shard: int, slot: int, port: int,
                    generation: int) -> _Conn:
        conn = _Conn(self, node, shard, node.host, port)
        try:
            try:
                hello = await asyncio.wait_for(self._handshake(conn, node.host, port),
                                               self.config.connect_timeout_s)
            except (asyncio.TimeoutError, OSError, NodeUnavailable) as e:
                conn.fail(NodeUnavailable(f"{conn.address}: cannot connect"))
                what = "timed out" if isinstance(e, asyncio.TimeoutError) else str(e)
                reason = f"{conn.address}: cannot connect: {what}"
                if generation == node.generation:
                    self._mark_down(node, reason)
                raise NodeUnavailable(reason) from None
            except BaseException:
                conn.fail(NodeUnavailable(f"{conn.address}: handshake failed"))
                raise
        finally:
            if node.opening.get((shard, slot)) is asyncio.current_task():
                del node.opening[(shard, slot)]
        if generation != node.generation or self._closed:
            conn.fail(NodeUnavailable(f"{conn.address}: dropped"))
            raise NodeUnavailable(f"{node.address}: {node.last_error or 'connections dropped'}")
        ports = hello.shard_ports or (node.port,)
        if (node.ports is None or node.ports == ports) and hello.shard != shard:
            conn.fail(NodeUnavailable(f"{conn.address}: wrong shard"))
            raise ProtocolError(f"{conn.address} is shard {hello.shard}, expected shard {shard}")
        if node.ports is None:
            node.ports = ports
            node.conns = [[None] * node.per for _ in ports]
        elif node.ports != ports:  # restarted, cut into other shards
            log.info("node %s now has %d shards (had %d)", node.address, len(ports),
                     len(node.ports))
            self._relayout(node, ports)
            if hello.shard < len(ports):
                conn.shard = hello.shard
                node.conns[hello.shard][0] = conn
            raise _ShardsChanged(f"{node.address}: now has {len(ports)} shards")
        node.conns[shard][slot] = conn
        return conn

    async def _handshake(self, conn: _Conn, host: str, port: int) -> p.HelloResponse:
        await self._loop.create_connection(lambda: conn, host, port)
        session = ClientSession(self.config.auth_token, conn.address)
        nxt = session.on_hello(await conn.roundtrip(session.hello(0)), 0)
        if nxt is not None:
            session.on_auth(await conn.roundtrip(nxt))
        assert session.hello_response is not None
        conn.hello = session.hello_response
        conn.limits = conn.hello.limits
        return conn.hello

    def _drop(self, node: _Node, error: WQSError) -> None:
        node.generation += 1
        node.ports = None
        conns, node.conns = node.all_conns(), []
        node.opening.clear()  # those still connecting see the generation change
        for conn in conns:
            conn.fail(error)

    def _relayout(self, node: _Node, ports: tuple[int, ...]) -> None:
        """The node has other shards now: drop the connections routed by the old ones
        (their requests go again) and take the new layout."""
        self._drop(node, _ShardsChanged(f"{node.address}: its shards changed"))
        node.ports = ports
        node.conns = [[None] * node.per for _ in ports]

    def _mark_down(self, node: _Node, reason: str) -> None:
        """The node failed: its other connections are as dead as this one was; answer for
        it at once until the retry interval has passed."""
        node.down_until = time.monotonic() + RETRY_INTERVAL_S
        if node.last_error is None:
            log.warning("node %s unavailable: %s", node.address, reason)
        node.last_error = reason
        self._drop(node, NodeUnavailable(reason))

    def _mark_up(self, node: _Node) -> None:
        if node.last_error is not None:
            log.info("node %s is back", node.address)
            node.last_error = None
            node.down_until = 0.0

    # ---- requests ----------------------------------------------------------------------

    def _ignore(self, opcode: p.Opcode) -> Callable[[list[int], WQSError], None]:
        def fail(which: list[int], error: WQSError) -> None:
            log.debug("%s failed for %d blocks: %s", opcode.name, len(which), error)
        return fail

    def _request_error(self, req: _Req, msg: Any) -> WQSError:
        """What a failed request's blocks report; a changed shard layout is re-learnt."""
        if isinstance(msg, p.ErrorResponse):
            self.failed_requests += 1
            if msg.status == p.Status.WRONG_SHARD:
                node = req.conn.node
                log.info("node %s refused a block as not its shard's: re-learning its shards",
                         node.address)
                self._drop(node, _ShardsChanged(f"{node.address}: its shards changed"))
                return _ShardsChanged(f"{req.conn.address}: WRONG_SHARD: {msg.message}")
            log.warning("request to %s failed: %s: %s", req.conn.address, msg.status.name,
                        msg.message)
            return RemoteError(f"{req.conn.address}: {msg.status.name}: {msg.message}")
        if isinstance(msg, WQSError):
            return msg
        return RemoteError(f"{req.conn.address}: unexpected answer {type(msg).__name__}")

    def _send_puts(self, call: _Call, conn: _Conn, idx: list[int], ids: list[bytes],
                   bufs: list[memoryview], fail: Callable[[list[int], WQSError], None]) -> None:
        address = conn.node.address
        max_block = conn.limits.max_block
        fits = []
        for i in idx:
            if bufs[i].nbytes > max_block:
                fail([i], BlockTooLarge(f"block {ids[i].hex()} of {bufs[i].nbytes} B exceeds "
                                        f"the {max_block} B {address} accepts"))
            else:
                fits.append(i)
        for chunk in p.frames_for(fits, conn.limits, lambda i: bufs[i].nbytes):
            def answer(req: _Req, msg: Any, chunk: list[int] = chunk) -> None:
                if not isinstance(msg, p.PutResponse):
                    call.failed(address, chunk, self._request_error(req, msg))
                    return
                self._mark_up(req.conn.node)
                for i, status in zip(chunk, msg.statuses):
                    if status == _OK:
                        continue
                    if status == p.Status.TOO_LARGE:
                        fail([i], BlockTooLarge(f"block {ids[i].hex()} is larger than "
                                                f"{req.conn.address} accepts"))
                    else:
                        fail([i], RemoteError(f"{req.conn.address}: {status.name}"))

            req = _Req(call, conn, p.Opcode.PUT, answer)
            rid = conn.add(req)
            if rid is None:
                continue
            head = p.frame_put_head(rid, [(ids[i], bufs[i].nbytes) for i in chunk])
            conn.write(req, [head, *(bufs[i] for i in chunk if bufs[i].nbytes)])

    def _send_gets(self, call: _Call, conn: _Conn, idx: list[int], ids: list[bytes],
                   views: list[memoryview] | None, results: list[Any],
                   errors: dict[int, WQSError],
                   fail: Callable[[list[int], WQSError], None]) -> None:
        for chunk in p.frames_for(idx, conn.limits, lambda i: 0):
            self._send_get_chunk(call, conn, chunk, ids, views, results, fail)

    def _send_get_chunk(self, call: _Call, conn: _Conn, chunk: list[int], ids: list[bytes],
                        views: list[memoryview] | None, results: list[Any],
                        fail: Callable[[list[int], WQSError], None]) -> None:
        chunk_ids = [ids[i] for i in chunk]
        outs = [views[i] for i in chunk] if views is not None else None
        address = conn.node.address

        def answer(req: _Req, msg: Any) -> None:
            if not isinstance(msg, _Answer):  # the request failed as a whole
                call.failed(address, chunk, self._request_error(req, msg))
                return
            self._mark_up(req.conn.node)
            again = []
            for k, (i, row) in enumerate(zip(chunk, msg.rows)):
                status = row.status
                if status == _OK:
                    if k in msg.too_small:
                        fail([i], BlockTooLarge(
                            f"block {ids[i].hex()} is {msg.too_small[k]} B, its out buffer "
                            f"holds {outs[k].nbytes} B"))
                    elif outs is not None:
                        results[i] = msg.values[k]
                    else:  # bytes, as Client returns: one more copy; pass outs to avoid it
                        results[i] = bytes(msg.values[k])
                elif status == _BUSY:
                    again.append(i)  # did not fit the answer: ask again
                elif status != _NOT_FOUND:
                    fail([i], RemoteError(f"{req.conn.address}: {status.name}"))
            if again:
                self._send_get_chunk(call, req.conn, again, ids, views, results, fail)

        req = _Req(call, conn, p.Opcode.GET, answer, chunk_ids, outs)
        rid = conn.add(req)
        if rid is not None:
            conn.write(req, [p.frame_get_request(rid, chunk_ids)])

    def _send_ids(self, call: _Call, conn: _Conn, idx: list[int], ids: list[bytes],
                  opcode: p.Opcode, out: list[Any]) -> None:
        """EXISTS and DELETE (a bit per block into out), LOOKUP_PREFIX (out[0])."""
        address = conn.node.address
        for chunk in p.frames_for(idx, conn.limits, lambda i: p.ID_LEN - p.ITEM.size):
            def answer(req: _Req, msg: Any, chunk: list[int] = chunk) -> None:
                if isinstance(msg, p.LookupPrefixResponse):
                    out[0] = msg.count
                elif isinstance(msg, (p.ExistsResponse, p.DeleteResponse)):
                    for i, bit in zip(chunk, msg.bits):
                        out[i] = out[i] or bit
                else:
                    call.failed(address, chunk, self._request_error(req, msg))
                    return
                self._mark_up(req.conn.node)

            req = _Req(call, conn, opcode, answer)
            rid = conn.add(req)
            if rid is not None:
                conn.write(req, [p.frame_ids_request(opcode, rid, [ids[i] for i in chunk])])


    def _send_pins(self, call: _Call, conn: _Conn, idx: list[int], ids: list[bytes],
                   milliseconds: int, found: list[bool], pinned: list[bool]) -> None:
        address = conn.node.address
        for chunk in p.frames_for(idx, conn.limits, lambda i: p.ID_LEN - p.ITEM.size):
            def answer(req: _Req, msg: Any, chunk: list[int] = chunk) -> None:
                if not isinstance(msg, p.PinResponse):
                    call.failed(address, chunk, self._request_error(req, msg))
                    return
                for i, f, q in zip(chunk, msg.found, msg.pinned):
                    found[i] = found[i] or f
                    pinned[i] = pinned[i] or q
                self._mark_up(req.conn.node)

            req = _Req(call, conn, p.Opcode.PIN, answer)
            rid = conn.add(req)
            if rid is not None:
                conn.write(req, [p.frame_pin_request(rid, [ids[i] for i in chunk],
                                                     milliseconds)])


def _retrieve(task: asyncio.Task) -> None:
    """A connect task's error is its waiters' (if any are left): never 'not retrieved'."""
    if not task.cancelled():
        task.exception()
