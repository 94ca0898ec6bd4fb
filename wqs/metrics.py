"""Prometheus metrics of one daemon.

Nothing here touches prometheus_client's global REGISTRY: each daemon builds its own
`CollectorRegistry` (`make_registry`), so several daemons (or tests) in one process never
share or double-register metrics.

* `EngineCollector` reads `engine.stats()` when Prometheus scrapes, so the engine keeps
  plain integer counters on its hot path and pays nothing between scrapes.
* `RequestRecorder` counts data-plane latencies and errors in plain lists, in each
  shard's loop; `RequestMetrics` exports the merged counts of every recorder at scrape
  time, so the request path never calls into prometheus_client.
* `start_metrics_server` serves /metrics over HTTP and returns a handle that can stop it.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import socket
import socketserver
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, make_wsgi_app,
)
from prometheus_client.core import (
    CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric,
)
from prometheus_client.utils import floatToGoString
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from wqs.engine import Engine

# Data-plane operations; pre-created so every series exists (at 0) from the first scrape.
# get_shm/put_shm: blocks moved one-sided (GET_SHM/PUT_SHM over a local Unix socket or an
# RDMA link), so an operator sees which path a client takes and what each costs.
OPS: tuple[str, ...] = ("put", "get", "put_shm", "get_shm", "exists", "delete",
                        "lookup_prefix", "pin")

# 10 µs .. 1 s, dense around the 100–500 µs the product is judged on.
LATENCY_BUCKETS: tuple[float, ...] = (
    10e-6, 20e-6, 50e-6, 100e-6, 150e-6, 200e-6, 300e-6, 500e-6,
    1e-3, 2e-3, 5e-3, 10e-3, 20e-3, 50e-3, 100e-3, 200e-3, 500e-3, 1.0,
)

# EngineStats field -> (metric name without _total, help). Counters since start-up.
_COUNTERS: dict[str, tuple[str, str]] = {
    "puts": ("wqs_puts", "Blocks stored."),
    "put_bytes": ("wqs_put_bytes", "Payload bytes stored."),
    "gets": ("wqs_gets", "Block reads requested."),
    "get_bytes": ("wqs_get_bytes", "Payload bytes returned by reads."),
    "misses": ("wqs_misses", "Reads that found no valid block."),
    "checksum_failures": ("wqs_checksum_failures", "Entries read back with a bad checksum."),
    "stale_reads": ("wqs_stale_reads", "Reads that lost a race with eviction (counted as misses)."),
    "deletes": ("wqs_deletes", "Blocks deleted."),
    "evicted_blocks": ("wqs_evicted_blocks", "Blocks dropped by eviction or evict-all."),
    "evicted_regions": ("wqs_evicted_regions", "Regions reclaimed by eviction."),
    "reinserted_blocks": ("wqs_reinserted_blocks", "Hot blocks copied forward on reclaim."),
    "written_bytes": ("wqs_device_written_bytes", "Bytes written to the device: entries, "
                      "padding, region headers, copies forward."),
    "reinserted_bytes": ("wqs_reinserted_bytes", "Device bytes written copying blocks "
                         "forward on reclaim."),
    "no_space_puts": ("wqs_no_space_puts", "Puts refused NO_SPACE: the device was full "
                      "and every region that could go was held by pinned blocks."),
    "pins_granted": ("wqs_pins_granted", "Pins granted (a pin asked again counts again)."),
    "pins_refused": ("wqs_pins_refused", "Pins refused: the cap on pinned bytes was reached."),
    "direct_reads": ("wqs_direct_reads", "Hits read from the device straight into a "
                     "client's shared memory."),
    "direct_writes": ("wqs_direct_writes", "Blocks written to the device straight from a "
                      "client's shared memory."),
}
# EngineStats field -> (metric name, help). Current values.
_GAUGES: dict[str, tuple[str, str]] = {
    "recovered_blocks": ("wqs_recovered_blocks", "Blocks found by the last start-up."),
    "used_bytes": ("wqs_used_bytes", "Bytes written into regions that are not free."),
    "capacity_bytes": ("wqs_capacity_bytes", "Bytes of the device given to regions."),
    "index_entries": ("wqs_index_entries", "Entries in the in-memory index."),
    "index_bytes": ("wqs_index_bytes", "Memory held by the in-memory index."),
    "dram_entries": ("wqs_dram_entries", "Blocks held in the DRAM tier."),
    "dram_bytes": ("wqs_dram_bytes", "Bytes held in the DRAM tier."),
    "pinned_blocks": ("wqs_pinned_blocks", "Blocks pinned now."),
    "pinned_bytes": ("wqs_pinned_bytes", "Device bytes of the blocks pinned now."),
}
# Fields exported through labelled families instead of one metric each.
_LABELLED = {"hits_dram", "hits_ssd", "regions_free", "regions_used", "regions_total"}


def write_amplification(stats: dict[str, int]) -> float:
    """Device bytes written over the bytes that puts (not copies) wrote; 1.0 before any."""
    written = stats.get("written_bytes", 0)
    own = written - stats.get("reinserted_bytes", 0)
    return written / own if own > 0 else 1.0


class EngineCollector(Collector):
    """Exports `Engine.stats()` at scrape time.

    `engine_provider` returns the open engine, or None while there is none (start-up,
    shutdown); then only `wqs_up 0` is exported.
    """

    def __init__(self, engine_provider: Callable[[], "Engine | None"],
                 labels: dict[str, str] | None = None) -> None:
        self._engine_provider = engine_provider
        self._info = dict(labels or {})

    def describe(self) -> Iterable[Metric]:
        # No pre-declared families: the registry then calls collect() only on scrape, never
        # at registration (when the engine may not exist yet).
        return []

    def collect(self) -> Iterator[Metric]:
        engine = self._engine_provider()
        stats = None
        if engine is not None:
            try:
                stats = engine.stats().as_dict()
            except Exception:  # a closed or broken engine must not fail the whole scrape
                stats = None
        up = GaugeMetricFamily("wqs_up", "1 when the storage engine is open.")
        up.add_metric([], 1 if stats is not None else 0)
        yield up
        if self._info:
            info = GaugeMetricFamily("wqs_node_info", "Constant 1; labels describe the node.",
                                     labels=sorted(self._info))
            info.add_metric([self._info[k] for k in sorted(self._info)], 1)
            yield info
        if stats is None:
            return

        for field, (name, doc) in _COUNTERS.items():
            if field in stats:
                yield CounterMetricFamily(name, doc, value=stats[field])
        hits = CounterMetricFamily("wqs_hits", "Reads served, by tier.", labels=["tier"])
        hits.add_metric(["dram"], stats.get("hits_dram", 0))
        hits.add_metric(["ssd"], stats.get("hits_ssd", 0))
        yield hits

        regions = GaugeMetricFamily("wqs_regions", "Device regions by state.", labels=["state"])
        regions.add_metric(["free"], stats.get("regions_free", 0))
        regions.add_metric(["used"], stats.get("regions_used", 0))
        yield regions
        for field, (name, doc) in _GAUGES.items():
            if field in stats:
                yield GaugeMetricFamily(name, doc, value=stats[field])
        yield GaugeMetricFamily(
            "wqs_write_amplification", "Device bytes written per byte that puts wrote "
            "(copies forward included; 1 without reinsertion), since start-up.",
            value=write_amplification(stats))
        dram_cap = getattr(getattr(engine, "config", None), "dram_cache_bytes", None)
        if isinstance(dram_cap, int):
            yield GaugeMetricFamily("wqs_dram_capacity_bytes", "Configured DRAM tier size.",
                                    value=dram_cap)

        # Fields the engine grows later still reach Prometheus (as gauges) until someone
        # gives them a proper name above.
        known = _COUNTERS.keys() | _GAUGES.keys() | _LABELLED
        for field in sorted(stats.keys() - known):
            value = stats[field]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                yield GaugeMetricFamily(f"wqs_engine_{field}", f"EngineStats.{field}", value=value)


@dataclass(frozen=True)
class LatencySummary:
    """One op's latency since start, with quantiles estimated from histogram buckets."""

    op: str
    count: int
    sum_seconds: float
    p50_seconds: float
    p90_seconds: float
    p99_seconds: float
    errors: int


class RequestRecorder:
    """Request latencies and errors counted in plain lists: what a shard's loop updates
    per request (a bisect and two additions, no lock, no prometheus_client call).
    `snapshot()` hands a copy to whoever exports it; snapshots of several shards merge."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        # op -> [count per bucket ..., count above the last bound], and the sum
        self.counts: dict[str, list[int]] = {op: [0] * (len(buckets) + 1) for op in OPS}
        self.sums: dict[str, float] = {op: 0.0 for op in OPS}
        self.errors: dict[tuple[str, str], int] = {}

    def observe(self, op: str, seconds: float) -> None:
        counts = self.counts.get(op)
        if counts is None:
            counts = self.counts[op] = [0] * (len(self.buckets) + 1)
            self.sums[op] = 0.0
        counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.sums[op] += seconds

    def error(self, op: str, status: str) -> None:
        key = (op, status)
        self.errors[key] = self.errors.get(key, 0) + 1

    def snapshot(self) -> dict:
        return {"buckets": self.buckets, "counts": {op: list(c) for op, c in self.counts.items()},
                "sums": dict(self.sums), "errors": dict(self.errors)}

    @staticmethod
    def merge(snapshots: Iterable[dict]) -> dict:
        out: dict = {"buckets": LATENCY_BUCKETS, "counts": {}, "sums": {}, "errors": {}}
        for snap in snapshots:
            assert tuple(snap["buckets"]) == tuple(out["buckets"]), "bucket bounds differ"
            for op, counts in snap["counts"].items():
                have = out["counts"].setdefault(op, [0] * len(counts))
                out["counts"][op] = [a + b for a, b in zip(have, counts)]
                out["sums"][op] = out["sums"].get(op, 0.0) + snap["sums"][op]
            for key, n in snap["errors"].items():
                out["errors"][key] = out["errors"].get(key, 0) + n
        return out


class RequestMetrics(Collector):
    """Data-plane request latency and errors, exported from recorders at scrape time.

    The shards of a daemon each keep a RequestRecorder; `sources` are callables that
    return their snapshots (asked at scrape time, like the engine's stats). `observe`,
    `error` and `track` record into this object's own recorder, for callers in the
    daemon's own process.
    """

    def __init__(self, registry: CollectorRegistry,
                 sources: Iterable[Callable[[], dict]] = ()) -> None:
        self.local = RequestRecorder()
        self._lock = threading.Lock()  # observe() may come from several threads here
        self.sources = list(sources)
        registry.register(self)

    def describe(self) -> Iterable[Metric]:
        return []

    def observe(self, op: str, seconds: float) -> None:
        with self._lock:
            self.local.observe(op, seconds)

    def error(self, op: str, status: str) -> None:
        with self._lock:
            self.local.error(op, status)

    @contextlib.contextmanager
    def track(self, op: str) -> Iterator[None]:
        """Time the block as one `op` request; an exception also counts as an error."""
        start = time.perf_counter()
        try:
            yield
        except BaseException as e:
            self.error(op, type(e).__name__)
            raise
        finally:
            self.observe(op, time.perf_counter() - start)

    def snapshot(self) -> dict:
        """Every recorder's counts, merged (a source that fails is left out)."""
        with self._lock:
            snaps = [self.local.snapshot()]
        for source in self.sources:
            try:
                snaps.append(source())
            except Exception:  # noqa: BLE001 - a shard that cannot answer: scrape the rest
                continue
        return RequestRecorder.merge(snaps)

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        bounds = snap["buckets"]
        hist = HistogramMetricFamily("wqs_request_seconds",
                                     "Data-plane request latency, by operation.",
                                     labels=["op"])
        for op in sorted(snap["counts"]):
            counts = snap["counts"][op]
            cumulative, total = [], 0
            for bound, n in zip([*map(_le, bounds), "+Inf"], counts):
                total += n
                cumulative.append((bound, total))
            hist.add_metric([op], cumulative, sum_value=snap["sums"][op])
        yield hist
        errors = CounterMetricFamily("wqs_request_errors",
                                     "Data-plane requests that failed, by operation and status.",
                                     labels=["op", "status"])
        for (op, status), n in sorted(snap["errors"].items()):
            errors.add_metric([op, status], n)
        yield errors

    def summaries(self) -> list[LatencySummary]:
        """Per-op count, sum and p50/p90/p99, for the control plane's Stats RPC."""
        snap = self.snapshot()
        bounds = [*snap["buckets"], math.inf]
        errors: dict[str, int] = {}
        for (op, _), n in snap["errors"].items():
            errors[op] = errors.get(op, 0) + n
        out = []
        for op in sorted(snap["counts"].keys() | errors.keys()):
            counts = snap["counts"].get(op, [0] * len(bounds))
            cumulative, total = [], 0
            for bound, n in zip(bounds, counts):
                total += n
                cumulative.append((bound, total))
            out.append(LatencySummary(
                op=op, count=total, sum_seconds=snap["sums"].get(op, 0.0),
                p50_seconds=bucket_quantile(0.50, cumulative),
                p90_seconds=bucket_quantile(0.90, cumulative),
                p99_seconds=bucket_quantile(0.99, cumulative), errors=errors.get(op, 0),
            ))
        return out


def _le(bound: float) -> str:
    """A bucket bound as prometheus_client writes it (floatToGoString)."""
    return floatToGoString(bound)


def bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Quantile q from cumulative (upper bound, count) buckets sorted by bound, with linear
    interpolation inside a bucket, as Prometheus' histogram_quantile. 0.0 without data.
    A quantile that falls in the +Inf bucket reports the highest finite bound."""
    if not buckets or buckets[-1][1] <= 0:
        return 0.0
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            fraction = (rank - lower_count) / (count - lower_count)
            return lower_bound + (bound - lower_bound) * fraction
        lower_bound, lower_count = bound, count
    return lower_bound


def make_registry(engine_provider: Callable[[], "Engine | None"], *,
                  node_labels: dict[str, str] | None = None,
                  process_metrics: bool = True) -> tuple[CollectorRegistry, RequestMetrics]:
    """A fresh registry with the engine collector, request metrics and (optionally) the
    standard process_* / python_* collectors."""
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine_provider, node_labels))
    if process_metrics:
        # The stock instances are bound to the global registry; make our own.
        GCCollector(registry=registry)
        PlatformCollector(registry=registry)
        ProcessCollector(registry=registry)
    return registry, RequestMetrics(registry)


@dataclass
class MetricsServer:
    """A running /metrics HTTP endpoint."""

    server: object  # wsgiref WSGIServer
    thread: threading.Thread
    host: str
    port: int  # the bound port (useful when 0 was asked for)

    def shutdown(self, timeout: float | None = 5.0) -> None:
        self.server.shutdown()  # type: ignore[attr-defined]
        self.server.server_close()  # type: ignore[attr-defined]
        self.thread.join(timeout)


class _MetricsHTTPServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the FQDN of the bind address: a reverse DNS
        # query that can stall a daemon's start for many seconds where DNS is slow or
        # unreachable. The name is never used here, so skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), port
        self.setup_environ()


class _MetricsHTTPServer6(_MetricsHTTPServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # one line per scrape would drown the daemon's log


def start_metrics_server(registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
    """Serve `registry` at http://host:port/metrics in a daemon thread. Port 0 picks one."""
    server_class = _MetricsHTTPServer6 if ":" in host else _MetricsHTTPServer
    server = make_server(host, port, make_wsgi_app(registry), server_class,
                         handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="wqs-metrics", daemon=True)
    thread.start()
    return MetricsServer(server=server, thread=thread, host=host, port=server.server_port)
