"""The transport ceiling: a minimal sender/receiver moving blocks over TCP, nothing stored.

    python -m bench.rawsock --listen 127.0.0.1:0      # prints "listening HOST:PORT"

The same request shapes as a KV store's, with nothing behind them: a PUT sends a
24-byte header and the block and waits for a 1-byte answer; a GET sends the header and
receives a 4-byte length and that many bytes. The server receives PUT payloads into
one reused buffer per connection and answers GETs from one preallocated buffer, so what
is measured is the loopback TCP path and the Python socket calls on both ends: the
honest denominator for a store's transport. The client (`RawSockEngine`) receives GETs
straight into the caller's buffer. Called synchronously it uses one connection per
worker thread; as an asynchronous engine (one wqs-bench job thread keeping iodepth
blocks in flight, as for WQS) every call in flight has a connection of its own: the
thread sends a call's requests on an idle connection (a blocking send), and reads the
answers of all its calls as they arrive (epoll, non-blocking receives).

Header: ``u8 op ('P', 'G', 'E'), 3 pad, u32le length, 16-byte block id``.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import struct
import sys
import threading
from typing import Sequence

from .engines import Engine, EngineError

HDR = struct.Struct("<B3xI16s")
LEN = struct.Struct("<I")
OP_PUT, OP_GET, OP_EXISTS = ord("P"), ord("G"), ord("E")
MAX_BLOCK = 256 << 20
ANSWER_TIMEOUT_S = 30.0  # an asynchronous wait that hears nothing for this long fails


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    while view.nbytes:
        n = sock.recv_into(view)
        if n == 0:
            raise ConnectionError("peer closed")
        view = view[n:]


def _send_all(sock: socket.socket, bufs: list) -> None:
    """sendmsg until every buffer is out (a blocking sendmsg may still send part)."""
    views = [memoryview(b).cast("B") for b in bufs]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= views[0].nbytes:
            sent -= views[0].nbytes
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]


# --------------------------------------------------------------------------- server


def _serve_conn(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    hdr = bytearray(HDR.size)
    hview = memoryview(hdr)
    sink = bytearray(1 << 20)
    source = bytes(1 << 20)
    ok = b"\x01"
    try:
        while True:
            _recv_exact(conn, hview)
            op, length, _ = HDR.unpack(hdr)
            if length > MAX_BLOCK:
                return
            if op == OP_PUT:
                if len(sink) < length:
                    sink = bytearray(length)
                _recv_exact(conn, memoryview(sink)[:length])
                conn.sendall(ok)
            elif op == OP_GET:
                if len(source) < length:
                    source = bytes(length)
                _send_all(conn, [LEN.pack(length), memoryview(source)[:length]])
            elif op == OP_EXISTS:
                conn.sendall(ok)
            else:
                return
    except (ConnectionError, OSError):
        pass
    finally:
        conn.close()


def serve(host: str, port: int, ready: threading.Event | None = None,
          bound: list | None = None) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(256)
    if bound is not None:
        bound.append(srv.getsockname())
    print(f"listening {srv.getsockname()[0]}:{srv.getsockname()[1]}", flush=True)
    if ready is not None:
        ready.set()
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_serve_conn, args=(conn,), daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {__package__ or 'bench'}.rawsock", description=__doc__.split("\n")[0])
    ap.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any free port)")
    args = ap.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    try:
        serve(host or "127.0.0.1", int(port))
    except KeyboardInterrupt:
        pass
    return 0


# --------------------------------------------------------------------------- client


class _Call:
    """A call in flight on one connection: its answers, read as they arrive."""

    __slots__ = ("conn", "get", "outs", "count", "got", "results", "view", "need_len",
                 "done", "error")

    def __init__(self, conn: "_AsyncConn", get: bool, outs: list[memoryview] | None,
                 count: int) -> None:
        self.conn = conn
        self.get = get
        self.outs = outs
        self.count = count  # answers expected
        self.got = 0  # answers complete
        self.results: list = []
        self.view: memoryview | None = None  # where the bytes being received go
        self.need_len = True  # GET: the 4-byte length comes next
        self.done = False
        self.error: str | None = None


class _AsyncConn:
    """A connection used by one call at a time; blocking sends, non-blocking receives."""

    def __init__(self, addr: tuple[str, int]) -> None:
        self.sock = socket.create_connection(addr, timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(None)  # sends block; receives pass MSG_DONTWAIT
        self.fd = self.sock.fileno()
        self.small = bytearray(4)
        self.call: _Call | None = None

    def receive(self) -> None:
        """Take what has arrived for the current call (the driver saw it readable)."""
        call = self.call
        if call is None:
            return
        small = memoryview(self.small)
        while not call.done:
            if call.view is None:  # the next answer starts
                call.view = small[:4] if call.get else small[:1]
                call.need_len = call.get
            try:
                n = self.sock.recv_into(call.view, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            if n == 0:
                raise ConnectionError("the sink closed the connection")
            call.view = call.view[n:]
            if call.view.nbytes:
                continue
            if call.get and call.need_len:
                length = LEN.unpack(self.small)[0]
                call.need_len = False
                out = call.outs[call.got]
                call.results.append(length)
                if length:
                    call.view = out[:length]
                    continue
            elif not call.get:
                call.results.append(True)
            call.view = None
            call.got += 1
            if call.got == call.count:
                call.done = True


class RawSockEngine(Engine):
    name = "rawsock"
    stores = False
    has_server = True
    asynchronous = True

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self.addr = (host or "127.0.0.1", int(port))
        self.address = address
        self._local = threading.local()
        self._all: list[socket.socket] = []
        self._epolls: list[select.epoll] = []  # the async drivers', one per thread
        self._lock = threading.Lock()
        try:
            self._sock()
        except OSError as e:
            raise EngineError(f"cannot reach the raw-socket sink at {address}: {e}") from None

    def _sock(self) -> socket.socket:
        s = getattr(self._local, "sock", None)
        if s is None:
            s = socket.create_connection(self.addr, timeout=30)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._local.sock = s
            self._local.small = bytearray(4)
            with self._lock:
                self._all.append(s)
        return s

    def put(self, ids, bufs):
        s = self._sock()
        small = memoryview(self._local.small)
        for bid, buf in zip(ids, bufs):
            view = memoryview(buf).cast("B")
            _send_all(s, [HDR.pack(OP_PUT, view.nbytes, bid), view])
            _recv_exact(s, small[:1])
        return [True] * len(ids)

    def get(self, ids, outs):
        s = self._sock()
        small = memoryview(self._local.small)
        res = []
        for bid, out in zip(ids, outs):
            dest = memoryview(out).cast("B")
            s.sendall(HDR.pack(OP_GET, dest.nbytes, bid))
            _recv_exact(s, small)
            n = LEN.unpack(small)[0]
            _recv_exact(s, dest[:n])
            res.append(n)
        return res

    def exists(self, ids):
        return [True] * len(ids)

    def lookup_prefix(self, ids):
        return 0

    # ---- asynchronous: a connection per call in flight, driven by the caller --------

    def _idle_conn(self) -> _AsyncConn:
        """An idle connection of this thread's (each thread drives its own)."""
        local = self._local
        idle = getattr(local, "idle", None)
        if idle is None:
            idle = local.idle = []
            local.epoll = select.epoll()
            local.by_fd = {}
            with self._lock:
                self._epolls.append(local.epoll)
        if idle:
            return idle.pop()
        conn = _AsyncConn(self.addr)
        with self._lock:
            self._all.append(conn.sock)
        local.by_fd[conn.fd] = conn
        local.epoll.register(conn.fd, select.EPOLLIN)
        return conn

    def start_put(self, ids, bufs):
        conn = self._idle_conn()
        call = conn.call = _Call(conn, False, None, len(ids))
        frames: list = []
        for bid, buf in zip(ids, bufs):
            view = memoryview(buf).cast("B")
            frames += [HDR.pack(OP_PUT, view.nbytes, bid), view]
        _send_all(conn.sock, frames)
        return call

    def start_get(self, ids, outs):
        conn = self._idle_conn()
        views = [memoryview(o).cast("B") for o in outs]
        call = conn.call = _Call(conn, True, views, len(ids))
        conn.sock.sendall(b"".join(HDR.pack(OP_GET, v.nbytes, bid) for bid, v in zip(ids, views)))
        return call

    def done(self, handle):
        return handle.done

    def wait_any(self, handles):
        local = self._local
        while not any(h.done for h in handles):
            events = local.epoll.poll(ANSWER_TIMEOUT_S)
            if not events:
                raise EngineError(f"rawsock {self.address}: no answer within "
                                  f"{ANSWER_TIMEOUT_S:.0f} s")
            for fd, _ in events:
                try:
                    local.by_fd[fd].receive()
                except (ConnectionError, OSError) as e:
                    raise EngineError(f"rawsock {self.address}: {e}") from None

    def _finish(self, handle: _Call) -> list:
        conn = handle.conn
        conn.call = None
        self._local.idle.append(conn)
        return handle.results

    def finish_put(self, handle):
        return self._finish(handle), {}

    def finish_get(self, handle):
        return self._finish(handle), {}

    def describe(self) -> str:
        return f"rawsock ({self.address})"

    def close(self):
        super().close()
        with self._lock:
            for s in self._all:
                try:
                    s.close()
                except OSError:
                    pass
            self._all.clear()
            for ep in self._epolls:
                ep.close()
            self._epolls.clear()


if __name__ == "__main__":
    sys.exit(main())
