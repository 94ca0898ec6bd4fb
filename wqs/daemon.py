"""`wqsd`: the supervisor of one storage node's shards.

Start-up: load and validate the config, open (and lock) the device, creating and
formatting the embedded default file on first start, read how it is cut into shards,
make each shard's listening socket, and fork one process per shard (wqs/server/worker.py:
its own event loop, engine and partition; it recovers its partition in parallel with
the others). Then the gRPC control plane, the metrics endpoint and the etcd registration
start here, in the supervisor, the shards are told to accept connections, and systemd
hears READY=1. Nothing on the data path passes through the supervisor.

SIGTERM/SIGINT drain every shard's in-flight requests, stop the shards (each writes its
clean-shutdown checkpoint) and exit 0. A shard that dies on its own takes the daemon
down with exit status 1, after the other shards stopped cleanly: systemd restarts it,
and only the failed shard's partition is scanned.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Sequence

from wqs import __version__
from wqs.config import MAX_SOCKET_PATH, DaemonConfig, format_hostport, load_daemon_config
from wqs.errors import ConfigError, WQSError
from wqs.notify import Notifier
from wqs.server.local import close_local, listen_local, shard_paths

log = logging.getLogger("wqs.daemon")

DRAIN_TIMEOUT_S = 30.0
WAKE_INTERVAL_S = 0.25  # longest the main thread sleeps before it checks for signals
# syslog priorities, understood by journald as a "<N>" prefix on each stderr line.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    """Under systemd (JOURNAL_STREAM set): '<6>wqs.engine: message', journald adds the
    time. Elsewhere: a timestamped line. `tag` (a shard's) goes before the message."""

    def __init__(self, journal: bool, tag: str | None = None) -> None:
        prefix = f"{tag}: " if tag else ""
        fmt = f"%(name)s: {prefix}%(message)s" if journal else \
            f"%(asctime)s %(levelname)s %(name)s: {prefix}%(message)s"
        super().__init__(fmt)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if self.journal:
            prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
            return "\n".join(prefix + part for part in line.splitlines())
        return line


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JournalFormatter(journal="JOURNAL_STREAM" in os.environ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="wqsd", description="WQS storage daemon")
    ap.add_argument("--config", help="YAML config file (see systemd/wqsd.yaml)")
    ap.add_argument("--listen", help="data-plane HOST:PORT (control: +1, metrics: +2)")
    ap.add_argument("--control-listen", help="gRPC control plane HOST:PORT")
    ap.add_argument("--metrics-listen", help="Prometheus HOST:PORT, or 'off'")
    ap.add_argument("--device", help="raw block device or device file")
    ap.add_argument("--device-size", help="size of the device file if it must be created")
    ap.add_argument("--data-dir", help="directory of the default device file")
    ap.add_argument("--auth-token-file", help="file holding the shared auth token")
    ap.add_argument("--workers", help="shard processes: a number, or auto")
    ap.add_argument("--local-socket", help="Unix socket for same-host clients: a path, auto "
                    "(<data-dir>/wqsd.sock) or off")
    ap.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--version", action="version", version=f"wqsd {__version__}")
    return ap.parse_args(argv)


class Daemon:
    """The running services of one wqsd; start() then wait(), or stop()."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.device = None
        self.node = None  # NodeView over the shards, once they run
        self.shards: list = []
        self.data_address: str | None = None
        self.control = None
        self.metrics_server = None
        self.registrar = None
        self.notifier = Notifier.from_env()
        self._stop = threading.Event()
        self.failed: str | None = None  # why the daemon stops on its own
        self.started_at = time.time()
        self.local: list[tuple[str, socket.socket]] = []  # (path, listener) per shard

    def start(self) -> None:
        from wqs.engine.node import open_node_device
        from wqs.metrics import make_registry, start_metrics_server
        from wqs.rpc.control import DrainResult, start_control_server
        from wqs.server.shards import NodeView, start_shards

        cfg = self.config
        self.notifier.status("opening device")
        self.device, table = open_node_device(cfg.device, cfg.device_size, cfg.engine,
                                              cfg.shard_count)
        socks = self._listen(len(table.partitions))
        try:
            self.local = self._listen_local(len(table.partitions))
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        self.notifier.status(f"recovering {len(socks)} shard(s)")
        try:
            self.shards = start_shards(cfg, self.device, table, socks, self.local,
                                       os.urandom(16))
        except BaseException:
            close_local(self.local)
            raise
        finally:
            for sock in socks:
                sock.close()  # each shard process holds its own
            for _, sock in self.local:
                sock.close()
        self.node = NodeView(self.shards, cfg.device, table, cfg.engine)
        host, _ = cfg.listen_addr
        self.data_address = format_hostport(host, self.shards[0].spec.ports[0])
        registry, request_metrics = make_registry(lambda: self.node,
                                                  node_labels={"node": cfg.node_id})
        request_metrics.sources = [s.requests_snapshot for s in self.shards]

        def on_drain(timeout_s: float) -> DrainResult:
            assert self.node is not None
            drained, remaining = self.node.drain(timeout_s)
            return DrainResult(drained, remaining)

        def on_resume() -> None:
            assert self.node is not None
            if self._stop.is_set():
                raise RuntimeError("the daemon is stopping")
            self.node.resume()

        info = self.node.info()
        self.control = start_control_server(
            lambda: self.node, cfg.control_listen,
            {"node_id": cfg.node_id, "data_address": self.data_address, "version": __version__,
             "start_time": self.started_at,
             "transport": "tcp+shm" if self.local else "tcp",
             "shards": str(info["shards"]), "shard_ports": str(info["shard_ports"]),
             "io_engine": str(info["io_engine"])},  # the device backend (wqs stat)
            cfg.auth_token, on_drain, on_resume=on_resume, request_metrics=request_metrics,
            cluster_provider=self._cluster_map if cfg.etcd is not None else None,
            usage_provider=self.node.usage)
        if cfg.metrics_addr is not None:
            self.metrics_server = start_metrics_server(registry, *cfg.metrics_addr)
        if cfg.etcd is not None:
            # The shards already listen: clients that see the record and connect at
            # once wait in the backlog until they accept, just below.
            self._register(cfg)
        from wqs.rdma import probe

        rdma = probe()
        if cfg.rdma.enabled == "off":
            log.info("RDMA transport: off (rdma.enabled)")
        elif rdma.available:
            log.info("RDMA transport: served on %s (clients with transport: rdma)",
                     cfg.rdma.device or rdma.devices[0])
        else:
            log.info("RDMA transport: not served (%s); TCP and shared memory only",
                     rdma.reason)
        if self.local:
            log.info("same-host clients: shared memory through %s", ", ".join(
                path for path, _ in self.local))
        log.info("wqsd %s serving %s (%s, %d MiB in %d regions, %d shard%s on ports %s) on "
                 "%s, control %s, metrics %s", __version__, cfg.device, info["uuid"],
                 int(info["capacity_bytes"]) >> 20, info["num_regions"], info["shards"],
                 "s" if int(info["shards"]) > 1 else "", info["shard_ports"],
                 self.data_address, cfg.control_listen, cfg.metrics_listen or "off")
        self.node.serve()
        self.notifier.ready(f"serving {self.data_address}")

    def _listen(self, n: int) -> list[socket.socket]:
        """One listening socket per shard: shard 0 on `listen`, the others on
        `shard_ports` or on ports the kernel picks."""
        cfg = self.config
        host, port = cfg.listen_addr
        if cfg.shard_ports and len(cfg.shard_ports) < n - 1:
            raise ConfigError(f"shard_ports: lists {len(cfg.shard_ports)} ports, the device's "
                              f"{n} shards need {n - 1} (shard 0 uses listen)")
        ports = [port] + [cfg.shard_ports[k - 1] if cfg.shard_ports else 0
                          for k in range(1, n)]
        socks: list[socket.socket] = []
        try:
            for p in ports:
                try:
                    socks.append(socket.create_server((host, p), backlog=512))
                except OSError as e:
                    raise OSError(f"data plane cannot listen on "
                                  f"{format_hostport(host, p)}: {e.strerror}") from None
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        return socks

    def _listen_local(self, n: int) -> list[tuple[str, socket.socket]]:
        """A Unix socket per shard for same-host clients, unless local_socket is off."""
        cfg = self.config
        base = cfg.local_socket_path
        if base is None:
            return []
        if cfg.local_socket == "auto" and len(shard_paths(base, n)[-1].encode()) > \
                MAX_SOCKET_PATH:
            log.warning("local_socket: the default %s is too long for a Unix socket; "
                        "same-host clients use TCP (set local_socket to a shorter path)",
                        base)
            return []
        return listen_local(base, n, cfg.local_socket_mode, cfg.local_socket_group)

    def _register(self, cfg: DaemonConfig) -> None:
        from wqs.membership import EtcdClient, NodeRecord, Registrar

        assert self.node is not None and self.data_address is not None and cfg.etcd is not None
        record = NodeRecord(node_id=cfg.node_id, address=self.data_address,
                            control_address=cfg.control_listen,
                            capacity_bytes=int(self.node.info()["capacity_bytes"]),
                            version=__version__)
        self.registrar = Registrar(EtcdClient(cfg.etcd), record)
        self.registrar.start()

    def _cluster_map(self) -> list:
        """Every node registered in etcd; this one with its live figures."""
        from wqs.membership import EtcdClient, EtcdError, NodeRecord
        from wqs.rpc.control import ClusterNodeInfo

        assert self.control is not None and self.config.etcd is not None
        me = self.control.service.local_node()
        rows = [me]
        try:
            kvs, _ = EtcdClient(self.config.etcd).list_prefix()
        except EtcdError as e:
            log.warning("cluster map from etcd failed: %s", e)
            return rows
        for value in kvs.values():
            rec = NodeRecord.from_json(value)
            if rec.node_id != me.node_id:
                rows.append(ClusterNodeInfo(node_id=rec.node_id, address=rec.address,
                                            state="serving", capacity_bytes=rec.capacity_bytes,
                                            control_address=rec.control_address))
        return rows

    def wait(self) -> None:
        """Until a stop is requested or a shard dies.

        Waits in short slices: Python runs signal handlers only in the main thread, and
        a SIGTERM the kernel hands to another thread (gRPC's, a pool's) does not wake
        the main thread from a lock wait, so one long wait could miss it for an hour."""
        interval = self.notifier.watchdog_interval_s()
        next_ping = time.monotonic() + interval if interval else None
        while True:
            slice_s = WAKE_INTERVAL_S
            if next_ping is not None:
                slice_s = max(0.0, min(slice_s, next_ping - time.monotonic()))
            if self._stop.wait(slice_s):
                return
            for shard in self.shards:
                if shard.dead.is_set() and not shard.stopping:
                    shard.process.join(1)
                    self.failed = (f"shard {shard.index} exited unexpectedly (code "
                                   f"{shard.process.exitcode})")
                    log.error("%s; stopping the other shards", self.failed)
                    return
            if next_ping is not None and time.monotonic() >= next_ping:
                self.notifier.watchdog()
                next_ping = time.monotonic() + interval

    def request_stop(self) -> None:
        self._stop.set()

    def stop(self) -> None:
        """Drain, stop the shards (each checkpoints its partition), stop the rest."""
        self.notifier.stopping()
        if self.registrar is not None:
            self.registrar.stop()  # leave the ring first, so clients stop sending here
        if self.node is not None:
            if self.failed is None:
                try:
                    drained, remaining = self.node.drain(DRAIN_TIMEOUT_S)
                    if not drained:
                        log.warning("%d requests still in flight after %.0fs; stopping "
                                    "anyway", remaining, DRAIN_TIMEOUT_S)
                except WQSError as e:
                    log.warning("drain failed: %s", e)
            self.node.stop(DRAIN_TIMEOUT_S)
        if self.control is not None:
            self.control.stop(1.0)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        if self.device is not None:
            self.device.close()
            self.device = None
        close_local(self.local)  # the socket files; the shards closed the sockets
        if self.node is not None and self.failed is None:
            log.info("clean shutdown: every shard checkpointed")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {
        "listen": args.listen, "control_listen": args.control_listen,
        "metrics_listen": args.metrics_listen, "device": args.device,
        "device_size": args.device_size, "data_dir": args.data_dir, "log_level": args.log_level,
        "auth_token_file": args.auth_token_file, "workers": args.workers,
        "local_socket": args.local_socket,
    }
    try:
        config = load_daemon_config(args.config, overrides)
    except (WQSError, OSError) as e:
        print(f"wqsd: configuration error: {e}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    daemon = Daemon(config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.request_stop())
    try:
        daemon.start()
    except (WQSError, OSError) as e:
        log.error("cannot start: %s", e)
        daemon.stop()
        return 1
    daemon.wait()
    log.info("stopping")
    daemon.stop()
    return 1 if daemon.failed else 0


if __name__ == "__main__":
    sys.exit(main())
