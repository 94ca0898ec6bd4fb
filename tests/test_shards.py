"""A daemon of several shard processes: routing, failures, restarts, and the memory a
misbehaving client can make it hold. Real wqsd processes on loopback."""

from __future__ import annotations

import os
import random
import signal
import socket
import time

import pytest

import wqs
from tests.daemons import daemon_factory, hello  # noqa: F401 (fixture)
from wqs.config import parse_hostport
from wqs.ring import shard_of
from wqs.rpc import protocol as p
from wqs.rpc.control import ControlClient

MiB = 1 << 20
SMALL = {"engine": {"region_size": "1M", "max_block_size": "4M", "dram_cache_bytes": "4M"},
         "log_level": "info"}


def bid(i: int) -> bytes:
    return i.to_bytes(16, "big")


def raw_hello(address: str) -> tuple[socket.socket, p.HelloResponse]:
    s = socket.create_connection(parse_hostport(address), timeout=5)
    s.sendall(p.encode_request(p.HelloRequest(1)))
    return s, read_one(s)


def read_one(s: socket.socket) -> p.Response:
    dec = p.FrameDecoder(response=True)
    while (msg := dec.next_message()) is None:
        data = s.recv(65536)
        assert data, "the daemon closed the connection"
        dec.feed(data)
    return msg


def test_each_shard_serves_its_own_blocks_on_its_own_port(daemon_factory):
    d = daemon_factory(config={**SMALL, "workers": 3})
    s, h = raw_hello(d.address)
    s.close()
    assert h.shard == 0 and len(h.shard_ports) == 3 and h.shard_ports[0] == d.port
    for k, port in enumerate(h.shard_ports):  # each port is the shard it says it is
        s, hk = raw_hello(f"127.0.0.1:{port}")
        s.close()
        assert hk.shard == k and hk.shard_ports == h.shard_ports
    items = [(bid(i), bytes([i % 251]) * 3000) for i in range(300)]
    with wqs.Client([d.address]) as c, ControlClient(d.control_address) as cc:
        assert c.shards(d.address) == 3
        assert all(c.put_many(items))
        assert c.get_many([b for b, _ in items]) == [v for _, v in items]
        assert c.lookup_prefix([b for b, _ in items]) == 300  # across shards
        stats = cc.stats()
        assert stats["engine"]["puts"] == 300  # the node's total: every shard's
        assert cc.node_info()["labels"]["shards"] == "3"
    owners = [shard_of(b, 3) for b, _ in items]
    assert all(abs(owners.count(k) - 100) < 35 for k in range(3))  # an even spread


def test_a_block_sent_to_the_wrong_shard_is_refused_with_a_clear_error(daemon_factory):
    d = daemon_factory(config={**SMALL, "workers": 2})
    block = next(bid(i) for i in range(100) if shard_of(bid(i), 2) == 1)
    s, _ = raw_hello(d.address)  # shard 0
    with s:
        s.sendall(p.encode_request(p.GetRequest(7, [block])))
        err = read_one(s)
        assert isinstance(err, p.ErrorResponse) and err.status == p.Status.WRONG_SHARD
        assert "belongs to shard 1 of 2" in err.message
        s.sendall(p.encode_request(p.PutRequest(8, [(block, b"x")])))
        err = read_one(s)
        assert isinstance(err, p.ErrorResponse) and err.status == p.Status.WRONG_SHARD
        s.sendall(p.encode_request(p.PingRequest(9)))  # and the connection goes on
        assert isinstance(read_one(s), p.PingResponse)


def test_a_killed_shard_stops_the_daemon_and_a_restart_keeps_every_block(daemon_factory):
    d = daemon_factory(config={**SMALL, "workers": 2})
    items = [(bid(i), os.urandom(10_000)) for i in range(200)]
    with wqs.Client([d.address]) as c:
        assert all(c.put_many(items))
    victim = d.shard_pids()[1]
    os.kill(victim, signal.SIGKILL)
    assert d.wait(20) == 1  # the daemon goes down, saying why
    log = d.stderr_text()
    assert "shard 1 exited unexpectedly" in log
    d.start()
    log = d.stderr_text()
    assert "shard 1: recovered" in log and "from scan" in log  # the killed one scans
    assert "shard 0: recovered 1" in log or "from checkpoint" in log
    with wqs.Client([d.address]) as c:
        assert c.get_many([b for b, _ in items]) == [v for _, v in items]


def test_a_killed_daemon_takes_its_shards_along(daemon_factory):
    d = daemon_factory(config={**SMALL, "workers": 2})
    shards = d.shard_pids()
    assert len(shards) == 2
    items = [(bid(i), os.urandom(5_000)) for i in range(100)]
    with wqs.Client([d.address]) as c:
        assert all(c.put_many(items))
    d.kill()  # waits for the shards, or fails if they outlive the supervisor
    assert not any(os.path.exists(f"/proc/{pid}/status") and
                   "Z" not in open(f"/proc/{pid}/status").read().split("State:")[1][:4]
                   for pid in shards)
    d.start()  # at once: the device lock and the ports are free again
    assert d.stderr_text().count("from scan") == 2
    with wqs.Client([d.address]) as c:
        assert c.get_many([b for b, _ in items]) == [v for _, v in items]


def test_workers_must_match_how_the_device_is_cut(daemon_factory):
    d = daemon_factory(config={**SMALL, "workers": 2})
    with wqs.Client([d.address]) as c:
        assert c.put(bid(1), b"kept")
    assert d.terminate() == 0
    d.config["workers"] = 3
    d.config_path.write_text(__import__("yaml").safe_dump(d.config))
    d.spawn()
    assert d.wait(20) == 1
    assert "workers is 3 but" in d.stderr_text() and "--shards 3" in d.stderr_text()
    d.config["workers"] = "auto"  # auto takes the device as it is cut
    d.config_path.write_text(__import__("yaml").safe_dump(d.config))
    d.start()
    with wqs.Client([d.address]) as c:
        assert c.shards(d.address) == 2 and c.get(bid(1)) == b"kept"


def test_clients_relearn_a_node_recut_into_other_shards(daemon_factory):
    """The daemon comes back on the same address with another number of shards: a
    client that still routes by the old layout re-learns it instead of failing for ever."""
    d = daemon_factory(config={**SMALL, "workers": 2})
    items = [(bid(i), bytes([i]) * 100) for i in range(60)]
    with wqs.Client([d.address], timeout_s=3) as c:
        assert all(c.put_many(items))
        assert d.terminate() == 0
        os.unlink(d.device_path)  # a new device, cut into 3
        d.config["workers"] = 3
        d.config_path.write_text(__import__("yaml").safe_dump(d.config))
        d.start()
        deadline = time.monotonic() + 10
        while not all(c.put_many(items)):  # the first calls may fail; then it re-learns
            assert time.monotonic() < deadline, "the client never re-learned the shards"
            time.sleep(0.2)
        assert c.shards(d.address) == 3
        assert c.get_many([b for b, _ in items]) == [v for _, v in items]


def test_shard_ports_are_fixed_when_configured(daemon_factory, tmp_path):
    from tests.daemons import pick_ports

    extra = pick_ports(span=2)
    d = daemon_factory(config={**SMALL, "workers": 3, "shard_ports": [extra, extra + 1]})
    s, h = raw_hello(d.address)
    s.close()
    assert h.shard_ports == (d.port, extra, extra + 1)
    assert hello(f"127.0.0.1:{extra + 1}")


def test_a_device_formatted_before_shards_is_served_as_one(daemon_factory, tmp_path):
    """The plain engine layout (what `wqs format --shards 1` and older versions write)."""
    from wqs.cli import main as wqs_main

    dev = tmp_path / "old.dev"
    assert wqs_main(["format", str(dev), "--size", "32M", "--region-size", "1M",
                     "--shards", "1"]) == 0
    d = daemon_factory(config={**SMALL, "device": str(dev)})
    with wqs.Client([d.address]) as c:
        assert c.shards(d.address) == 1
        assert c.put(bid(5), b"five") and c.get(bid(5)) == b"five"


# ---- a client that floods or stalls cannot make the daemon grow without bound --------

BOUNDED = {**SMALL, "workers": 1, "max_connection_bytes": "4M", "max_inflight_bytes": "8M",
           "frame_timeout_s": 2.0, "engine": {**SMALL["engine"], "dram_cache_bytes": 0}}


def _put_frame(rid: int, i: int, size: int) -> bytes:
    return p.encode_request(p.PutRequest(rid, [(bid(i), bytes([i % 251]) * size)]))


def test_a_client_that_sends_but_never_reads_holds_bounded_memory(daemon_factory):
    d = daemon_factory(config=BOUNDED, device_size="256M")
    # Warm up the shard's buffers and pools on the path the flood takes (TCP).
    with wqs.Client([d.address], transport="tcp") as c:
        assert all(c.put_many([(bid(10**6 + i), bytes(MiB)) for i in range(16)]))
    base = d.rss_kib()
    floods = []
    for _ in range(4):  # four connections sending 1 MiB PUTs as fast as TCP takes them
        s, _ = raw_hello(d.address)
        s.setblocking(False)
        floods.append([s, memoryview(b""), 0])
    sent = 0
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        progress = False
        for f in floods:
            if not f[1]:
                f[2] += 1
                f[1] = memoryview(_put_frame(f[2], f[2] % 8, MiB))
            try:
                n = f[0].send(f[1])
            except BlockingIOError:
                continue
            f[1], sent, progress = f[1][n:], sent + n, True
        if not progress:
            time.sleep(0.01)
    grown = d.rss_kib() - base
    # Staged payloads are bounded by max_inflight_bytes (8 MiB); answers nobody reads by
    # MAX_UNSENT per connection; the rest waits in the kernel's socket buffers.
    assert grown < 48 * 1024, f"the daemon grew by {grown} KiB while {sent >> 20} MiB were sent"
    assert sent > 16 * MiB  # it did take data meanwhile (and then stopped reading)
    with wqs.Client([d.address], timeout_s=10) as c:  # others are still served
        assert c.put(bid(1), b"ok") and c.get(bid(1)) == b"ok"
    for f in floods:
        f[0].close()


def test_a_client_that_asks_but_never_reads_holds_bounded_memory(daemon_factory):
    d = daemon_factory(config=BOUNDED, device_size="256M")
    with wqs.Client([d.address], transport="tcp") as c:  # the path the flood takes
        assert all(c.put_many([(bid(i), os.urandom(MiB)) for i in range(40)]))
        assert all(c.get_many([bid(i) for i in range(8)]))
    base = d.rss_kib()
    s, _ = raw_hello(d.address)
    s.setblocking(False)
    rng = random.Random(1)
    asked = 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # GETs of 1 MiB blocks, answers never read
        try:
            s.send(p.encode_request(p.GetRequest(asked, [bid(rng.randrange(40))])))
            asked += 1
        except BlockingIOError:
            time.sleep(0.01)
    grown = d.rss_kib() - base
    assert grown < 48 * 1024, f"grew by {grown} KiB after {asked} unread GETs of 1 MiB"
    with wqs.Client([d.address], timeout_s=10) as c:
        assert c.get(bid(3)) is not None
    s.close()


def test_a_client_stalled_mid_upload_is_dropped_and_nothing_is_stored(daemon_factory):
    d = daemon_factory(config=BOUNDED)
    s, _ = raw_hello(d.address)
    frame = _put_frame(1, 77, 100_000)
    s.sendall(frame[: len(frame) // 2])
    s.settimeout(10)
    started = time.monotonic()
    assert s.recv(1) == b""  # closed by the daemon after frame_timeout_s
    assert 1.5 < time.monotonic() - started < 9
    with wqs.Client([d.address]) as c:
        assert not c.exists(bid(77))
        assert c.put(bid(77), b"later") and c.get(bid(77)) == b"later"
