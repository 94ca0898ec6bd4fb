"""The TCP data-plane server: sockets and threads around the sans-IO protocol.

One reader thread per connection decodes frames and receives PUT payloads straight
into their own buffers; requests then run on a shared worker pool (the engine's IO
releases the GIL), so many requests are in flight per connection and answers go back
in completion order, matched by request id. Responses are written with sendmsg from
the engine's buffers, never joined.

Limits: connections (max_connections), request payload bytes held in memory at once
(max_inflight_bytes, shared by all connections), and everything in `Limits`.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from wqs.engine import Engine
from wqs.nvme.buffers import BufferPool
from wqs.errors import AuthError, BlockTooLarge, ProtocolError
from wqs.rpc import auth
from wqs.rpc import protocol as p

log = logging.getLogger("wqs.rpc.server")

IOV_MAX = 1024  # Linux limit on buffers per sendmsg
RECV_CHUNK = 256 * 1024
PER_CONNECTION_INFLIGHT = 64  # requests a connection may have queued before we stop reading

# Index-only requests: cheaper to answer than to hand to another thread.
_INLINE_OPS = frozenset({p.Opcode.PING, p.Opcode.EXISTS, p.Opcode.LOOKUP_PREFIX})

_EMPTY = memoryview(b"")

_OP_NAMES = {
    p.Opcode.PUT: "put", p.Opcode.GET: "get", p.Opcode.EXISTS: "exists",
    p.Opcode.DELETE: "delete", p.Opcode.LOOKUP_PREFIX: "lookup_prefix", p.Opcode.PING: "ping",
}


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 7070
    auth_token: str | None = None
    workers: int = 16
    max_connections: int = 1024
    max_inflight_bytes: int = 1 << 30
    # A peer silent this long in the middle of a frame is disconnected: a stalled PUT
    # would otherwise hold its share of max_inflight_bytes for ever.
    frame_timeout_s: float = 30.0
    idle_timeout_s: float | None = None  # close connections silent between frames


class _ByteBudget:
    """Bytes of request payload held in memory by all connections together."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        if n <= 0:
            return
        n = min(n, self.limit)  # one frame larger than the budget may still run, alone
        with self._cond:
            while self.used + n > self.limit:
                self._cond.wait()
            self.used += n

    def release(self, n: int) -> None:
        if n <= 0:
            return
        n = min(n, self.limit)
        with self._cond:
            self.used -= n
            self._cond.notify_all()


class _Workers:
    """Request threads fed by one queue.

    Cheaper per request than ThreadPoolExecutor (no Future, no per-submit bookkeeping),
    whose submit() showed up as a tenth of the daemon's GIL time under 64 KiB puts.
    """

    def __init__(self, n: int, name: str) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stopped = False
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
                         for i in range(n)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., None], *args: object) -> None:
        if self._stopped:
            raise RuntimeError("workers stopped")
        self._queue.put((fn, args))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, args = item
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - a request must never kill its worker
                log.exception("request worker failed")

    def shutdown(self) -> None:
        """Run what is queued, then stop."""
        self._stopped = True
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()


class DataServer:
    """Serves one engine on one TCP address until stop()."""

    def __init__(self, engine: Engine, options: ServerOptions,
                 observe: Callable[[str, float, str | None], None] | None = None) -> None:
        self.engine = engine
        self.options = options
        # Advertise the engine's own block limit so clients refuse oversize blocks early.
        self.limits = p.Limits(
            max_block=engine.max_block_size,
            max_body=max(p.MAX_BODY, engine.max_block_size + p.MAX_ITEMS * p.ITEM.size))
        self._observe = observe
        self._pool = _Workers(options.workers, "wqs-req")
        # PUT payloads are received into these (reused, so not zero-filled per request).
        self.rx_buffers = BufferPool(max_cached_bytes=256 << 20)
        self._budget = _ByteBudget(options.max_inflight_bytes)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._inflight = 0
        self._draining = False
        self._stopped = False
        self._connections: set[_Connection] = set()
        self._sock = socket.create_server((options.host, options.port), backlog=512,
                                          reuse_port=False)
        self.port = self._sock.getsockname()[1]
        self._accept_thread = threading.Thread(target=self._accept_loop, name="wqs-accept",
                                               daemon=True)

    @property
    def address(self) -> str:
        host = self.options.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def start(self) -> None:
        self._accept_thread.start()
        log.info("data plane listening on %s", self.address)

    def drain(self, timeout_s: float) -> tuple[bool, int]:
        """Refuse new requests (BUSY) and wait for those in flight; (drained, remaining)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._draining = True
            while self._inflight > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._idle.wait(left)
            return self._inflight == 0, self._inflight

    def stop(self) -> None:
        """Stop accepting, close every connection, finish queued requests."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            connections = list(self._connections)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        for c in connections:
            c.close()
        self._pool.shutdown()

    # ---- connections -----------------------------------------------------------------

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, peer = self._sock.accept()
            except OSError:
                return  # listening socket closed by stop()
            with self._lock:
                if self._stopped:
                    sock.close()
                    return
                if len(self._connections) >= self.options.max_connections:
                    log.warning("refusing %s: max_connections (%d) reached", peer,
                                self.options.max_connections)
                    sock.close()
                    continue
                conn = _Connection(self, sock, peer)
                self._connections.add(conn)
            threading.Thread(target=conn.run, name=f"wqs-conn-{peer}", daemon=True).start()

    def _forget(self, conn: "_Connection") -> None:
        with self._lock:
            self._connections.discard(conn)

    def _begin(self) -> bool:
        with self._lock:
            if self._draining:
                return False
            self._inflight += 1
            return True

    def _end(self) -> None:
        with self._lock:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.notify_all()

    # ---- request handlers (run on the worker pool) -----------------------------------

    def handle(self, req: p.Request) -> p.Response:
        if isinstance(req, p.PutRequest):
            return self._put(req)
        if isinstance(req, p.GetRequest):
            return self._get(req)
        if isinstance(req, p.ExistsRequest):
            return p.ExistsResponse(req.request_id, tuple(self.engine.exists_many(req.ids)))
        if isinstance(req, p.DeleteRequest):
            return p.DeleteResponse(req.request_id, tuple(self.engine.delete(b) for b in req.ids))
        if isinstance(req, p.LookupPrefixRequest):
            return p.LookupPrefixResponse(req.request_id, self.engine.lookup_prefix(req.ids))
        if isinstance(req, p.PingRequest):
            return p.PingResponse(req.request_id)
        return p.ErrorResponse(req.request_id, req.opcode, p.Status.BAD_REQUEST,
                               f"{type(req).__name__} is not valid here")

    def _get(self, req: p.GetRequest) -> p.Response:
        values = self.engine.get_many(list(req.ids))
        items = []
        room = self.limits.max_body - len(req.ids) * p.ITEM.size
        for block_id, value in zip(req.ids, values):
            if value is None:
                items.append(p.GetItem(block_id, p.Status.NOT_FOUND, None))
            elif len(value) > room:
                # The frame would outgrow max_body: the client asks again for these.
                items.append(p.GetItem(block_id, p.Status.BUSY, None))
            else:
                room -= len(value)
                items.append(p.GetItem(block_id, p.Status.OK, value))
        return p.GetResponse(req.request_id, tuple(items))

    def _put(self, req: p.PutRequest) -> p.Response:
        statuses = []
        accepted = []
        for block_id, payload in req.items:
            if len(payload) > self.engine.max_block_size:
                statuses.append(p.Status.TOO_LARGE)
            else:
                statuses.append(p.Status.OK)
                accepted.append((block_id, payload))
        try:
            self.engine.put_many(accepted)
        except BlockTooLarge:
            statuses = [p.Status.TOO_LARGE] * len(req.items)
        return p.PutResponse(req.request_id, tuple(statuses))


class _Connection:
    """One client connection: the reader loop, and a lock for writers."""

    def __init__(self, server: DataServer, sock: socket.socket, peer: object) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.decoder = p.FrameDecoder(server.limits)
        self._send_lock = threading.Lock()
        self._slots = threading.Semaphore(PER_CONNECTION_INFLIGHT)
        self._inflight = 0  # requests of this connection running on the pool
        self._inflight_lock = threading.Lock()
        self._nonce = auth.make_nonce()
        self._hello_done = False
        self._authenticated = server.options.auth_token is None
        self._closed = False
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(server.options.frame_timeout_s)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()

    def run(self) -> None:
        try:
            self._read_loop()
        except p.FrameRejected as e:
            log.info("%s: rejected frame: %s", self.peer, e)
            self._send_quietly(p.ErrorResponse(e.request_id, e.opcode, e.status, str(e)[:1000]))
        except ProtocolError as e:
            log.info("%s: protocol error, closing: %s", self.peer, e)
        except (ConnectionError, TimeoutError, OSError) as e:
            if not self._closed:
                log.debug("%s: connection ended: %s", self.peer, e)
        finally:
            self.close()
            self.server._forget(self)

    def _recv_some(self) -> None:
        # Never read past what the decoder needs: payload bytes then stay in the socket
        # until read_payload_into receives them into their own buffer.
        want = min(max(self.decoder.needed, 1), RECV_CHUNK)
        idle = 0.0
        while True:
            try:
                data = self.sock.recv(want)
                break
            except TimeoutError:
                if self.decoder.header is not None or self.decoder.buffered:
                    raise TimeoutError(f"stalled mid-frame for "
                                       f"{self.server.options.frame_timeout_s}s") from None
                idle += self.server.options.frame_timeout_s
                limit = self.server.options.idle_timeout_s
                if limit is not None and idle >= limit:
                    raise
        if not data:
            raise ConnectionError("peer closed the connection")
        self.decoder.feed(data)

    def _read_loop(self) -> None:
        dec = self.decoder
        put_items: list[tuple[bytes, bytearray]] = []
        put_bytes = 0  # budget held by the PUT being received; returned however it ends
        rx: list = []  # receive buffers of the PUT being received
        try:
            while not self._closed:
                ev = dec.next_event()
                if ev is None:
                    self._recv_some()
                    continue
                if not self._hello_done and not isinstance(ev, p.HelloRequest):
                    rid = ev.header.request_id if isinstance(ev, p.ItemTable) else ev.request_id
                    op = ev.header.opcode if isinstance(ev, p.ItemTable) else ev.opcode
                    self._send(p.ErrorResponse(rid, op, p.Status.BAD_REQUEST,
                                               "HELLO must be the first request"))
                    self.close()
                    return
                if isinstance(ev, p.ItemTable):
                    if not self._authenticated:
                        # Refuse before reserving budget or memory for what the peer claims.
                        self._send(p.ErrorResponse(
                            ev.header.request_id, p.Opcode.PUT, p.Status.AUTH_REQUIRED,
                            "this server requires AUTH before data operations"))
                        self.close()
                        return
                    # Lengths were checked against Limits by the decoder before we get here.
                    put_bytes = sum(it.length for it in ev.items)
                    self.server._budget.acquire(put_bytes)
                    # Buffers are allocated as their payloads arrive (PayloadStart), so
                    # memory follows the bytes received, not the bytes claimed.
                    put_items = [(it.block_id, _EMPTY) for it in ev.items]
                elif isinstance(ev, p.PayloadStart):
                    buf = self.server.rx_buffers.acquire(ev.length)
                    rx.append(buf)
                    view = buf.view[: ev.length]
                    put_items[ev.index] = (ev.block_id, view)
                    dec.read_payload_into(view, self.sock.recv_into)
                elif isinstance(ev, p.FrameEnd):
                    req = p.PutRequest(ev.header.request_id, tuple(put_items))
                    held, put_items, put_bytes, bufs, rx = put_bytes, [], 0, rx, []
                    # Releases `held` and the buffers when the request is done.
                    self._dispatch(req, payload_bytes=held, buffers=bufs)
                elif isinstance(ev, p.HelloRequest):
                    self._hello_done = True
                    self._send(p.HelloResponse(ev.request_id, self._nonce,
                                               not self._authenticated, self.server.limits))
                elif isinstance(ev, p.AuthRequest):
                    self._authenticate(ev)
                else:
                    self._dispatch(ev, payload_bytes=0)
        finally:
            if put_bytes:  # the peer went away (or broke the frame) mid-PUT
                self.server._budget.release(put_bytes)
            self._release_buffers(put_items, rx)

    def _authenticate(self, req: p.AuthRequest) -> None:
        token = self.server.options.auth_token
        if token is None:
            self._send(p.AuthResponse(req.request_id, bytes(32)))  # nothing to prove
            return
        try:
            if not self._hello_done:
                raise AuthError("AUTH before HELLO")
            auth.verify(auth.client_proof(token, self._nonce, req.client_nonce), req.proof)
        except AuthError as e:
            log.warning("%s: authentication failed: %s", self.peer, e)
            self._send(p.ErrorResponse(req.request_id, p.Opcode.AUTH, p.Status.AUTH_FAILED,
                                       "authentication failed"))
            self.close()
            return
        self._authenticated = True
        self._send(p.AuthResponse(req.request_id,
                                  auth.server_proof(token, self._nonce, req.client_nonce)))

    def _dispatch(self, req: p.Request, payload_bytes: int, buffers: list | None = None) -> None:
        """Answer a request, here or on the pool; its budget and buffers are returned
        when it is done, whichever way that is."""
        if not self._authenticated:
            self._done_with(req, payload_bytes, buffers)
            self._send(p.ErrorResponse(req.request_id, req.opcode, p.Status.AUTH_REQUIRED,
                                       "this server requires AUTH before data operations"))
            self.close()
            return
        if not self.server._begin():
            self._done_with(req, payload_bytes, buffers)
            self._send(p.ErrorResponse(req.request_id, req.opcode, p.Status.BUSY,
                                       "the node is draining"))
            return
        if self._run_inline(req):
            self._slots.acquire()
            self._execute(req, payload_bytes, buffers)
            return
        self._slots.acquire()  # backpressure: stop reading while too much is queued
        try:
            with self._inflight_lock:
                self._inflight += 1
            self.server._pool.submit(self._execute, req, payload_bytes, buffers, True)
        except RuntimeError:  # workers stopped: the server is stopping
            with self._inflight_lock:
                self._inflight -= 1
            self._slots.release()
            self._done_with(req, payload_bytes, buffers)
            self.server._end()
            raise ConnectionError("server stopping") from None

    def _done_with(self, req: p.Request, payload_bytes: int, buffers: list | None) -> None:
        self.server._budget.release(payload_bytes)
        if buffers:
            self._release_buffers(req.items, buffers)  # type: ignore[union-attr]

    def _release_buffers(self, items: Sequence, buffers: list) -> None:
        """Give PUT receive buffers back (their views first: an exported mmap cannot be
        closed when the pool trims itself)."""
        for _, view in items:
            if isinstance(view, memoryview) and view is not _EMPTY:
                view.release()
        for buf in buffers:
            self.server.rx_buffers.release(buf)
        buffers.clear()

    def _run_inline(self, req: p.Request) -> bool:
        """Whether to answer on the reader thread rather than hand over to the pool.

        A hand-over costs a thread switch (tens of microseconds under the GIL), more
        than an index-only request takes, and more than a lone GET or PUT gains from
        running beside the reader. Pipelined requests still go to the pool, in parallel.
        """
        if req.opcode in _INLINE_OPS:
            return True
        if self._inflight or self.decoder.buffered:
            return False
        readable, _, _ = select.select([self.sock], [], [], 0)
        return not readable

    def _execute(self, req: p.Request, payload_bytes: int, buffers: list | None = None,
                 pooled: bool = False) -> None:
        op = _OP_NAMES.get(req.opcode, "other")
        started = time.perf_counter()
        error = None
        try:
            try:
                resp = self.server.handle(req)
            except Exception as e:  # the node's fault, not the client's: keep serving
                log.exception("%s failed", op)
                error = type(e).__name__
                resp = p.ErrorResponse(req.request_id, req.opcode, p.Status.SERVER_ERROR,
                                       f"{type(e).__name__}: {e}"[:1000])
            self._send_quietly(resp)
        finally:
            if pooled:
                with self._inflight_lock:
                    self._inflight -= 1
            self._slots.release()
            self._done_with(req, payload_bytes, buffers)
            self.server._end()
            if self.server._observe is not None:
                self.server._observe(op, time.perf_counter() - started, error)

    def _send(self, msg: p.Response) -> None:
        bufs = p.encode(msg, self.server.limits)
        with self._send_lock:
            while bufs:
                sent = self.sock.sendmsg(bufs[:IOV_MAX])
                bufs = p.advance(bufs, sent)

    def _send_quietly(self, msg: p.Response) -> None:
        try:
            self._send(msg)
        except OSError:
            self.close()  # the reader notices and cleans up
