"""The supervisor's side of its shard processes: start them, ask them, stop them.

`ShardProcess` forks one shard (wqs/server/worker.py) and keeps the pipe to it: any
thread of the supervisor (gRPC, metrics, the main thread) may `call` an operation; a
reader thread per shard matches answers to callers by id, so a slow operation (a drain)
never holds up a quick one (stats). `NodeView` puts the shards together behind the
interface the control plane and the metrics exporter expect of an engine: stats()
sums the shards' counters, info() describes the node.

Forking: the supervisor forks every shard before it starts any thread of its own (the
reader threads start after the last fork), so no child inherits a lock held by a thread
that does not exist in it.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import socket
import threading
from concurrent.futures import Future
from typing import Any

from wqs.engine import format as fmt
from wqs.engine.stats import EngineStats
from wqs.errors import WQSError
from wqs.procstat import ProcessUsage, self_usage
from wqs.server.worker import ShardSpec, shard_main

log = logging.getLogger("wqs.daemon")

START_TIMEOUT_S = 600.0  # recovery scans the whole partition: a large device takes a while
CALL_TIMEOUT_S = 30.0


class ShardError(WQSError):
    """A shard process failed, or did not answer."""


class ShardProcess:
    def __init__(self, spec: ShardSpec, device: Any, socks: list[socket.socket],
                 local: list[socket.socket]) -> None:
        self.spec = spec
        self.index = spec.index
        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=shard_main, name=f"wqsd-shard-{spec.index}",
                                   args=(spec, device, socks, local, child, os.getpid()))
        self.process.start()
        child.close()
        self.info: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()  # guards _pending and sends
        self._reader: threading.Thread | None = None
        self.dead = threading.Event()  # the process ended or its pipe broke
        self.stopping = False

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Block until the shard has recovered its partition; raise why if it failed."""
        if not self._conn.poll(timeout_s):
            raise ShardError(f"shard {self.index} did not start within {timeout_s:.0f}s")
        try:
            what, detail = self._conn.recv()
        except EOFError:
            self.process.join(5)
            raise ShardError(f"shard {self.index} exited during start-up "
                             f"(code {self.process.exitcode})") from None
        if what != "ready":
            raise ShardError(f"shard {self.index} failed to start: {detail}")
        self.info = detail

    def start_reader(self) -> None:
        self._reader = threading.Thread(target=self._read, name=f"wqs-shard-{self.index}-pipe",
                                        daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                rid, ok, result = self._conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                future = self._pending.pop(rid, None)
            if future is None:
                continue
            if ok:
                future.set_result(result)
            else:
                future.set_exception(ShardError(f"shard {self.index}: {result}"))
        self.dead.set()
        with self._lock:
            pending, self._pending = self._pending, {}
        for future in pending.values():
            future.set_exception(ShardError(f"shard {self.index} is gone"))

    def call_async(self, op: str, *args: Any) -> Future:
        future: Future = Future()
        with self._lock:
            if self.dead.is_set():
                future.set_exception(ShardError(f"shard {self.index} is gone"))
                return future
            rid = next(self._ids)
            self._pending[rid] = future
            try:
                self._conn.send((rid, op, args))
            except OSError as e:
                self._pending.pop(rid, None)
                future.set_exception(ShardError(f"shard {self.index}: {e}"))
        return future

    def call(self, op: str, *args: Any, timeout_s: float = CALL_TIMEOUT_S) -> Any:
        try:
            return self.call_async(op, *args).result(timeout_s)
        except TimeoutError:
            raise ShardError(f"shard {self.index} did not answer {op} within "
                             f"{timeout_s:.0f}s") from None

    def requests_snapshot(self) -> dict:
        return self.call("requests", timeout_s=5.0)

    def join(self, timeout_s: float) -> int | None:
        self.process.join(timeout_s)
        if self.process.is_alive():
            log.error("shard %d did not exit; killing it", self.index)
            self.process.kill()
            self.process.join(5)
        return self.process.exitcode

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


def start_shards(config: Any, device: Any, table: fmt.ShardTable,
                 socks: list[socket.socket], local: list[tuple[str, socket.socket]] = (),
                 instance: bytes = b"") -> list[ShardProcess]:
    """Fork every shard, wait until each has recovered its partition, then start the
    pipe readers. On any failure the shards already started are killed. `local`: each
    shard's Unix socket (path, listener), or none; `instance` names this daemon run."""
    ports = tuple(s.getsockname()[1] for s in socks)
    paths = tuple(path for path, _ in local)
    shards: list[ShardProcess] = []
    try:
        for k, (offset, size) in enumerate(table.partitions):
            spec = ShardSpec(k, len(table.partitions), ports, offset, size, config, paths,
                             instance)
            shards.append(ShardProcess(spec, device, socks, [s for _, s in local]))
        for shard in shards:
            shard.wait_ready()
    except BaseException:
        for shard in shards:
            shard.kill()
        raise
    for shard in shards:
        shard.start_reader()
    return shards


class NodeView:
    """The node's shards, seen as one engine by the control plane and the exporter."""

    def __init__(self, shards: list[ShardProcess], device_path: str, table: fmt.ShardTable,
                 engine_config: Any) -> None:
        self.shards = shards
        self.device_path = device_path
        self.table = table
        self.config = engine_config  # the exporter reads dram_cache_bytes from it

    def _all(self, op: str, *args: Any, timeout_s: float = CALL_TIMEOUT_S) -> list[Any]:
        futures = [s.call_async(op, *args) for s in self.shards]
        try:
            return [f.result(timeout_s) for f in futures]
        except TimeoutError:
            raise ShardError(f"a shard did not answer {op} within {timeout_s:.0f}s") from None

    def stats(self) -> EngineStats:
        total = EngineStats()
        for d in self._all("stats"):
            for name, value in d.items():
                setattr(total, name, getattr(total, name) + value)
        return total

    def info(self) -> dict[str, object]:
        infos = [s.info for s in self.shards]
        first = infos[0]
        return {
            "uuid": self.table.uuid_str(),
            "device": self.device_path,
            "format_version": first["format_version"],
            "capacity_bytes": sum(i["capacity_bytes"] for i in infos),
            "device_size": sum(size for _, size in self.table.partitions),
            "region_size": first["region_size"],
            "num_regions": sum(i["num_regions"] for i in infos),
            "max_block_size": first["max_block_size"],
            "io_engine": first["io_engine"],
            "shards": len(self.shards),
            "shard_ports": ",".join(str(s.spec.ports[s.index]) for s in self.shards),
        }

    def evict_all(self) -> int:
        return sum(self._all("evict_all", timeout_s=600.0))

    def drain(self, timeout_s: float) -> tuple[bool, int]:
        results = self._all("drain", timeout_s, timeout_s=timeout_s + CALL_TIMEOUT_S)
        return all(d for d, _ in results), sum(r for _, r in results)

    def resume(self) -> None:
        """Undo `drain` on every shard."""
        self._all("resume")

    def usage(self) -> ProcessUsage:
        """The supervisor's own CPU and switches, plus every shard's."""
        return sum(self._all("usage", timeout_s=5.0), self_usage())

    def serve(self) -> None:
        self._all("serve")

    def stop(self, timeout_s: float) -> None:
        """Stop every shard (each checkpoints its partition) and wait for them to exit."""
        for s in self.shards:
            s.stopping = True
        futures = [s.call_async("stop") for s in self.shards if not s.dead.is_set()]
        for f in futures:
            try:
                f.result(timeout_s)
            except (ShardError, TimeoutError) as e:
                log.error("stopping a shard: %s", e)
        for s in self.shards:
            code = s.join(timeout_s)
            if code:
                log.error("shard %d exited with code %s", s.index, code)
