"""A shard: one event loop serving one engine core on one listening socket.

Everything a shard serves is owned by the thread running its loop: the engine core, the
connections, the budget. Nothing on the request path is handed between threads. Other
threads (the control plane, a test) reach it only through `call`, which runs a function
in the loop and hands back a Future (Seastar's invoke_on).

The shard flushes at the end of every turn, after the engine's own flush: every answer
queued during the turn leaves in one sendmsg per connection.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

from wqs.engine.core import EngineCore
from wqs.loop.reactor import Reactor
from wqs.metrics import RequestRecorder
from wqs.ring import shard_of
from wqs.rpc import protocol as p
from wqs.server.connection import Connection

log = logging.getLogger("wqs.server")

ACCEPT_BATCH = 64  # connections accepted per readiness of the listening socket
CHECK_INTERVAL_S = 1.0  # how often stalled connections are looked for
DRAIN_POLL_S = 0.01


@dataclass
class ShardOptions:
    host: str = "127.0.0.1"
    port: int = 7070
    auth_token: str | None = None
    max_connections: int = 1024
    # Payload bytes staged for PUTs and held for unsent GET answers: per connection,
    # and for the whole shard. Past either, connections stop reading until half is free.
    max_connection_bytes: int = 64 << 20
    max_inflight_bytes: int = 512 << 20
    # A peer silent this long in the middle of a frame is disconnected: a stalled PUT
    # would otherwise hold its share of the budget for ever.
    frame_timeout_s: float = 30.0
    idle_timeout_s: float | None = None  # close connections silent between frames


class Budget:
    """Bytes held by all connections of a shard, with hysteresis: over the limit,
    connections wait; they resume once usage falls to half of it."""

    def __init__(self, limit: int, loop: Reactor) -> None:
        assert limit > 0
        self.limit = limit
        self.used = 0
        self._loop = loop
        self._waiting: list[Connection] = []

    def over(self) -> bool:
        return self.used > self.limit

    def room(self) -> int:
        return max(0, self.limit - self.used)

    def room_for(self, n: int) -> bool:
        return self.used == 0 or self.used + n <= self.limit

    def take(self, n: int) -> None:
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n
        assert self.used >= 0, "budget released twice"
        if self._waiting and self.used <= self.limit // 2:
            waiting, self._waiting = self._waiting, []
            for conn in waiting:
                self._loop.call_soon(conn._maybe_resume)

    def wait(self, conn: Connection) -> None:
        if conn not in self._waiting:
            self._waiting.append(conn)


class Shard:
    """Serves `core` on (options.host, options.port) until stop()."""

    def __init__(self, core: EngineCore, loop: Reactor, options: ShardOptions, *,
                 index: int = 0, count: int = 1, sock: socket.socket | None = None,
                 accepting: bool = True, local_sock: socket.socket | None = None,
                 instance: bytes = b"", nic: Any = None, rdma_note: str = "off") -> None:
        self.core = core
        self.loop = loop
        self.options = options
        self.index = index
        self.count = count
        self.limits = p.Limits(
            max_block=core.max_block_size,
            # One frame fits the connection's budget (or is one largest block).
            max_body=max(min(p.MAX_BODY, options.max_connection_bytes),
                         core.max_block_size + p.MAX_ITEMS * p.ITEM.size))
        self.budget = Budget(options.max_inflight_bytes, loop)
        self.recorder = RequestRecorder()
        self.connections: set[Connection] = set()
        self.dirty: list[Connection] = []
        self.draining = False
        self.stopped = False
        if sock is None:
            sock = socket.create_server((options.host, options.port), backlog=512)
        sock.setblocking(False)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self.ports = (self.port,) if count == 1 else ()
        # Same-host clients: this shard's Unix socket, and what HELLO announces of them.
        self._local = local_sock
        if local_sock is not None:
            local_sock.setblocking(False)
        self.instance = instance or os.urandom(16)
        # The RDMA device RDMA_CONNECT sets links up on (None: not served, and why).
        self.nic = nic
        self.rdma_note = rdma_note
        self.local_paths: tuple[str, ...] = (local_sock.getsockname(),) \
            if local_sock is not None and count == 1 else ()
        if accepting:
            self.start_accepting()
        loop.on_turn_end(self._flush)
        self._check_timer = loop.call_later(CHECK_INTERVAL_S, self._check)

    @property
    def address(self) -> str:
        host = self.options.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def set_ports(self, ports: tuple[int, ...], local_paths: tuple[str, ...] = ()) -> None:
        """Every shard's data port (and Unix socket), as HELLO answers announce them."""
        assert len(ports) == self.count and ports[self.index] == self.port
        assert not local_paths or len(local_paths) == self.count
        self.ports = ports
        self.local_paths = local_paths

    def start_accepting(self) -> None:
        """Take connections (until now they wait in the listen backlog)."""
        if not self.stopped:
            self.loop.add_reader(self._sock.fileno(), lambda: self._accept(self._sock))
            if self._local is not None:
                self.loop.add_reader(self._local.fileno(),
                                     lambda: self._accept(self._local, local=True))

    # ---- connections ----------------------------------------------------------------

    def _accept(self, listener: socket.socket, local: bool = False) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("accept failed: %s", e)
                return
            if self.stopped or len(self.connections) >= self.options.max_connections:
                if not self.stopped:
                    log.warning("refusing %s: max_connections (%d) reached", peer,
                                self.options.max_connections)
                sock.close()
                continue
            conn = Connection(self, sock, peer or "local client", local=local)
            self.connections.add(conn)
            conn.start()

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)

    def _flush(self) -> None:
        dirty, self.dirty = self.dirty, []
        for conn in dirty:
            conn.flush()

    def _check(self) -> None:
        now = time.monotonic()
        for conn in list(self.connections):
            why = conn.stalled(now)
            if why is not None:
                log.info("%s: closing: %s", conn.peer, why)
                conn.close()
        if not self.stopped:
            self._check_timer = self.loop.call_later(CHECK_INTERVAL_S, self._check)

    # ---- what connections ask of the shard -------------------------------------------

    def misrouted(self, ids: list[bytes]) -> str | None:
        """Why a request naming these blocks does not belong here, or None."""
        if self.count == 1:
            return None
        for block_id in ids:
            owner = shard_of(block_id, self.count)
            if owner != self.index:
                return (f"block {block_id.hex()} belongs to shard {owner} of {self.count}, "
                        f"this is shard {self.index}: reconnect and route by the HELLO's "
                        "shard list")
        return None

    def observe(self, op: str, seconds: float) -> None:
        self.recorder.observe(op, seconds)

    def error(self, op: str, status: str) -> None:
        self.recorder.error(op, status)

    @property
    def requests_in_flight(self) -> int:
        """Requests being served; not a PUT still arriving (a client that stalls mid-upload
        must not hold a drain up: stopping drops it, unacknowledged)."""
        return sum(c.pending - (c.put is not None) for c in self.connections)

    # ---- control (in the loop) ------------------------------------------------------

    def drain(self, timeout_s: float, done: Callable[[bool, int], None]) -> None:
        """Answer new requests BUSY; done(drained, remaining) once none is in flight and
        the engine is idle, or when timeout_s has passed."""
        self.draining = True
        deadline = time.monotonic() + timeout_s

        def poll() -> None:
            remaining = self.requests_in_flight
            if remaining == 0 and self.core.idle:
                done(True, 0)
            elif time.monotonic() >= deadline:
                done(False, remaining)
            else:
                self.loop.call_later(DRAIN_POLL_S, poll)

        poll()

    def resume(self) -> None:
        """Undo `drain`: take new requests again (a drain still polling just reports)."""
        self.draining = False

    def evict_all(self, done: Callable[[int], None]) -> None:
        self.core.quiesce(lambda: done(self.core.evict_all()))

    def stop(self, done: Callable[[], None] | None = None) -> None:
        """Close the listener and every connection, let the engine finish what it
        started, write its checkpoint, and stop the loop."""
        if self.stopped:
            return
        self.stopped = True
        self._check_timer.cancel()
        for listener in (self._sock, self._local):
            if listener is not None:
                self.loop.forget(listener.fileno())
                listener.close()
        for conn in list(self.connections):
            conn.close()

        def finish() -> None:
            self.core.close()
            if done is not None:
                done()
            self.loop.stop()

        self.core.quiesce(finish)

    # ---- from other threads -------------------------------------------------------------

    def call(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run fn(*args) in the loop; its result (or exception) through a Future. A fn
        that takes a `done` callback as its last argument answers through it instead
        (pass it via call_async)."""
        future: Future = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                future.set_exception(e)

        self.loop.call_soon_threadsafe(run)
        return future

    def call_async(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run fn(*args, done) in the loop; the Future gets what done() is called with
        (a tuple if several arguments)."""
        future: Future = Future()

        def done(*result: Any) -> None:
            future.set_result(result[0] if len(result) == 1 else result if result else None)

        def run() -> None:
            try:
                fn(*args, done)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                future.set_exception(e)

        self.loop.call_soon_threadsafe(run)
        return future
