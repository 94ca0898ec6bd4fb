"""The gRPC control plane against a real engine on a file, over a real socket."""

from __future__ import annotations

import os
import threading
import time
from concurrent import futures
from typing import Callable, Iterator

import grpc
import pytest

import wqs
from tests.conftest import MiB, block_id
from tests.daemons import daemon_factory  # noqa: F401 (fixture)
from wqs.engine import Engine
from wqs.errors import AuthError, NodeUnavailable, RemoteError
from wqs.metrics import make_registry
from wqs.procstat import ProcessUsage
from wqs.rpc import auth
from wqs.rpc import control_pb2 as pb
from wqs.rpc import control_pb2_grpc as pb_grpc
from wqs.rpc.control import (
    AUTH_HEADER, ClusterNodeInfo, ControlClient, ControlServer, ControlService, DrainResult,
    NonceTable, format_auth_header, start_control_server,
)

TOKEN = "s3cret-token"


@pytest.fixture
def engine(open_engine, small_config) -> Engine:
    return open_engine(small_config, size=16 * MiB)


@pytest.fixture
def serve(engine: Engine) -> Iterator[Callable[..., ControlServer]]:
    """serve(token=None, **kwargs) -> a started ControlServer on 127.0.0.1, a free port."""
    servers: list[ControlServer] = []

    def _serve(token: str | None = None, **kwargs) -> ControlServer:
        kwargs.setdefault("node_info", {"node_id": "node-a", "data_address": "127.0.0.1:7070",
                                        "transport": "tcp"})
        s = start_control_server(lambda: engine, "127.0.0.1:0", auth_token=token, **kwargs)
        servers.append(s)
        return s

    yield _serve
    for s in servers:
        s.stop(None).wait(5)


def _client(server: ControlServer, token: str | None = None) -> ControlClient:
    return ControlClient(f"127.0.0.1:{server.port}", auth_token=token, timeout=5.0)


def test_every_rpc_without_auth(serve, engine):
    server = serve()
    engine.put(block_id(1), b"x" * 5000)
    engine.put(block_id(2), b"y" * 100)
    assert engine.get(block_id(1)) == b"x" * 5000
    assert engine.get(block_id(99)) is None
    with _client(server) as c:
        assert c.health() == "serving"

        st = c.stats()
        assert st["node_id"] == "node-a"
        assert st["engine"]["puts"] == 2 and st["engine"]["gets"] == 2
        assert st["engine"]["misses"] == 1 and st["engine"]["index_entries"] == 2
        assert set(st["engine"]) == set(engine.stats().as_dict())
        assert st["latency"] == {}  # no RequestMetrics attached

        info = c.node_info()
        einfo = engine.info()
        assert info["node_id"] == "node-a" and info["data_address"] == "127.0.0.1:7070"
        assert info["control_address"] == f"127.0.0.1:{server.port}"
        assert info["device_uuid"] == einfo["uuid"]
        assert info["capacity_bytes"] == einfo["capacity_bytes"]
        assert info["format_version"] == einfo["format_version"]
        assert info["num_regions"] == einfo["num_regions"] >= 3
        assert info["software_version"]
        assert info["uptime_seconds"] >= 0 and info["status"] == "serving"
        assert info["labels"] == {"transport": "tcp"}

        nodes = c.cluster_map()
        assert len(nodes) == 1
        n = nodes[0]
        assert n["node_id"] == "node-a" and n["address"] == "127.0.0.1:7070"
        assert n["state"] == "serving" and n["capacity_bytes"] == einfo["capacity_bytes"]
        assert 0 < n["used_bytes"] <= n["capacity_bytes"]
        assert n["hit_rate"] == pytest.approx(0.5)

        assert c.evict_all() == 2
        assert engine.get(block_id(1)) is None
        assert c.stats()["engine"]["index_entries"] == 0

        d = c.drain(timeout_s=1.0)
        assert d["drained"] and d["status"] == "not_serving"
        assert c.health() == "not_serving"


def test_drain_callback_and_status(serve):
    calls: list[float] = []
    release = threading.Event()

    def on_drain(timeout: float) -> DrainResult:
        calls.append(timeout)
        release.wait(5)
        return DrainResult(drained=False, inflight_remaining=3, message="slow client")

    server = serve(on_drain=on_drain)
    with _client(server) as c:
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(c.drain(timeout_s=2.5)))
        t.start()
        deadline = time.monotonic() + 5
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert c.health() == "draining"  # while the callback runs
        release.set()
        t.join(10)
        assert calls == [2.5]
        assert result == {"drained": False, "inflight_remaining": 3, "status": "draining",
                          "message": "slow client",
                          "elapsed_seconds": pytest.approx(result["elapsed_seconds"])}
        assert c.health() == "draining"  # not fully drained yet
        server.service.set_status("serving")
        assert c.health() == "serving"


def test_resume_undoes_drain(serve):
    """Resume calls the daemon's callback and serves again, from any state; a serving
    node stays serving."""
    resumed: list[str] = []
    server = serve(on_drain=lambda timeout: DrainResult(True),
                   on_resume=lambda: resumed.append(server.service.status))
    with _client(server) as c:
        assert c.drain(1.0)["status"] == "not_serving"
        assert c.resume() == {"status": "serving", "previous": "not_serving"}
        assert resumed == ["not_serving"]  # the data plane is resumed before the status
        assert c.health() == "serving" and c.node_info()["status"] == "serving"
        assert c.resume() == {"status": "serving", "previous": "serving"}
        assert len(resumed) == 2


def test_resume_while_a_drain_waits_wins(serve):
    """A Resume that arrives while a Drain still waits for in-flight requests is not
    undone when that Drain finishes."""
    waiting, release = threading.Event(), threading.Event()

    def on_drain(timeout: float) -> DrainResult:
        waiting.set()
        release.wait(5)
        return DrainResult(drained=True)

    server = serve(on_drain=on_drain, on_resume=lambda: None)
    with _client(server) as c:
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(c.drain(timeout_s=3.0)))
        t.start()
        assert waiting.wait(5)
        assert c.resume() == {"status": "serving", "previous": "draining"}
        release.set()
        t.join(10)
        assert result["drained"] and result["status"] == "serving"
        assert c.health() == "serving"


def test_resume_refused_by_the_daemon_says_why(serve):
    def on_resume() -> None:
        raise RuntimeError("the daemon is stopping")

    server = serve(on_resume=on_resume)
    with _client(server) as c:
        c.drain(1.0)
        with pytest.raises(RemoteError, match="cannot resume: the daemon is stopping"):
            c.resume()
        assert c.health() == "not_serving"  # unchanged


def test_engine_not_open(engine):
    current: list[Engine | None] = [None]
    server = start_control_server(lambda: current[0], "127.0.0.1:0",
                                  {"node_id": "n", "data_address": "h:1"}, None)
    try:
        with _client(server) as c:
            assert c.health() == "not_serving"
            assert c.node_info()["device_uuid"] == ""
            with pytest.raises(NodeUnavailable):
                c.stats()
            with pytest.raises(NodeUnavailable, match="not open"):
                c.resume()
            current[0] = engine
            assert c.health() == "serving"
            assert c.stats()["engine"]["capacity_bytes"] > 0
    finally:
        server.stop(None)


def test_stats_carry_request_latency(serve, engine):
    registry, metrics = make_registry(lambda: engine, process_metrics=False)
    for _ in range(10):
        metrics.observe("get", 120e-6)
    metrics.observe("put", 0.004)
    metrics.error("put", "IOError")
    server = serve(request_metrics=metrics)
    with _client(server) as c:
        lat = c.stats()["latency"]
    assert set(lat) >= {"put", "get", "exists", "delete", "lookup_prefix"}
    assert lat["get"]["count"] == 10 and 100e-6 <= lat["get"]["p50_seconds"] <= 150e-6
    assert lat["put"]["count"] == 1 and lat["put"]["errors"] == 1
    assert lat["exists"]["count"] == 0


def test_stats_report_the_daemons_process_usage_and_it_grows(daemon_factory):
    """A real wqsd: Stats carries its getrusage, and serving requests makes it grow."""
    d = daemon_factory()
    with ControlClient(d.control_address, timeout=5.0) as cc, wqs.Client([d.address]) as c:
        p0 = cc.stats()["process"]
        assert p0 is not None and p0["processes"] == 1 + c.shards(d.address)
        assert p0["user_s"] + p0["system_s"] > 0  # start-up alone costs CPU
        before = cc.process_usage()
        items = [(block_id(i), bytes([i % 251]) * 65536) for i in range(200)]
        for k in range(0, len(items), 10):
            assert all(c.put_many(items[k:k + 10]))
        for b, data in items:
            assert c.get(b) == data
        after = cc.process_usage()
        uptime = cc.stats()["uptime_seconds"]
    assert after.processes == before.processes == p0["processes"]
    assert after.cpu_s > before.cpu_s
    assert after.user_s >= before.user_s and after.system_s >= before.system_s
    # 220 requests, each a wait on a socket by some daemon thread
    assert after.voluntary_ctx > before.voluntary_ctx
    assert after.involuntary_ctx >= before.involuntary_ctx
    # and no more CPU than the daemon could have had since it started
    assert after.cpu_s < uptime * (os.cpu_count() or 1) + 1


def test_stats_take_process_usage_from_the_provider(serve):
    """A daemon of several processes passes a function that adds up its shards."""
    shards = [ProcessUsage(1.5, 0.25, 100, 7), ProcessUsage(0.5, 0.75, 20, 3)]
    server = serve(usage_provider=lambda: sum(shards))
    with _client(server) as c:
        assert c.stats()["process"] == {"user_s": 2.0, "system_s": 1.0, "voluntary_ctx": 120,
                                        "involuntary_ctx": 10, "processes": 2}
        assert c.process_usage() == ProcessUsage(2.0, 1.0, 120, 10, processes=2)


def test_daemon_without_process_usage_is_told_apart_from_zero(engine):
    """What an older daemon answers (no process field): None and an error, never zeros."""

    class OldService(ControlService):
        def Stats(self, request, context):
            resp = super().Stats(request, context)
            resp.ClearField("process")
            return resp

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_ControlServicer_to_server(OldService(lambda: engine, {"node_id": "old"}), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with ControlClient(f"127.0.0.1:{port}", timeout=5.0) as c:
            st = c.stats()
            assert st["node_id"] == "old" and st["process"] is None
            with pytest.raises(RemoteError, match="does not report its process usage"):
                c.process_usage()
    finally:
        server.stop(None)


def test_cluster_provider(serve):
    rows = [ClusterNodeInfo("a", "10.0.0.1:7070", "serving", 100, 10, 0.9),
            ClusterNodeInfo("b", "10.0.0.2:7070", "draining", 200, 0, 0.0)]
    server = serve(cluster_provider=lambda: rows)
    with _client(server) as c:
        got = c.cluster_map()
    assert [(n["node_id"], n["state"], n["capacity_bytes"]) for n in got] == [
        ("a", "serving", 100), ("b", "draining", 200)]


# ---- authentication ------------------------------------------------------------------


def test_auth_right_token_works(serve):
    server = serve(TOKEN)
    with _client(server, TOKEN) as c:
        assert c.health() == "serving"
        assert c.stats()["node_id"] == "node-a"
        assert c.node_info()["node_id"] == "node-a"
        assert len(c.cluster_map()) == 1
        assert c.evict_all() == 0
        assert c.drain(1.0)["drained"]
        assert c.resume()["status"] == "serving"
    # One nonce per channel: several calls used one challenge.
    assert len(server.service._nonces) == 1


def test_auth_missing_token_is_unauthenticated(serve):
    server = serve(TOKEN)
    with _client(server) as c:
        with pytest.raises(AuthError) as exc:
            c.health()
        with pytest.raises(AuthError):
            c.resume()  # nobody without the token undoes an operator's drain
    assert exc.value.__cause__.code() == grpc.StatusCode.UNAUTHENTICATED


def test_auth_wrong_token_fails(serve):
    server = serve(TOKEN)
    with _client(server, "not-the-token") as c:
        for call in (c.health, c.stats, c.evict_all):
            with pytest.raises(AuthError) as exc:
                call()
            assert exc.value.__cause__.code() == grpc.StatusCode.UNAUTHENTICATED


def test_client_with_token_refuses_daemon_without_auth(serve):
    server = serve(None)
    with _client(server, TOKEN) as c:
        with pytest.raises(AuthError, match="does not ask for authentication"):
            c.health()


def _raw_call(server: ControlServer, header: str | None) -> grpc.StatusCode:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.ControlStub(ch)
        try:
            stub.Health(pb.HealthRequest(), timeout=5,
                        metadata=((AUTH_HEADER, header),) if header is not None else None)
        except grpc.RpcError as e:
            return e.code()
        return grpc.StatusCode.OK


def _challenge(server: ControlServer) -> bytes:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        r = pb_grpc.ControlStub(ch).GetChallenge(pb.GetChallengeRequest(), timeout=5)
    assert r.auth_required and r.ttl_seconds > 0
    return bytes(r.server_nonce)


def test_auth_forged_or_unknown_nonce_fails(serve):
    server = serve(TOKEN)
    # A nonce the server never issued, with a proof that is right for it: rejected.
    forged = auth.make_nonce()
    assert _raw_call(server, format_auth_header(TOKEN, forged, auth.make_nonce())) == \
        grpc.StatusCode.UNAUTHENTICATED
    # The same with an issued nonce works (sanity check of the raw path).
    issued = _challenge(server)
    client_nonce = auth.make_nonce()
    assert _raw_call(server, format_auth_header(TOKEN, issued, client_nonce)) == grpc.StatusCode.OK
    # Reusing it on the same session is fine ...
    assert _raw_call(server, format_auth_header(TOKEN, issued, client_nonce)) == grpc.StatusCode.OK
    # ... but another client nonce cannot take over a nonce already bound.
    assert _raw_call(server, format_auth_header(TOKEN, issued, auth.make_nonce())) == \
        grpc.StatusCode.UNAUTHENTICATED
    # A tampered proof, garbage, and no header at all.
    fresh = _challenge(server)
    good = format_auth_header(TOKEN, fresh, auth.make_nonce())
    tampered = good[:-2] + ("00" if good[-2:] != "00" else "11")
    for header in (tampered, "zz:zz:zz", "abc", "", None):
        assert _raw_call(server, header) == grpc.StatusCode.UNAUTHENTICATED
    # A failed proof did not burn the nonce for its rightful owner.
    assert _raw_call(server, good) == grpc.StatusCode.OK


def test_auth_header_does_not_contain_token(serve):
    server = serve(TOKEN)
    header = format_auth_header(TOKEN, _challenge(server), auth.make_nonce())
    assert TOKEN not in header and TOKEN.encode().hex() not in header


def test_nonce_table_expiry_and_bound():
    now = [1000.0]
    table = NonceTable(ttl=60.0, max_entries=3, clock=lambda: now[0])
    a = table.issue()
    cn = auth.make_nonce()
    assert table.check(a, cn) is None and table.bind(a, cn)
    now[0] += 61
    assert "expired" in table.check(a, cn)
    nonces = [table.issue() for _ in range(5)]
    assert len(table) == 3  # bounded: the oldest were dropped
    assert table.check(nonces[0], cn) is not None
    assert table.check(nonces[-1], cn) is None


def test_client_renews_expired_nonce(serve):
    server = serve(TOKEN, nonce_ttl=0.3)
    with _client(server, TOKEN) as c:
        assert c.health() == "serving"
        time.sleep(0.5)  # the nonce expired on the server; the client fetches a new one
        assert c.health() == "serving"


def test_client_recovers_when_server_forgets_nonce(serve):
    server = serve(TOKEN)
    with _client(server, TOKEN) as c:
        assert c.health() == "serving"
        server.service._nonces._nonces.clear()  # as after a daemon restart
        assert c.health() == "serving"  # one UNAUTHENTICATED, one new challenge, retried


def test_unreachable_daemon():
    with ControlClient("127.0.0.1:1", timeout=0.5) as c:
        with pytest.raises(NodeUnavailable):
            c.health()


def test_port_in_use_is_an_error(serve):
    server = serve()
    with pytest.raises(OSError):
        start_control_server(lambda: None, f"127.0.0.1:{server.port}", {"node_id": "x"}, None)
