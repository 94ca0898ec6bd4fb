"""Prometheus metrics: a per-daemon registry scraped over HTTP."""

from __future__ import annotations

import re
import urllib.request

import pytest
from prometheus_client import REGISTRY, CollectorRegistry

from tests.conftest import MiB, block_id
from wqs.metrics import (
    LATENCY_BUCKETS, EngineCollector, RequestMetrics, bucket_quantile, make_registry,
    start_metrics_server,
)


def scrape(port: int) -> dict[str, float]:
    """{'name{labels}': value} from the text exposition at /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.status == 200
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


@pytest.fixture
def metrics_server(open_engine, small_config):
    engine = open_engine(small_config, size=16 * MiB)
    registry, requests = make_registry(lambda: engine, node_labels={"node_id": "n1"})
    server = start_metrics_server(registry, "127.0.0.1", 0)
    yield engine, requests, server
    server.shutdown()


def test_engine_counters_follow_puts_and_gets(metrics_server):
    engine, _, server = metrics_server
    before = scrape(server.port)
    assert before["wqs_up"] == 1
    assert before['wqs_node_info{node_id="n1"}'] == 1
    assert before["wqs_puts_total"] == 0 and before["wqs_gets_total"] == 0
    assert before["wqs_capacity_bytes"] == engine.stats().capacity_bytes > 0
    free0 = before['wqs_regions{state="free"}']
    assert free0 + before['wqs_regions{state="used"}'] == engine.info()["num_regions"]

    engine.put(block_id(1), b"a" * 10000)
    engine.put(block_id(2), b"b" * 300)
    assert engine.get(block_id(1)) is not None
    assert engine.get(block_id(3)) is None

    after = scrape(server.port)
    assert after["wqs_puts_total"] == 2
    assert after["wqs_put_bytes_total"] == 10300
    assert after["wqs_gets_total"] == 2
    assert after['wqs_hits_total{tier="ssd"}'] + after['wqs_hits_total{tier="dram"}'] == 1
    assert after["wqs_misses_total"] == 1
    assert after["wqs_checksum_failures_total"] == 0
    assert after["wqs_index_entries"] == 2
    assert after["wqs_used_bytes"] > before["wqs_used_bytes"]
    assert after['wqs_regions{state="used"}'] >= 1
    assert "process_resident_memory_bytes" in after  # our own process collector

    # 12288 + 4096 B of entries, and the headers of the regions prepared so far.
    assert after["wqs_device_written_bytes_total"] >= 16384 + 4096
    assert after["wqs_reinserted_bytes_total"] == 0 and after["wqs_write_amplification"] == 1

    n = engine.evict_all()
    evicted = scrape(server.port)
    assert evicted["wqs_evicted_blocks_total"] == n == 2
    assert evicted["wqs_index_entries"] == 0


def test_request_histograms(metrics_server):
    _, requests, server = metrics_server
    s = scrape(server.port)
    for op in ("put", "get", "exists", "delete", "lookup_prefix"):
        assert s[f'wqs_request_seconds_count{{op="{op}"}}'] == 0  # exported from the start
    requests.observe("get", 15e-6)
    requests.observe("get", 0.3)
    with requests.track("put"):
        pass
    with pytest.raises(ValueError):
        with requests.track("delete"):
            raise ValueError("boom")
    requests.error("get", "not_found")
    s = scrape(server.port)
    assert s['wqs_request_seconds_count{op="get"}'] == 2
    assert s['wqs_request_seconds_bucket{le="2e-05",op="get"}'] == 1
    assert s['wqs_request_seconds_bucket{le="0.5",op="get"}'] == 2
    assert s['wqs_request_seconds_count{op="put"}'] == 1
    assert s['wqs_request_seconds_count{op="delete"}'] == 1
    assert s['wqs_request_errors_total{op="delete",status="ValueError"}'] == 1
    assert s['wqs_request_errors_total{op="get",status="not_found"}'] == 1
    summaries = {x.op: x for x in requests.summaries()}
    assert summaries["get"].count == 2 and summaries["get"].errors == 1
    assert summaries["delete"].errors == 1


def test_buckets_span_10us_to_1s():
    assert LATENCY_BUCKETS[0] == 10e-6 and LATENCY_BUCKETS[-1] == 1.0
    assert list(LATENCY_BUCKETS) == sorted(LATENCY_BUCKETS)


def test_bucket_quantile():
    inf = float("inf")
    assert bucket_quantile(0.5, []) == 0.0
    assert bucket_quantile(0.5, [(1.0, 0), (inf, 0)]) == 0.0
    b = [(1.0, 0), (2.0, 10), (inf, 10)]
    assert bucket_quantile(0.5, b) == pytest.approx(1.5)
    assert bucket_quantile(0.99, [(1.0, 5), (inf, 10)]) == 1.0  # in +Inf: highest bound


def test_no_engine_reports_down_and_no_global_state():
    engine = None
    registry, _ = make_registry(lambda: engine, process_metrics=False)
    server = start_metrics_server(registry, "127.0.0.1", 0)
    try:
        s = scrape(server.port)
        assert s["wqs_up"] == 0 and "wqs_puts_total" not in s
    finally:
        server.shutdown()
    # Two daemons in one process: separate registries, nothing in the global one.
    r2 = CollectorRegistry()
    r2.register(EngineCollector(lambda: None))
    RequestMetrics(r2)
    RequestMetrics(CollectorRegistry())
    assert REGISTRY.get_sample_value("wqs_up") is None
    assert not any(re.match(r"wqs_", n) for n in REGISTRY._names_to_collectors)


def test_shutdown_frees_the_port():
    registry, _ = make_registry(lambda: None, process_metrics=False)
    server = start_metrics_server(registry, "127.0.0.1", 0)
    port = server.port
    server.shutdown()
    assert not server.thread.is_alive()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1)


def test_write_amplification_counts_copies_forward(metrics_server):
    engine, _, server = metrics_server
    hot = [block_id(i) for i in range(5)]
    engine.put_many([(k, b"h" * 30_000) for k in hot])
    for i in range(10, 700):  # through the 16 MiB device ~1.3 times, reading the hot set
        engine.put(block_id(i), b"c" * 30_000)
        if i % 20 == 0:
            engine.get_many(hot)
    s = scrape(server.port)
    stats = engine.stats()
    assert s["wqs_reinserted_bytes_total"] == stats.reinserted_bytes > 0
    own = stats.written_bytes - stats.reinserted_bytes
    assert s["wqs_write_amplification"] == pytest.approx(stats.written_bytes / own)
    assert 1 < s["wqs_write_amplification"] < 1.3
