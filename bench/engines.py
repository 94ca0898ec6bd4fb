"""IO engines of wqs-bench: where the blocks go (fio's ``ioengine``).

Every engine stores blocks of bytes under 16-byte IDs and is called from many threads
at once. ``get`` receives each block into the caller's buffer and returns its length
(None for a miss), so every engine pays for moving the bytes into a caller's memory.

Asynchronous engines (``asynchronous = True``: wqs, rawsock, null) also start calls
without waiting for them, as fio's libaio engine queues IOs: ``start_put`` /
``start_get`` send a call and return a handle, ``wait_any(handles)`` drives the IO until
at least one of them is complete (``done``), and ``finish_put`` / ``finish_get`` give its
results (and, per failed item, why). One job thread keeps ``iodepth`` blocks in flight
that way (`bench.runner`). redis and files have no such interface and are driven by a
thread per call in flight.

* ``wqs``: a WQS cluster through the SDK (`wqs.Client`): put_many / get_many(outs=) /
  exists_many / lookup_prefix. The default.
* ``redis``: a Redis server through redis-py (SET/GET/EXISTS, a pool with a connection
  per worker thread), the value under the ID's 16 raw bytes.
* ``files``: one file per block under a directory (``<dir>/ab/cd/<hex id>``), written
  with open/write/close and read with open/readinto: what a KV-cache tier without a
  native engine does. ``files_direct`` opens them with O_DIRECT (aligned bounce buffers)
  so reads go to the disk instead of the page cache.
* ``rawsock``: the transport ceiling: a minimal sender/receiver (`bench.rawsock`) moving
  the same bytes over one TCP connection per worker thread, nothing stored.
* ``null``: does nothing (fio's null engine); measures wqs-bench itself. Asynchronous,
  like fio's: every call it starts is complete at once.

An engine with a server process says so (``has_server``) and lists where that server's
CPU and context switches can be read (``server_usage``, `bench.usage`): a WQS engine asks
every daemon's control plane; for redis and rawsock only whoever started the server
(``bench.compare``) knows its pid and fills it in.
"""

from __future__ import annotations

import mmap
import os
import threading
from typing import Any, Sequence

from .usage import UsageSource

Buffer = Any


class EngineError(RuntimeError):
    pass


class Engine:
    name = "?"
    stores = True  # False: a read of an absent block still "hits" (null, rawsock)
    has_server = False  # True: a server process does the work (its CPU is reported)
    server_usage: Sequence[UsageSource] = ()
    # True: start_put/start_get/done/wait_any/finish_put/finish_get below, so that one
    # thread keeps many calls in flight (fio's libaio); False: one call per thread.
    asynchronous = False

    def put(self, ids: Sequence[bytes], bufs: Sequence[Buffer]) -> list[bool]:
        raise NotImplementedError

    def get(self, ids: Sequence[bytes], outs: Sequence[Buffer]) -> list[int | None]:
        raise NotImplementedError

    def exists(self, ids: Sequence[bytes]) -> list[bool]:
        raise NotImplementedError

    def lookup_prefix(self, ids: Sequence[bytes]) -> int:
        found = self.exists(ids)
        return next((i for i, hit in enumerate(found) if not hit), len(ids))

    def delete(self, ids: Sequence[bytes]) -> None:
        pass

    def buffer(self, size: int) -> memoryview:
        """A buffer of size bytes for blocks to be written from or read into (an engine
        that moves bytes best from memory of its own hands that out)."""
        return memoryview(bytearray(size))

    # ---- asynchronous engines only --------------------------------------------------

    def start_put(self, ids: Sequence[bytes], bufs: Sequence[Buffer]) -> Any:
        """Send a put of these blocks without waiting; a handle for the calls below.
        The buffers must stay unchanged until the call is complete."""
        raise NotImplementedError

    def start_get(self, ids: Sequence[bytes], outs: Sequence[Buffer]) -> Any:
        """Send a get of these blocks into outs without waiting; a handle."""
        raise NotImplementedError

    def done(self, handle: Any) -> bool:
        raise NotImplementedError

    def wait_any(self, handles: Sequence[Any]) -> None:
        """Drive the IO until at least one of handles is complete."""
        raise NotImplementedError

    def finish_put(self, handle: Any) -> tuple[list[bool], dict[int, str]]:
        """A complete put's result per block, and why each failed block failed."""
        raise NotImplementedError

    def finish_get(self, handle: Any) -> tuple[list[int | None], dict[int, str]]:
        """A complete get's length per block (None: a miss), and why each failed block
        failed (a plain miss is not a failure)."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    def close(self) -> None:
        for u in self.server_usage:
            u.close()


class WqsEngine(Engine):
    name = "wqs"
    has_server = True
    asynchronous = True

    def __init__(self, servers: Sequence[str] | None = None, config: str | None = None,
                 connections: int | None = None,
                 control_servers: Sequence[str] | None = None,
                 transport: str | None = None, own_buffers: bool = False) -> None:
        import wqs
        from wqs.config import load_client_config

        if config:
            overrides = {"servers": list(servers)} if servers else {}
            cfg = load_client_config(config, overrides)
        else:
            if not servers:
                raise EngineError("ioengine=wqs needs --servers=HOST:PORT[,HOST:PORT...] "
                                  "or --config=client.yaml")
            cfg = load_client_config(None, {"servers": list(servers)})
        if connections:
            cfg.connections_per_node = connections
        if transport:
            cfg.transport = transport
        self.client = wqs.Client(config=cfg)
        self.servers = list(cfg.servers)
        down = [n for n, rtt in self.client.ping().items() if rtt is None]
        if down:
            self.client.close()
            raise EngineError(f"cannot reach WQS node(s) {', '.join(down)}")
        try:
            self.server_usage = self._control_planes(cfg, control_servers)
        except ValueError as e:
            self.client.close()
            raise EngineError(str(e)) from None
        # Nodes on this host take blocks through shared memory: the job's buffers are
        # slots of it, as an inference engine's KV cache would be; with own_buffers they
        # are the job's own memory, as LMCache's and vLLM's are (the SDK's bounce memory).
        self.shared = any(self.client.transport(a) == "shm" for a in self.client.nodes)
        self.own_buffers = own_buffers
        self._arena: list[memoryview] = []

    def buffer(self, size: int) -> memoryview:
        if not self.shared or self.own_buffers:
            return super().buffer(size)
        if not self._arena or len(self._arena[-1]) != size:
            from wqs.rpc.shm import slot_size

            per = max(1, (64 << 20) // slot_size(size))
            self._arena = self.client.shared_memory(per * slot_size(size)).block_views(size)
        return self._arena.pop()

    def _control_planes(self, cfg: Any, control_servers: Sequence[str] | None) -> list:
        """A usage source per daemon: its control plane at the given address, else at
        data port + 1 (wqsd's default), with the client config's token and timeout."""
        from .usage import ControlPlaneUsage, control_address

        # Under etcd the config lists no servers; the ring knows the registered ones.
        servers = list(self.servers) or list(getattr(self.client, "nodes", ()))
        if control_servers:
            if len(control_servers) != len(servers):
                raise ValueError(f"control_servers lists {len(control_servers)} addresses "
                                 f"for {len(servers)} servers; give one per server, in order")
            controls = list(control_servers)
        else:
            controls = [control_address(s) for s in servers]
        return [ControlPlaneUsage(s, c, cfg.auth_token, cfg.timeout_s)
                for s, c in zip(servers, controls)]

    def put(self, ids, bufs):
        return self.client.put_many(list(zip(ids, bufs)))

    def get(self, ids, outs):
        res = self.client.get_many(ids, outs=outs)
        return [None if r is None else len(r) for r in res]

    def exists(self, ids):
        return self.client.exists_many(ids)

    def lookup_prefix(self, ids):
        return self.client.lookup_prefix(ids)

    def delete(self, ids):
        self.client.delete_many(ids)

    def start_put(self, ids, bufs):
        return self.client.start_put_many(zip(ids, bufs))

    def start_get(self, ids, outs):
        return self.client.start_get_many(ids, outs)

    def done(self, handle):
        return handle.done

    def wait_any(self, handles):
        # No timeout_s: the SDK fails the calls still in flight when the wait's own
        # timeout passes (as at their deadline), so a short poll would cost them. Each
        # call is still bounded by the client's timeout_s.
        self.client.wait_any(handles)

    def finish_put(self, handle):
        res = handle.result()
        return list(res), _reasons(res.errors)

    def finish_get(self, handle):
        res = handle.result()
        return [None if r is None else len(r) for r in res], _reasons(res.errors)

    def describe(self) -> str:
        how = "tcp" if not self.shared else (
            "shared memory, own buffers through bounce memory" if self.own_buffers
            else "shared memory")
        return f"wqs ({','.join(self.servers)}, {how})"

    def close(self):
        super().close()
        self.client.close()


class RedisEngine(Engine):
    name = "redis"
    has_server = True

    def __init__(self, address: str, connections: int = 64) -> None:
        try:
            import redis
        except ImportError:
            raise EngineError("ioengine=redis needs the redis package "
                              "(pip install redis)") from None
        host, _, port = address.rpartition(":")
        self.address = address
        self.pool = redis.BlockingConnectionPool(host=host or "127.0.0.1", port=int(port),
                                                 max_connections=connections, timeout=30)
        self.r = redis.Redis(connection_pool=self.pool)
        try:
            self.r.ping()
        except redis.RedisError as e:
            raise EngineError(f"cannot reach redis at {address}: {e}") from None

    def put(self, ids, bufs):
        if len(ids) == 1:
            return [bool(self.r.set(ids[0], memoryview(bufs[0]).cast("B")))]
        pipe = self.r.pipeline(transaction=False)
        for bid, buf in zip(ids, bufs):
            pipe.set(bid, memoryview(buf).cast("B"))
        return [bool(x) for x in pipe.execute()]

    def get(self, ids, outs):
        if len(ids) == 1:
            values = [self.r.get(ids[0])]
        else:  # a pipeline of GETs, as a KV-cache tier on Redis batches them
            pipe = self.r.pipeline(transaction=False)
            for bid in ids:
                pipe.get(bid)
            values = pipe.execute()
        out: list[int | None] = []
        for value, dest in zip(values, outs):
            if value is None:
                out.append(None)
                continue
            n = len(value)
            memoryview(dest).cast("B")[:n] = value
            out.append(n)
        return out

    def exists(self, ids):
        pipe = self.r.pipeline(transaction=False)
        for bid in ids:
            pipe.exists(bid)
        return [bool(x) for x in pipe.execute()]

    def delete(self, ids):
        if ids:
            self.r.delete(*ids)

    def describe(self) -> str:
        return f"redis ({self.address})"

    def close(self):
        super().close()
        self.pool.disconnect()


ALIGN = 4096


class FilesEngine(Engine):
    """A file per block: the filesystem does the allocation, the index and the caching."""

    name = "files"

    def __init__(self, root: str, direct: bool = False) -> None:
        self.root = root
        self.direct = direct
        os.makedirs(root, exist_ok=True)
        self._made: set[str] = set()
        self._local = threading.local()
        if direct and not hasattr(os, "O_DIRECT"):
            raise EngineError("files_direct needs O_DIRECT")

    def _path(self, bid: bytes) -> str:
        h = bid.hex()
        d = os.path.join(self.root, h[:2], h[2:4])
        if d not in self._made:
            os.makedirs(d, exist_ok=True)
            self._made.add(d)
        return os.path.join(d, h)

    def _bounce(self, n: int) -> mmap.mmap:
        """A page-aligned buffer for O_DIRECT, one per thread, grown as needed."""
        buf = getattr(self._local, "buf", None)
        size = (n + ALIGN - 1) // ALIGN * ALIGN
        if buf is None or len(buf) < size:
            buf = mmap.mmap(-1, max(size, ALIGN))
            self._local.buf = buf
        return buf

    def put(self, ids, bufs):
        ok = []
        for bid, data in zip(ids, bufs):
            path = self._path(bid)
            view = memoryview(data).cast("B")
            try:
                if self.direct:
                    n = view.nbytes
                    padded = (n + ALIGN - 1) // ALIGN * ALIGN
                    bounce = self._bounce(padded)
                    bounce[:n] = view
                    if padded > n:
                        bounce[n:padded] = bytes(padded - n)
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
                    try:
                        os.write(fd, memoryview(bounce)[:padded])
                        if padded != n:
                            os.ftruncate(fd, n)
                    finally:
                        os.close(fd)
                else:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    try:
                        while view.nbytes:
                            view = view[os.write(fd, view):]
                    finally:
                        os.close(fd)
                ok.append(True)
            except OSError:
                ok.append(False)
        return ok

    def get(self, ids, outs):
        res: list[int | None] = []
        for bid, out in zip(ids, outs):
            try:
                fd = os.open(self._path(bid), os.O_RDONLY | (os.O_DIRECT if self.direct else 0))
            except FileNotFoundError:
                res.append(None)
                continue
            try:
                dest = memoryview(out).cast("B")
                if self.direct:
                    size = os.fstat(fd).st_size
                    bounce = self._bounce(size)
                    padded = (size + ALIGN - 1) // ALIGN * ALIGN
                    got = os.readv(fd, [memoryview(bounce)[:padded]])
                    got = min(got, size)
                    dest[:got] = memoryview(bounce)[:got]
                else:
                    got = os.readv(fd, [dest])
                res.append(got)
            finally:
                os.close(fd)
        return res

    def exists(self, ids):
        return [os.path.exists(self._path(b)) for b in ids]

    def delete(self, ids):
        for b in ids:
            try:
                os.unlink(self._path(b))
            except FileNotFoundError:
                pass

    def describe(self) -> str:
        return f"files ({self.root}{', O_DIRECT' if self.direct else ', page cache'})"


def _reasons(errors: dict[int, Any]) -> dict[int, str]:
    return {i: f"{type(e).__name__}: {e}" for i, e in errors.items()}


class _Complete:
    """A call that was complete when it was started (the null engine's)."""

    __slots__ = ("values",)
    done = True

    def __init__(self, values: list) -> None:
        self.values = values


class NullEngine(Engine):
    name = "null"
    stores = False
    asynchronous = True

    def put(self, ids, bufs):
        return [True] * len(ids)

    def get(self, ids, outs):
        return [memoryview(o).nbytes for o in outs]

    def start_put(self, ids, bufs):
        return _Complete([True] * len(ids))

    def start_get(self, ids, outs):
        return _Complete([memoryview(o).nbytes for o in outs])

    def done(self, handle):
        return True

    def wait_any(self, handles):
        pass

    def finish_put(self, handle):
        return handle.values, {}

    def finish_get(self, handle):
        return handle.values, {}

    def exists(self, ids):
        return [True] * len(ids)

    def lookup_prefix(self, ids):
        return 0


def make_engine(name: str, *, servers: Sequence[str] | None = None, config: str | None = None,
                redis: str | None = None, files_dir: str | None = None,
                files_direct: bool = False, rawsock: str | None = None,
                threads: int = 1, control_servers: Sequence[str] | None = None) -> Engine:
    if name == "wqs":
        return WqsEngine(servers, config, control_servers=control_servers)
    if name == "redis":
        if not redis:
            raise EngineError("ioengine=redis needs --redis=HOST:PORT")
        return RedisEngine(redis, connections=max(8, threads))
    if name == "files":
        if not files_dir:
            raise EngineError("ioengine=files needs --files_dir=DIR")
        return FilesEngine(files_dir, files_direct)
    if name == "rawsock":
        from .rawsock import RawSockEngine

        if not rawsock:
            raise EngineError("ioengine=rawsock needs --rawsock=HOST:PORT (python -m bench.rawsock)")
        return RawSockEngine(rawsock)
    if name == "null":
        return NullEngine()
    raise EngineError(f"unknown ioengine {name!r}")
