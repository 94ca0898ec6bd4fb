"""`wqsd`: one storage daemon serving one device.

Start-up: load and validate the config, open the device (creating and formatting the
embedded default file on first start; recovering an existing WQS device; refusing
anything else), then start the data plane, the gRPC control plane and the metrics
endpoint, and tell systemd READY=1. SIGTERM/SIGINT drain in-flight requests, write the
clean-shutdown checkpoint and exit 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from typing import Sequence

from wqs import __version__
from wqs.config import DaemonConfig, load_daemon_config
from wqs.engine import Engine, open_or_create
from wqs.errors import WQSError
from wqs.notify import Notifier
from wqs.rpc.server import DataServer, ServerOptions

log = logging.getLogger("wqs.daemon")

DRAIN_TIMEOUT_S = 30.0
WAKE_INTERVAL_S = 0.25  # longest the main thread sleeps before it checks for signals
# syslog priorities, understood by journald as a "<N>" prefix on each stderr line.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    """Under systemd (JOURNAL_STREAM set): '<6>wqs.engine: message', journald adds the
    time. Elsewhere: a timestamped line."""

    def __init__(self, journal: bool) -> None:
        fmt = "%(name)s: %(message)s" if journal else \
            "%(asctime)s %(levelname)s %(name)s: %(message)s"
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
    ap.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--version", action="version", version=f"wqsd {__version__}")
    return ap.parse_args(argv)


class Daemon:
    """The running services of one wqsd; start() then wait(), or stop()."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.engine: Engine | None = None
        self.data: DataServer | None = None
        self.control = None
        self.metrics_server = None
        self.registrar = None
        self.notifier = Notifier.from_env()
        self._stop = threading.Event()
        self.started_at = time.time()

    def start(self) -> None:
        from wqs.metrics import make_registry, start_metrics_server
        from wqs.rpc.control import DrainResult, start_control_server

        cfg = self.config
        self.notifier.status("opening device")
        self.engine = open_or_create(cfg.device, cfg.device_size, cfg.engine)
        registry, request_metrics = make_registry(lambda: self.engine,
                                                  node_labels={"node": cfg.node_id})

        def observe(op: str, seconds: float, error: str | None) -> None:
            request_metrics.observe(op, seconds)
            if error is not None:
                request_metrics.error(op, error)

        host, port = cfg.listen_addr
        self.data = DataServer(self.engine, ServerOptions(
            host=host, port=port, auth_token=cfg.auth_token, workers=cfg.workers,
            max_connections=cfg.max_connections, frame_timeout_s=cfg.frame_timeout_s),
            observe=observe)

        def on_drain(timeout_s: float) -> DrainResult:
            assert self.data is not None
            drained, remaining = self.data.drain(timeout_s)
            return DrainResult(drained, remaining)

        self.control = start_control_server(
            lambda: self.engine, cfg.control_listen,
            {"node_id": cfg.node_id, "data_address": self.data.address, "version": __version__,
             "start_time": self.started_at, "transport": "tcp"},
            cfg.auth_token, on_drain, request_metrics=request_metrics,
            cluster_provider=self._cluster_map if cfg.etcd is not None else None)
        if cfg.metrics_addr is not None:
            self.metrics_server = start_metrics_server(registry, *cfg.metrics_addr)
        if cfg.etcd is not None:
            # The socket already listens: clients that see the record and connect at
            # once wait in its backlog until the accept loop starts below.
            self._register(cfg)
        self.data.start()
        from wqs.rdma import probe

        rdma = probe()
        log.info("data-plane transport: tcp (RDMA transport not built yet; %s)", rdma.reason)
        info = self.engine.info()
        log.info("wqsd %s serving %s (%s, %d MiB in %d regions) on %s, control %s, metrics %s",
                 __version__, cfg.device, info["uuid"], info["capacity_bytes"] >> 20,
                 info["num_regions"], self.data.address, cfg.control_listen,
                 cfg.metrics_listen or "off")
        self.notifier.ready(f"serving {self.data.address}")

    def _register(self, cfg: DaemonConfig) -> None:
        from wqs.membership import EtcdClient, NodeRecord, Registrar

        assert self.data is not None and self.engine is not None and cfg.etcd is not None
        record = NodeRecord(node_id=cfg.node_id, address=self.data.address,
                            control_address=cfg.control_listen,
                            capacity_bytes=int(self.engine.info()["capacity_bytes"]),
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
        # Wait in short slices: Python runs signal handlers only in the main thread, and
        # a SIGTERM the kernel hands to another thread (gRPC's, a pool's) does not wake
        # the main thread from a lock wait, so one long wait could miss it for an hour.
        interval = self.notifier.watchdog_interval_s()
        next_ping = time.monotonic() + interval if interval else None
        while True:
            slice_s = WAKE_INTERVAL_S
            if next_ping is not None:
                slice_s = max(0.0, min(slice_s, next_ping - time.monotonic()))
            if self._stop.wait(slice_s):
                return
            if next_ping is not None and time.monotonic() >= next_ping:
                self.notifier.watchdog()
                next_ping = time.monotonic() + interval

    def request_stop(self) -> None:
        self._stop.set()

    def stop(self) -> None:
        """Drain, stop serving, checkpoint the engine."""
        self.notifier.stopping()
        if self.registrar is not None:
            self.registrar.stop()  # leave the ring first, so clients stop sending here
        if self.data is not None:
            drained, remaining = self.data.drain(DRAIN_TIMEOUT_S)
            if not drained:
                log.warning("%d requests still in flight after %.0fs; stopping anyway",
                            remaining, DRAIN_TIMEOUT_S)
            self.data.stop()
        if self.control is not None:
            self.control.stop(1.0)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        if self.engine is not None:
            self.engine.close()
            log.info("clean shutdown: index checkpointed")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {
        "listen": args.listen, "control_listen": args.control_listen,
        "metrics_listen": args.metrics_listen, "device": args.device,
        "device_size": args.device_size, "data_dir": args.data_dir, "log_level": args.log_level,
        "auth_token_file": args.auth_token_file,
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
