"""wqsd as a real process on loopback: the SDK end to end, restarts (clean and killed),
config errors, authentication (data and control plane, and what crosses the wire),
systemd notifications, Prometheus metrics and the control plane's effect on serving."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import socket
import tempfile
import threading
import time
import urllib.request
from typing import Iterator

import numpy as np
import pytest
import xxhash
from prometheus_client.parser import text_string_to_metric_families

import wqs
from tests.conftest import run_concurrently
from tests.daemons import DaemonFactory, DaemonProcess, daemon_factory, hello  # noqa: F401
from wqs.errors import AuthError, BlockTooLarge
from wqs.rpc import protocol as p
from wqs.rpc.control import ControlClient
from wqs.ring import shard_of

MiB = 1 << 20
SMALL = {"engine": {"region_size": "1M", "max_block_size": "2M", "dram_cache_bytes": "8M",
                    "io_threads": 4},
         "workers": 4}


def bid(i: int) -> bytes:
    return i.to_bytes(16, "big")


# --------------------------------------------------------------------------- SDK


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Iterator[DaemonProcess]:
    """One daemon for the SDK round trips (they use disjoint ids)."""
    f = DaemonFactory(tmp_path_factory.mktemp("sdk"))
    try:
        yield f(config=SMALL)
    finally:
        f.cleanup()


@pytest.fixture
def client(shared) -> Iterator[wqs.Client]:
    with wqs.Client([shared.address]) as c:
        yield c


def test_put_get_exists_delete(client):
    payload = os.urandom(50_000)
    assert not client.exists(bid(1))
    assert client.get(bid(1)) is None
    assert client.put(bid(1), payload) is True
    assert client.exists(bid(1))
    assert client.get(bid(1)) == payload
    assert client.put(bid(1), payload) is True  # re-putting the same block is harmless
    assert client.get(bid(1)) == payload
    assert client.delete(bid(1)) is True
    assert client.delete(bid(1)) is False
    assert not client.exists(bid(1)) and client.get(bid(1)) is None
    # int ids and an empty block
    assert client.put(12345, b"") and client.get(12345) == b""


def test_batches_keep_the_callers_order(client):
    rng = random.Random(1)
    items = [(bid(100 + i), rng.randbytes(rng.randrange(1, 40_000))) for i in range(60)]
    assert client.put_many(items) == [True] * 60
    ids = [b for b, _ in items]
    asked = ids[::-1] + [bid(999_999)]
    got = client.get_many(asked)
    assert got[:-1] == [v for _, v in items][::-1] and got[-1] is None
    assert client.exists_many([bid(999_999), ids[3]]) == [False, True]
    assert client.delete_many([ids[0], bid(999_998), ids[1]]) == [True, False, True]
    assert client.get_many(ids[:3]) == [None, None, items[2][1]]


def test_lookup_prefix(client):
    ids = [bid(200 + i) for i in range(10)]
    assert client.lookup_prefix(ids) == 0
    assert client.lookup_prefix([]) == 0
    client.put_many([(b, b"x" * 100) for b in ids[:6]])
    assert client.lookup_prefix(ids) == 6
    client.put(ids[8], b"gap")  # after a hole: does not count
    assert client.lookup_prefix(ids) == 6
    client.put_many([(ids[6], b"a"), (ids[7], b"b"), (ids[9], b"c")])
    assert client.lookup_prefix(ids) == 10


def test_get_into_numpy_out_buffers(client):
    arr = np.arange(8192, dtype=np.float16).reshape(64, 128)
    assert client.put(bid(300), arr)  # numpy in: its raw bytes
    out = np.zeros_like(arr)
    assert client.get(bid(300), out=out) is True
    assert np.array_equal(out, arr)
    miss = np.zeros(16, dtype=np.uint8)
    assert client.get(bid(301), out=miss) is False and not miss.any()
    # get_many with outs: hits are memoryviews of the caller's buffers
    outs = [np.empty(arr.nbytes, dtype=np.uint8), np.empty(10, dtype=np.uint8)]
    got = client.get_many([bid(300), bid(301)], outs=outs)
    assert got[1] is None
    assert bytes(got[0]) == arr.tobytes() == outs[0].tobytes()
    with pytest.raises(TypeError):
        client.get(bid(300), out=bytes(arr.nbytes))  # read-only
    with pytest.raises(BlockTooLarge):
        client.get(bid(300), out=np.empty(arr.nbytes - 1, dtype=np.uint8))
    assert client.get(bid(300)) == arr.tobytes()  # the connection is still in step


def test_torch_cpu_tensors(client):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    t = torch.randn(32, 64, dtype=torch.float16)
    assert client.put(bid(310), t)
    out = torch.empty_like(t)
    assert client.get(bid(310), out=out) is True
    assert torch.equal(out, t)


def test_too_large_block_is_an_error(client):
    with pytest.raises(BlockTooLarge):
        client.put(bid(320), bytes(3 * MiB))  # the daemon's max_block_size is 2 MiB
    assert not client.exists(bid(320))
    assert client.put(bid(321), bytes(2 * MiB)) and len(client.get(bid(321))) == 2 * MiB


def test_prefix_chains_shared_by_two_requests(client):
    """Request A fills the cache; request B shares A's first 1000 tokens and reuses the
    4 whole blocks they have in common, found with one lookup."""
    rng = np.random.default_rng(7)
    common = rng.integers(0, 128_000, 1000)
    tokens_a = np.concatenate([common, rng.integers(0, 128_000, 600)])
    tokens_b = np.concatenate([common, rng.integers(0, 128_000, 300)])
    ids_a = wqs.prefix_block_ids(tokens_a, block_tokens=256, namespace="test-model")
    ids_b = wqs.prefix_block_ids(tokens_b, block_tokens=256, namespace="test-model")
    assert len(ids_a) == 6 and len(ids_b) == 5
    assert ids_a[:3] == ids_b[:3] and ids_a[3] != ids_b[3]  # block 3 holds tokens 768..1023
    kv = {b: os.urandom(20_000) for b in ids_a}
    assert client.lookup_prefix(ids_a) == 0
    assert all(client.put_many(kv.items()))
    hits = client.lookup_prefix(ids_b)
    assert hits == 3
    assert client.get_many(ids_b[:hits]) == [kv[b] for b in ids_a[:3]]
    # another model's namespace shares nothing
    other = wqs.prefix_block_ids(tokens_b, block_tokens=256, namespace="other-model")
    assert client.lookup_prefix(other) == 0


def test_futures_and_asyncio(shared, client):
    items = [(bid(400 + i), os.urandom(5000)) for i in range(20)]
    fut = client.put_many_async(items)
    assert fut.result(timeout=10) == [True] * 20
    fut = client.get_many_async([b for b, _ in items])
    assert fut.result(timeout=10) == [v for _, v in items]
    assert client.lookup_prefix_async([b for b, _ in items]).result(timeout=10) == 20

    async def main() -> None:  # the asyncio-native client (tests/test_async_client.py)
        async with wqs.AsyncClient([shared.address]) as ac:
            more = [(bid(500 + i), os.urandom(3000)) for i in range(8)]
            # overlapped: a put, a get of other blocks and a lookup in flight together
            put, got, n = await asyncio.gather(
                ac.put_many(more), ac.get_many([b for b, _ in items[:5]]),
                ac.lookup_prefix([b for b, _ in items]))
            assert put == [True] * 8 and got == [v for _, v in items[:5]] and n == 20
            outs = [bytearray(3000) for _ in more]
            got = await ac.get_many([b for b, _ in more], outs=outs)
            assert [bytes(o) for o in outs] == [v for _, v in more]
            assert [bytes(g) for g in got] == [v for _, v in more]

    asyncio.run(main())


def test_many_threads_share_one_client(client):
    def worker(k: int) -> None:
        for i in range(20):
            b, v = bid(10_000 * (k + 1) + i), os.urandom(1000 + i)
            assert client.put(b, v) and client.get(b) == v

    errors = run_concurrently(worker, 6, timeout=30)
    assert not errors


def test_32_waiters_on_one_connection_all_get_their_own_answer(shared):
    # One connection, 32 callers: they take turns reading the socket for each other
    # (leader/follower), and each must get exactly its own block back, promptly.
    with wqs.Client([shared.address], connections_per_node=1, timeout_s=10.0) as c:
        values = {bid(50_000 + i): os.urandom(2000 + i) for i in range(64)}
        assert all(c.put_many(list(values.items())))
        started = time.monotonic()

        def worker(k: int) -> None:
            for r in range(30):
                b = bid(50_000 + (k * 7 + r) % 64)
                assert c.get(b) == values[b]

        errors = run_concurrently(worker, 32)
        assert not errors, errors[:3]
        assert c.failed_requests == 0
        assert time.monotonic() - started < 30


# --------------------------------------------------------------------------- restart


def test_sigterm_is_a_clean_shutdown_and_blocks_survive(daemon_factory):
    d = daemon_factory(config=SMALL)
    rng = random.Random(3)
    items = {bid(i): rng.randbytes(rng.randrange(1, 100_000)) for i in range(80)}
    with wqs.Client([d.address]) as c:
        assert all(c.put_many(items.items()))
        # SIGTERM must not wait on clients: one idle (c), one stalled in the middle of a PUT.
        frame = p.encode_request(p.PutRequest(1, [(bid(10_000), os.urandom(100_000))]))
        with socket.create_connection(("127.0.0.1", d.port)) as stalled:
            stalled.sendall(p.encode_request(p.HelloRequest(0)) + frame[:50_000])
            t0 = time.monotonic()
            assert d.terminate() == 0
            assert time.monotonic() - t0 < 10
    assert "clean shutdown" in d.stderr_text()
    d.restart()
    assert "from checkpoint" in d.stderr_text()  # no device scan after a clean stop
    with wqs.Client([d.address]) as c:
        assert c.get_many(list(items)) == list(items.values())
        assert c.lookup_prefix(list(items)) == len(items)
        assert not c.exists(bid(10_000))  # the half-sent PUT never happened


def test_sigkill_mid_workload_keeps_every_acknowledged_block(daemon_factory):
    d = daemon_factory(config=SMALL)
    acked: dict[bytes, int] = {}  # id -> xxh3 of what was acknowledged
    lock = threading.Lock()
    stop = threading.Event()

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        with wqs.Client([d.address], timeout_s=3.0) as c:
            while not stop.is_set():
                b = rng.getrandbits(128).to_bytes(16, "big")
                v = rng.randbytes(rng.randrange(1, 64_000))
                if c.put(b, v):
                    with lock:
                        acked[b] = xxhash.xxh3_64_intdigest(v)
                else:
                    break  # the daemon is gone

    threads = [threading.Thread(target=writer, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(acked) < 150 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert d.kill() == -signal.SIGKILL  # while puts are in flight
    stop.set()
    for t in threads:
        t.join(10)
    assert len(acked) >= 150
    d.restart()
    assert "recovered" in d.stderr_text()
    with wqs.Client([d.address]) as c:
        ids = list(acked)
        got = c.get_many(ids)
    missing = [b.hex() for b, v in zip(ids, got) if v is None]
    assert not missing, f"{len(missing)} acknowledged blocks lost: {missing[:5]}"
    assert [xxhash.xxh3_64_intdigest(v) for v in got] == [acked[b] for b in ids]


# --------------------------------------------------------------------------- config errors


def test_unknown_config_key_exits_2_naming_it(daemon_factory):
    d = daemon_factory(config={"engine": {"regoin_size": "1M"}}, wait=False)
    assert d.wait() == 2
    err = d.stderr_text()
    assert "engine.regoin_size" in err and "region_size" in err  # the key, and a hint


def test_bad_config_value_exits_2_naming_it(daemon_factory):
    d = daemon_factory(config={"workers": "many"}, wait=False)
    assert d.wait() == 2
    assert "workers" in d.stderr_text()


def test_non_wqs_device_is_refused_not_formatted(daemon_factory, tmp_path):
    dev = tmp_path / "precious.img"
    content = (b"not a WQS device; someone's data " * 200_000)[: 8 * MiB]
    dev.write_bytes(content)
    d = daemon_factory(extra_args=["--device", str(dev)], wait=False)
    assert d.wait() == 1
    err = d.stderr_text()
    assert "wqs format" in err and str(dev) in err
    assert dev.read_bytes() == content  # untouched


# --------------------------------------------------------------------------- auth


TOKEN = "s3cret-Token-for-the-wire-test-42"


class RecordingProxy:
    """A TCP relay on loopback that keeps a copy of every byte in each direction."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.sent = bytearray()  # client -> server
        self.received = bytearray()  # server -> client
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self._sock.accept()
            except OSError:
                return
            b = socket.create_connection(self.upstream)
            self._socks += [a, b]
            threading.Thread(target=self._pump, args=(a, b, self.sent), daemon=True).start()
            threading.Thread(target=self._pump, args=(b, a, self.received), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bytearray) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    record += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self._sock.close()
        for s in self._socks:
            s.close()


@pytest.fixture(scope="module")
def auth_daemon(tmp_path_factory) -> Iterator[DaemonProcess]:
    f = DaemonFactory(tmp_path_factory.mktemp("auth"))
    try:
        yield f(config={**SMALL, "auth_token": TOKEN})
    finally:
        f.cleanup()


def test_sdk_without_token_is_refused(auth_daemon):
    with wqs.Client([auth_daemon.address]) as c:
        with pytest.raises(AuthError, match="requires an auth token"):
            c.put(bid(1), b"sneaky")
        with pytest.raises(AuthError):
            c.get(bid(1))
    with wqs.Client([auth_daemon.address], auth_token=TOKEN) as c:
        assert not c.exists(bid(1))  # nothing got in


def test_sdk_with_wrong_token_is_refused(auth_daemon):
    with wqs.Client([auth_daemon.address], auth_token="wrong-token") as c:
        with pytest.raises(AuthError, match="AUTH_FAILED"):
            c.put(bid(2), b"sneaky")
    with wqs.Client([auth_daemon.address], auth_token=TOKEN) as c:
        assert not c.exists(bid(2))


def test_sdk_with_right_token_works(auth_daemon):
    with wqs.Client([auth_daemon.address], auth_token=TOKEN) as c:
        assert c.put(bid(3), b"welcome") and c.get(bid(3)) == b"welcome"


def test_sdk_with_token_refuses_a_daemon_without_auth(shared):
    # Mutual authentication: a server that cannot prove the token could be anyone.
    with wqs.Client([shared.address], auth_token=TOKEN) as c:
        with pytest.raises(AuthError):
            c.put(bid(4), b"for the right server only")


def test_control_plane_auth(auth_daemon):
    with ControlClient(auth_daemon.control_address) as cc:
        with pytest.raises(AuthError):
            cc.health()
        with pytest.raises(AuthError):
            cc.evict_all()
    with ControlClient(auth_daemon.control_address, auth_token="wrong-token") as cc:
        with pytest.raises(AuthError):
            cc.stats()
    with ControlClient(auth_daemon.control_address, auth_token=TOKEN) as cc:
        assert cc.health() == "serving"
        assert cc.stats()["engine"]["capacity_bytes"] > 0


def test_token_never_crosses_the_wire_in_clear(auth_daemon):
    data_proxy = RecordingProxy(auth_daemon.address)
    control_proxy = RecordingProxy(auth_daemon.control_address)
    try:
        # Over TCP (the daemon's local socket would bypass the proxy).
        with wqs.Client([data_proxy.address], auth_token=TOKEN, transport="tcp") as c:
            assert c.put(bid(5), b"through the proxy") and c.get(bid(5)) == b"through the proxy"
        with wqs.Client([data_proxy.address], auth_token="wrong-token", transport="tcp") as c:
            with pytest.raises(AuthError):
                c.get(bid(5))
        with ControlClient(control_proxy.address, auth_token=TOKEN) as cc:
            assert cc.health() == "serving"
            cc.stats()
        time.sleep(0.1)
    finally:
        data_proxy.close()
        control_proxy.close()
    assert len(data_proxy.sent) > 100 and len(control_proxy.sent) > 100  # it did relay
    assert b"through the proxy" in data_proxy.sent  # (the traffic itself is not encrypted)
    for stream in (data_proxy.sent, data_proxy.received, control_proxy.sent,
                   control_proxy.received):
        for form in (TOKEN.encode(), TOKEN.encode().hex().encode(), TOKEN.encode("utf-16-le")):
            assert form not in stream
    assert TOKEN not in auth_daemon.stderr_text()  # nor in the daemon's log


# --------------------------------------------------------------------------- systemd notify


@pytest.fixture
def notify_socket() -> Iterator[tuple[str, socket.socket]]:
    d = tempfile.mkdtemp(prefix="wqsn")  # short: AF_UNIX paths are limited to 107 bytes
    path = os.path.join(d, "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    try:
        yield path, s
    finally:
        s.close()
        os.unlink(path)
        os.rmdir(d)


def _recv_until(s: socket.socket, want: str, timeout_s: float, log: list[str]) -> bool:
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            msg = s.recv(4096).decode()
        except socket.timeout:
            break
        log.extend(msg.split("\n"))
        if want in msg.split("\n"):
            return True
    return False


def test_systemd_notify_ready_watchdog_stopping(daemon_factory, notify_socket):
    path, s = notify_socket
    env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_PID", "JOURNAL_STREAM")}
    env.update(NOTIFY_SOCKET=path, WATCHDOG_USEC="1000000")  # ping every 0.5 s
    d = daemon_factory(config=SMALL, env=env, wait=False)
    got: list[str] = []
    assert _recv_until(s, "READY=1", 20, got), (got, d.stderr_text())
    # READY=1 comes only once the data plane serves.
    assert hello(d.address, timeout_s=2.0)
    assert any(m.startswith("STATUS=serving") for m in got), got
    assert "WATCHDOG=1" not in got  # nothing before READY
    t0 = time.monotonic()
    assert _recv_until(s, "WATCHDOG=1", 3, got), got
    assert _recv_until(s, "WATCHDOG=1", 3, got), got
    assert time.monotonic() - t0 < 2.5
    assert d.terminate() == 0
    assert _recv_until(s, "STOPPING=1", 5, got), got


def test_no_watchdog_pings_for_another_pid(daemon_factory, notify_socket):
    path, s = notify_socket
    env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="200000", WATCHDOG_PID="1")
    d = daemon_factory(config=SMALL, env=env, wait=False)
    got: list[str] = []
    assert _recv_until(s, "READY=1", 20, got), (got, d.stderr_text())
    assert not _recv_until(s, "WATCHDOG=1", 0.6, got), got


# --------------------------------------------------------------------------- metrics


def _scrape(d: DaemonProcess) -> dict[str, dict]:
    with urllib.request.urlopen(d.metrics_url, timeout=5) as r:
        assert r.status == 200
        text = r.read().decode()
    samples: dict[str, dict] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            samples.setdefault(smp.name, {})[tuple(sorted(smp.labels.items()))] = smp.value
    return samples


def _value(samples: dict, name: str, **labels: str) -> float:
    return sum(v for k, v in samples.get(name, {}).items()
               if all((lk, lv) in k for lk, lv in labels.items()))


def test_metrics_endpoint(daemon_factory):
    d = daemon_factory(config=SMALL)
    before = _scrape(d)
    assert _value(before, "wqs_up") == 1
    assert _value(before, "wqs_request_seconds_count", op="put") == 0
    assert _value(before, "wqs_request_seconds_count", op="get_shm") == 0  # from the start
    with wqs.Client([d.address], transport="tcp") as c:  # inline (shm: tests/test_shm.py)
        for i in range(10):
            assert c.put(bid(i), os.urandom(10_000))
        assert len([v for v in c.get_many([bid(i) for i in range(12)]) if v]) == 10
        c.exists(bid(1))
    after = _scrape(d)
    assert _value(after, "wqs_puts_total") == 10
    assert _value(after, "wqs_put_bytes_total") == 100_000
    assert _value(after, "wqs_gets_total") >= 12
    assert _value(after, "wqs_misses_total") >= 2
    assert _value(after, "wqs_request_seconds_count", op="put") == 10
    assert _value(after, "wqs_request_seconds_count", op="get") >= 1
    assert _value(after, "wqs_request_seconds_count", op="exists") >= 1
    buckets = {k: v for k, v in after["wqs_request_seconds_bucket"].items() if ("op", "put") in k}
    assert len(buckets) > 5
    assert max(buckets.values()) == 10  # the +Inf bucket holds every put
    assert _value(after, "wqs_request_seconds_sum", op="put") > 0


# --------------------------------------------------------------------------- control


def test_control_health_stats_evict_all_drain(daemon_factory, caplog):
    d = daemon_factory(config=SMALL)
    with ControlClient(d.control_address) as cc, wqs.Client([d.address]) as c:
        assert cc.health() == "serving"
        s0 = cc.stats()
        assert s0["engine"]["puts"] == 0
        items = [(bid(i), os.urandom(20_000)) for i in range(30)]
        assert all(c.put_many(items))
        assert c.get(bid(0)) == items[0][1]
        s1 = cc.stats()
        assert s1["engine"]["puts"] == 30
        assert s1["engine"]["used_bytes"] > s0["engine"]["used_bytes"]
        # A local client's puts of plain bytes go one-sided; a get without out buffers inline.
        assert s1["latency"]["put_shm"]["count"] >= 1 and s1["latency"]["get"]["count"] >= 1
        assert s1["uptime_seconds"] >= s0["uptime_seconds"]
        info = cc.node_info()
        assert info["data_address"] == d.address

        assert cc.evict_all() == 30
        assert c.exists_many([b for b, _ in items]) == [False] * 30
        assert c.get(bid(0)) is None
        assert cc.stats()["engine"]["index_entries"] == 0
        assert c.put(bid(99), b"after evict-all") and c.get(bid(99)) == b"after evict-all"

        r = cc.drain(5.0)
        assert r["drained"] and r["inflight_remaining"] == 0
        assert cc.health() == "not_serving"
        # The SDK reports refused requests, it does not raise: put False, get a miss,
        # and a warning that names the reason.
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="wqs.client"):
            failed = c.failed_requests
            assert c.put(bid(100), b"refused") is False
            assert c.get(bid(99)) is None
            assert c.failed_requests == failed + 2
        assert "BUSY" in caplog.text and "draining" in caplog.text
        # still answers control RPCs, and a SIGTERM still shuts it down cleanly
        assert cc.stats()["engine"]["puts"] == 31
    assert d.terminate() == 0
    d.restart()
    with wqs.Client([d.address]) as c:
        assert c.get(bid(99)) == b"after evict-all"  # a restart serves again
        assert c.get(bid(0)) is None  # evicted blocks stay evicted


def test_resume_after_drain_serves_every_shard_again(daemon_factory):
    """Drain a daemon of 2 shards, then Resume it: every shard refuses while drained and
    serves again after, with the blocks stored before the drain; no restart."""
    d = daemon_factory(config={**SMALL, "workers": 2})
    with ControlClient(d.control_address) as cc, wqs.Client([d.address],
                                                            timeout_s=2.0) as c:
        items = [(bid(i), os.urandom(10_000)) for i in range(40)]
        assert all(c.put_many(items))
        assert {shard_of(b, 2) for b, _ in items} == {0, 1}  # blocks on both shards
        assert cc.node_info()["labels"]["shards"] == "2"
        assert cc.drain(5.0)["drained"]
        failed = c.failed_requests
        assert c.get_many([b for b, _ in items]) == [None] * 40  # both shards refuse
        assert c.put(bid(100), b"refused") is False
        assert c.failed_requests > failed

        assert cc.resume() == {"status": "serving", "previous": "not_serving"}
        assert cc.health() == "serving"
        assert c.get_many([b for b, _ in items]) == [v for _, v in items]
        assert c.put(bid(100), b"after resume") and c.get(bid(100)) == b"after resume"
        assert cc.resume()["previous"] == "serving"  # a second resume changes nothing
        assert cc.drain(5.0)["drained"] and c.get(bid(100)) is None  # and drain again
        assert cc.resume()["status"] == "serving" and c.get(bid(100)) == b"after resume"
    assert d.terminate() == 0
