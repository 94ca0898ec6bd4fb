"""A shard process: one shard of a daemon, run in a process of its own.

Forked by the daemon (the supervisor) before it starts any thread, with the device it
opened and locked and the listening socket made for this shard. The process recovers its
partition of the device, then serves its loop until the supervisor says stop. It talks
to the supervisor over one pipe, handled in its loop like any other file descriptor:
requests are (id, operation, arguments), answers (id, ok, result).

Signals: SIGTERM and SIGINT are the supervisor's to handle (it drains and stops every
shard in order); a shard ignores them. If the supervisor dies, the kernel kills the
shard too (PR_SET_PDEATHSIG), as if the whole daemon had been killed: its next start
recovers by scanning, as after any crash.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import logging
import os
import signal
import socket
import sys
import traceback
from dataclasses import dataclass
from typing import Any

from wqs.config import DaemonConfig
from wqs.engine.engine import open_core
from wqs.loop.reactor import Reactor
from wqs.nvme.device import DevicePart
from wqs.procstat import self_usage
from wqs.server.shard import Shard, ShardOptions

log = logging.getLogger("wqs.shard")

PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ShardSpec:
    index: int
    count: int
    ports: tuple[int, ...]  # every shard's data port
    offset: int  # this shard's partition of the device
    size: int
    config: DaemonConfig
    local_paths: tuple[str, ...] = ()  # every shard's Unix socket, or none
    instance: bytes = b""  # this daemon run's identity, announced with the paths


def shard_main(spec: ShardSpec, device: Any, socks: list[socket.socket],
               local: list[socket.socket], conn: Any, parent: int) -> None:
    """The body of a shard process (fork start method: everything is inherited)."""
    _die_with_parent(parent)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for k, s in [*enumerate(socks), *enumerate(local)]:
        if k != spec.index:
            s.close()  # the other shards' listeners are theirs alone
    _tag_logs(spec.index)
    try:
        worker = _Worker(spec, device, socks[spec.index],
                         local[spec.index] if local else None, conn)
    except Exception as e:  # noqa: BLE001 - reported to the supervisor, which says why
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        log.debug("start-up failed:\n%s", traceback.format_exc())
        os._exit(1)
    worker.run()
    os._exit(0)  # no atexit handlers of the supervisor's: they are not ours


def _die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before the line above took effect
        os._exit(1)


def _tag_logs(index: int) -> None:
    for handler in logging.getLogger().handlers:
        fmt = handler.formatter
        if fmt is not None and hasattr(fmt, "journal"):  # the daemon's own formatter
            handler.setFormatter(type(fmt)(fmt.journal, f"shard {index}"))


class _Worker:
    def __init__(self, spec: ShardSpec, device: Any, sock: socket.socket,
                 local: socket.socket | None, conn: Any) -> None:
        cfg = spec.config
        self.spec = spec
        self.conn = conn
        self.loop = Reactor()
        part = DevicePart(device, spec.offset, spec.size, spec.index)
        # The DRAM tier is the node's: each shard gets its share.
        engine_cfg = dataclasses.replace(cfg.engine,
                                         dram_cache_bytes=cfg.engine.dram_cache_bytes // spec.count)
        self.core = open_core(part, engine_cfg, self.loop)
        host, _ = cfg.listen_addr
        from wqs.server.rdma import open_nic

        nic, rdma_note = open_nic(cfg)
        self.shard = Shard(self.core, self.loop, ShardOptions(
            host=host, port=spec.ports[spec.index], auth_token=cfg.auth_token,
            max_connections=cfg.max_connections,
            max_connection_bytes=cfg.max_connection_bytes,
            max_inflight_bytes=cfg.max_inflight_bytes, frame_timeout_s=cfg.frame_timeout_s),
            index=spec.index, count=spec.count, sock=sock, accepting=False,
            local_sock=local, instance=spec.instance, nic=nic, rdma_note=rdma_note)
        self.shard.set_ports(spec.ports, spec.local_paths)
        self.loop.add_reader(conn.fileno(), self._on_message)
        # What start-up made lives for good: keep the cyclic collector off it, and let it
        # run rarely (the request path makes few cycles), not every few hundred objects.
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        conn.send(("ready", self.core.info()))

    def run(self) -> None:
        # WQS_PROFILE=DIR: profile this shard's CPU (cProfile) into DIR/shard-N.pstats
        # when it stops; for finding where a request's time goes, not for production.
        out = os.environ.get("WQS_PROFILE")
        if out:
            import cProfile
            import time

            prof = cProfile.Profile(time.process_time)
            prof.runcall(self.loop.run)
            prof.dump_stats(os.path.join(out, f"shard-{self.spec.index}.pstats"))
        else:
            self.loop.run()
        self.loop.close()

    def _on_message(self) -> None:
        try:
            rid, op, args = self.conn.recv()
        except (EOFError, OSError):
            # The supervisor closed the pipe without a stop: stop cleanly all the same.
            log.warning("supervisor gone; stopping")
            self.loop.forget(self.conn.fileno())
            self.shard.stop()
            return
        handler = getattr(self, f"op_{op}", None)
        try:
            if handler is None:
                raise ValueError(f"unknown shard operation {op!r}")
            handler(lambda result=None: self._reply(rid, True, result), *args)
        except Exception as e:  # noqa: BLE001 - the supervisor reports it
            self._reply(rid, False, f"{type(e).__name__}: {e}")

    def _reply(self, rid: int, ok: bool, result: Any) -> None:
        try:
            self.conn.send((rid, ok, result))
        except (BrokenPipeError, OSError):
            pass  # the supervisor is gone; the pipe's EOF stops us

    # ---- operations: op_NAME(reply, *args) -------------------------------------------

    def op_serve(self, reply: Any) -> None:
        self.shard.start_accepting()
        reply()

    def op_info(self, reply: Any) -> None:
        reply(self.core.info())

    def op_stats(self, reply: Any) -> None:
        reply(self.core.stats().as_dict())

    def op_usage(self, reply: Any) -> None:
        reply(self_usage())

    def op_requests(self, reply: Any) -> None:
        reply(self.shard.recorder.snapshot())

    def op_drain(self, reply: Any, timeout_s: float) -> None:
        self.shard.drain(timeout_s, lambda drained, remaining: reply((drained, remaining)))

    def op_resume(self, reply: Any) -> None:
        self.shard.resume()
        reply()

    def op_evict_all(self, reply: Any) -> None:
        self.shard.evict_all(reply)

    def op_stop(self, reply: Any) -> None:
        self.shard.stop(lambda: reply(None))


if __name__ == "__main__":  # not an entry point: shards are forked by wqsd
    sys.exit("wqs.server.worker is started by wqsd")
