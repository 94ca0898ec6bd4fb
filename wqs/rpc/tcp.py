"""The TCP transport: one connection to one storage node (implements `Transport`).

Requests are written by the calling thread, so any number can be in flight on one
connection. There is no reader thread: a caller waiting for its answer becomes the
connection's reader (leader/follower) and completes every response it decodes, by
request id, until its own arrives; then the next waiter takes over. That spares each
request a hand-over between threads, which under the GIL costs more than the read. A
GET's payloads are received straight into the caller's `outs` buffers when given.
Every wait is bounded by `timeout_s`; a connection that misses it is closed, so a
stuck node never hangs a caller twice.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from wqs.config import parse_hostport
from wqs.errors import AuthError, BlockTooLarge, NodeUnavailable, ProtocolError, RemoteError
from wqs.rpc import auth
from wqs.rpc import protocol as p

IOV_MAX = 1024
RECV_CHUNK = 256 * 1024


@dataclass
class _Pending:
    future: Future
    outs: Sequence[Any] | None = None
    dests: list[Any] = field(default_factory=list)
    items: tuple[p.ItemEntry, ...] = ()
    too_small: list[int] = field(default_factory=list)


def _check(resp: p.Response, expected: type) -> Any:
    if isinstance(resp, p.ErrorResponse):
        if resp.status == p.Status.AUTH_REQUIRED or resp.status == p.Status.AUTH_FAILED:
            raise AuthError(f"{resp.status.name}: {resp.message}")
        raise RemoteError(f"{resp.status.name}: {resp.message}")
    if not isinstance(resp, expected):
        raise ProtocolError(f"expected {expected.__name__}, got {type(resp).__name__}")
    return resp


class TcpTransport:
    """A connection to one node, past HELLO and AUTH. Thread-safe."""

    def __init__(self, address: str, *, auth_token: str | None = None,
                 timeout_s: float = 5.0, connect_timeout_s: float = 2.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        host, port = parse_hostport(address)
        try:
            self.sock = socket.create_connection((host, port), timeout=connect_timeout_s)
        except OSError as e:
            raise NodeUnavailable(f"{address}: cannot connect: {e}") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._decoder = p.FrameDecoder(response=True)
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()  # guards _pending, _closed and _reading
        self._reading = False  # some waiting caller is reading the socket
        # Waiters that are not reading, each woken alone: by its own response, or to
        # take over the reading (a shared condition would wake all 32 at QD32).
        self._followers: list[threading.Event] = []
        self._current: _Pending | None = None  # the payload frame being received
        self._send_lock = threading.Lock()
        self._closed = False
        self._error: Exception | None = None
        try:
            self.limits = self._handshake(auth_token, connect_timeout_s)
        except Exception:
            self.sock.close()
            raise

    # ---- handshake (synchronous, before any request) ---------------------------------

    def _handshake(self, token: str | None, timeout_s: float) -> p.Limits:
        self.sock.settimeout(timeout_s)
        try:
            hello = _check(self._roundtrip(p.HelloRequest(next(self._ids))), p.HelloResponse)
            if hello.auth_required:
                if token is None:
                    raise AuthError(f"{self.address} requires an auth token")
                client_nonce = auth.make_nonce()
                proof = auth.client_proof(token, hello.nonce, client_nonce)
                resp = _check(self._roundtrip(p.AuthRequest(next(self._ids), client_nonce, proof)),
                              p.AuthResponse)
                auth.verify(auth.server_proof(token, hello.nonce, client_nonce), resp.proof)
            elif token is not None:
                # A server that does not ask for the token cannot prove it knows it.
                raise AuthError(f"{self.address} does not require auth but a token was "
                                "configured: refusing a server that cannot prove the token")
            return hello.limits
        except (socket.timeout, ConnectionError) as e:
            raise NodeUnavailable(f"{self.address}: handshake failed: {e}") from None

    def _roundtrip(self, msg: p.Request) -> p.Response:
        self._send(msg)
        while True:
            resp = self._decoder.next_message()
            if resp is not None:
                return resp
            data = self.sock.recv(max(self._decoder.needed, 1))
            if not data:
                raise ConnectionError("connection closed during the handshake")
            self._decoder.feed(data)

    # ---- requests --------------------------------------------------------------------

    def _send(self, msg: p.Request) -> None:
        bufs = p.encode(msg, self.limits if hasattr(self, "limits") else p.DEFAULT_LIMITS)
        with self._send_lock:
            while bufs:
                sent = self.sock.sendmsg(bufs[:IOV_MAX])
                bufs = p.advance(bufs, sent)

    def submit(self, make: Callable[[int], p.Request], outs: Sequence[Any] | None = None) -> Future:
        """Send a request built by make(request_id); a Future of its response."""
        rid = next(self._ids)
        pending = _Pending(Future(), outs)
        with self._lock:
            if self._closed:
                raise NodeUnavailable(f"{self.address}: connection closed ({self._error})")
            self._pending[rid] = pending
        try:
            self._send(make(rid))
        except OSError as e:
            self._fail(NodeUnavailable(f"{self.address}: send failed: {e}"))
            raise NodeUnavailable(f"{self.address}: send failed: {e}") from None
        return pending.future

    def wait(self, future: Future, deadline: float | None = None) -> p.Response:
        """The response of `future`, reading the socket ourselves if nobody else is."""
        end = time.monotonic() + self.timeout_s if deadline is None else deadline
        wake = threading.Event()
        future.add_done_callback(lambda _: wake.set())
        lead = False
        while True:
            with self._lock:
                if future.done() or self._closed:
                    break
                if not self._reading:
                    self._reading = lead = True
                    break
                self._followers.append(wake)
            left = end - time.monotonic()
            woken = left > 0 and wake.wait(left)
            with self._lock:
                # Woken by our own answer we are still listed: a stale entry there
                # would swallow the next hand-over of the reader role.
                if wake in self._followers:
                    self._followers.remove(wake)
                wake.clear()
            if not woken:
                break
        if lead:
            try:
                self._read_until(future, end)
            finally:
                with self._lock:
                    self._reading = False
        # Whoever leaves while nobody reads hands the role on (a woken successor may
        # find its own answer already there and leave too).
        with self._lock:
            successor = self._followers.pop(0) if (self._followers and not self._reading) \
                else None
        if successor is not None:
            successor.set()
        if not future.done():
            error = NodeUnavailable(f"{self.address}: no answer within {self.timeout_s}s")
            self._fail(error)
            raise error
        return future.result()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._fail(NodeUnavailable(f"{self.address}: connection closed"))

    def _fail(self, error: Exception) -> None:
        """Close the connection and fail every request still in flight."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._error = error
            pending, self._pending = self._pending, {}
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for entry in pending.values():
            if not entry.future.done():
                entry.future.set_exception(error)
        with self._lock:
            followers, self._followers = self._followers, []
        for wake in followers:
            wake.set()

    # ---- the reader ------------------------------------------------------------------

    def _read_until(self, future: Future, end: float) -> None:
        """Decode responses, completing whichever they answer, until `future` is done or
        `end` passes. Called by the one waiter that holds the reader role."""
        dec = self._decoder
        try:
            while not future.done():
                ev = dec.next_event()
                if ev is None:
                    left = end - time.monotonic()
                    if left <= 0:
                        return
                    self.sock.settimeout(left)
                    data = self.sock.recv(min(max(dec.needed, 1), RECV_CHUNK))
                    if not data:
                        raise ConnectionError("the node closed the connection")
                    dec.feed(data)
                    continue
                if isinstance(ev, p.ItemTable):
                    self._current = self._start_payloads(ev)
                elif isinstance(ev, p.PayloadStart):
                    assert self._current is not None
                    dec.read_payload_into(self._current.dests[ev.index], self.sock.recv_into)
                elif isinstance(ev, p.FrameEnd):
                    assert self._current is not None
                    self._finish_get(ev.header.request_id, self._current)
                    self._current = None
                else:
                    self._complete(ev.request_id, ev)
        except TimeoutError:
            return  # the caller reports it (and closes the connection)
        except (OSError, ConnectionError, ProtocolError) as e:
            self._fail(NodeUnavailable(f"{self.address}: {e}"))

    def _start_payloads(self, table: p.ItemTable) -> _Pending:
        rid = table.header.request_id
        with self._lock:
            entry = self._pending.get(rid)
        if entry is None:  # a response nobody waits for (timed out): drain it
            entry = _Pending(Future())
        entry.items = table.items
        entry.dests = []
        for i, item in enumerate(table.items):
            dest: Any = None
            if item.status == p.Status.OK:
                out = entry.outs[i] if entry.outs is not None else None
                if out is not None and memoryview(out).nbytes >= item.length:
                    dest = memoryview(out).cast("B")[: item.length]
                else:
                    if out is not None:
                        entry.too_small.append(i)
                    dest = bytearray(item.length)
            entry.dests.append(dest)
        return entry

    def _finish_get(self, rid: int, entry: _Pending) -> None:
        dec_items = entry.items
        items = tuple(
            p.GetItem(it.block_id, it.status, entry.dests[i] if it.status == p.Status.OK else None)
            for i, it in enumerate(dec_items)
        )
        if entry.too_small:
            i = entry.too_small[0]
            self._complete(rid, BlockTooLarge(
                f"block {i} of the batch is {dec_items[i].length} B, its out buffer is smaller"))
            return
        self._complete(rid, p.GetResponse(rid, items))

    def _complete(self, rid: int, result: Any) -> None:
        with self._lock:
            entry = self._pending.pop(rid, None)
        if entry is None:
            return
        if isinstance(result, Exception):
            entry.future.set_exception(result)
        else:
            entry.future.set_result(result)  # its done-callback wakes its waiter

    # ---- Transport -------------------------------------------------------------------

    def _chunks(self, n: int) -> list[range]:
        step = self.limits.max_items
        return [range(i, min(i + step, n)) for i in range(0, n, step)]

    def put_many_async(self, items: Sequence[tuple[bytes, Any]]) -> list[tuple[range, Future]]:
        out = []
        for chunk in self._put_chunks(items):
            batch = [items[i] for i in chunk]
            out.append((chunk, self.submit(lambda rid, b=batch: p.PutRequest(rid, tuple(b)))))
        return out

    def _put_chunks(self, items: Sequence[tuple[bytes, Any]]) -> list[range]:
        """Split a put batch so that each frame respects max_items and max_body."""
        chunks, start, body = [], 0, 0
        for i, (_, payload) in enumerate(items):
            n = memoryview(payload).nbytes
            if n > self.limits.max_block:
                raise BlockTooLarge(f"block of {n} B exceeds the node's limit of "
                                    f"{self.limits.max_block} B")
            size = p.ITEM.size + n
            if i > start and (i - start >= self.limits.max_items or body + size > self.limits.max_body):
                chunks.append(range(start, i))
                start, body = i, 0
            body += size
        if start < len(items):
            chunks.append(range(start, len(items)))
        return chunks

    def put_many(self, items: Sequence[tuple[bytes, Any]]) -> list[p.Status]:
        statuses: list[p.Status] = [p.Status.SERVER_ERROR] * len(items)
        deadline = time.monotonic() + self.timeout_s
        for chunk, fut in self.put_many_async(items):
            resp = _check(self.wait(fut, deadline), p.PutResponse)
            for i, s in zip(chunk, resp.statuses):
                statuses[i] = s
        return statuses

    def get_many_async(self, ids: Sequence[bytes],
                       outs: Sequence[Any] | None = None) -> list[tuple[range, Future]]:
        out = []
        for chunk in self._chunks(len(ids)):
            batch = tuple(ids[i] for i in chunk)
            chunk_outs = [outs[i] for i in chunk] if outs is not None else None
            out.append((chunk, self.submit(lambda rid, b=batch: p.GetRequest(rid, b), chunk_outs)))
        return out

    def get_many(self, ids: Sequence[bytes],
                 outs: Sequence[Any] | None = None) -> list[bytes | memoryview | None]:
        results: list[Any] = [None] * len(ids)
        todo = list(range(len(ids)))
        deadline = time.monotonic() + self.timeout_s
        while todo:
            sub_ids = [ids[i] for i in todo]
            sub_outs = [outs[i] for i in todo] if outs is not None else None
            retry = []
            for chunk, fut in self.get_many_async(sub_ids, sub_outs):
                resp = _check(self.wait(fut, deadline), p.GetResponse)
                for k, item in zip(chunk, resp.items):
                    if item.status == p.Status.OK:
                        results[todo[k]] = item.payload
                    elif item.status == p.Status.BUSY:
                        retry.append(todo[k])  # did not fit in the response frame
            if len(retry) == len(todo):
                raise RemoteError(f"{self.address}: the node cannot return these blocks")
            todo = retry
        return [bytes(r) if isinstance(r, bytearray) else r for r in results]

    def _ids_call(self, ids: Sequence[bytes], cls: type, expected: type) -> list[Any]:
        out: list[Any] = []
        deadline = time.monotonic() + self.timeout_s
        futures = [self.submit(lambda rid, b=tuple(ids[i] for i in chunk): cls(rid, b))
                   for chunk in self._chunks(len(ids))]
        for fut in futures:
            out.extend(_check(self.wait(fut, deadline), expected).bits)
        return out

    def exists_many(self, ids: Sequence[bytes]) -> list[bool]:
        return self._ids_call(ids, p.ExistsRequest, p.ExistsResponse)

    def delete_many(self, ids: Sequence[bytes]) -> list[bool]:
        return self._ids_call(ids, p.DeleteRequest, p.DeleteResponse)

    def lookup_prefix(self, ids: Sequence[bytes]) -> int:
        total = 0
        for chunk in self._chunks(len(ids)):
            batch = tuple(ids[i] for i in chunk)
            resp = _check(self.wait(self.submit(lambda rid: p.LookupPrefixRequest(rid, batch))),
                          p.LookupPrefixResponse)
            total += resp.count
            if resp.count < len(batch):
                break
        return total

    def ping(self) -> float:
        started = time.perf_counter()
        _check(self.wait(self.submit(p.PingRequest)), p.PingResponse)
        return time.perf_counter() - started
