"""A 3-node cluster of real daemons: placement, fan-out, failures, rejoin, etcd membership.

Each daemon runs in its own network namespace with its own address when the test may
create namespaces (root with iproute2); elsewhere the same tests run on loopback ports,
and a network cut is simulated by freezing the daemon (SIGSTOP), which a client sees
the same way: packets go unanswered.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

import wqs
from tests.daemons import DaemonProcess, daemon_factory, pick_ports  # noqa: F401
from tests.netns import NetnsHosts, netns_unavailable
from wqs.rpc.control import ControlClient

TIMEOUT_S = 1.5  # the client's bound on every call in these tests
DEVICE_SIZE = "64M"  # per daemon; the spread test needs more (100k blocks of one unit)
NODES = 3


@pytest.fixture
def hosts():
    """NetnsHosts for 3 nodes, or None where namespaces are not permitted."""
    reason = netns_unavailable()
    if reason is not None:
        yield None
        return
    h = NetnsHosts(NODES)
    try:
        yield h.setup()
    finally:
        h.teardown()


class Cluster:
    def __init__(self, factory, hosts: NetnsHosts | None, config: dict | None = None,
                 device_size: str = DEVICE_SIZE) -> None:
        self.factory = factory
        self.hosts = hosts
        self.config = config
        self.device_size = device_size
        self.nodes: list[DaemonProcess] = []

    def start_node(self, i: int, config: dict | None = None) -> DaemonProcess:
        cfg = config if config is not None else self.config
        if self.hosts is not None:
            d = self.factory(port=7070, host=self.hosts.host_ip(i), netns=self.hosts.ns(i),
                             name=f"node{i}", config=cfg, device_size=self.device_size)
        else:
            d = self.factory(name=f"node{i}", config=cfg, device_size=self.device_size)
        self.nodes.append(d)
        return d

    def start(self, n: int = NODES) -> "Cluster":
        for i in range(n):
            self.start_node(i)
        return self

    @property
    def addresses(self) -> list[str]:
        return [d.address for d in self.nodes]

    def client(self, **options) -> wqs.Client:
        options.setdefault("timeout_s", TIMEOUT_S)
        options.setdefault("connect_timeout_s", TIMEOUT_S)
        return wqs.Client(self.addresses, **options)

    def cut(self, i: int) -> None:
        if self.hosts is not None:
            self.hosts.cut(i)
        else:
            self.nodes[i].signal_all(signal.SIGSTOP)

    def heal(self, i: int) -> None:
        if self.hosts is not None:
            self.hosts.heal(i)
        else:
            self.nodes[i].signal_all(signal.SIGCONT)

    def engine_stats(self, i: int) -> dict:
        with ControlClient(self.nodes[i].control_address, timeout=5.0) as cc:
            return cc.stats()["engine"]


def ids_of(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.getrandbits(128).to_bytes(16, "big") for _ in range(n)]


def test_even_spread_and_balanced_fan_out(daemon_factory, hosts):
    cluster = Cluster(daemon_factory, hosts, device_size="256M").start()
    client = cluster.client()
    ids = ids_of(100_000)
    for k in range(0, len(ids), 4096):
        batch = ids[k : k + 4096]
        assert all(client.put_many([(b, b[:4]) for b in batch]))
    counts = [cluster.engine_stats(i)["index_entries"] for i in range(NODES)]
    assert sum(counts) == len(ids)
    for c in counts:  # equal weights: a third each, within 10 %
        assert abs(c - len(ids) / NODES) <= 0.10 * len(ids) / NODES, counts
    # The client's ring agrees with where the blocks are.
    groups = client.ring.group(ids)
    assert sorted(len(v) for v in groups.values()) == sorted(counts)
    # A batch fans out to every node at once and comes back in the caller's order.
    before = [cluster.engine_stats(i)["gets"] for i in range(NODES)]
    sample = random.Random(1).sample(ids, 3000)
    assert client.get_many(sample) == [b[:4] for b in sample]
    served = [cluster.engine_stats(i)["gets"] - before[i] for i in range(NODES)]
    assert sum(served) == len(sample)
    assert all(abs(s - 1000) < 200 for s in served), served
    assert client.lookup_prefix(sample) == len(sample)
    assert client.lookup_prefix(sample[:50] + ids_of(1, seed=99) + sample[50:]) == 50
    client.close()


def test_weighted_ring_follows_weights(daemon_factory, hosts):
    cluster = Cluster(daemon_factory, hosts).start()
    # In any unit, e.g. capacity in bytes: an 8 TB node beside two 4 TB ones.
    weights = dict(zip(cluster.addresses, (8e12, 4e12, 4e12)))
    client = cluster.client(weights=weights)
    ids = ids_of(6_000, seed=3)
    for k in range(0, len(ids), 4096):
        assert all(client.put_many([(b, b"x") for b in ids[k : k + 4096]]))
    counts = [cluster.engine_stats(i)["index_entries"] for i in range(NODES)]
    share = counts[0] / sum(counts)
    assert abs(share - 0.5) < 0.05, counts  # 8 of 16
    client.close()


def _workload(client: wqs.Client, ids: list[bytes], stop: threading.Event,
              durations: list[float], errors: list[BaseException]) -> None:
    rng = random.Random(5)
    while not stop.is_set():
        batch = rng.sample(ids, 60)
        started = time.monotonic()
        try:
            if rng.random() < 0.5:
                client.put_many([(b, b * 64) for b in batch])
            else:
                client.get_many(batch)
        except BaseException as e:  # every failure must be reported, not raised
            errors.append(e)
        durations.append(time.monotonic() - started)


def _run_with_failure(client, ids, fail, after_s: float = 0.6, run_s: float = 3.0):
    stop, durations, errors = threading.Event(), [], []
    worker = threading.Thread(target=_workload, args=(client, ids, stop, durations, errors))
    worker.start()
    time.sleep(after_s)
    fail()
    time.sleep(run_s)
    stop.set()
    worker.join(timeout=4 * TIMEOUT_S + 5)
    assert not worker.is_alive(), "a call hung"
    assert not errors, errors
    assert durations, "no call completed"
    # Every call came back within the timeout (plus scheduling slack on 2 cores).
    assert max(durations) < 2 * TIMEOUT_S + 1.0, max(durations)


def _owned(client: wqs.Client, ids: list[bytes], node: str) -> list[bytes]:
    return [b for b in ids if client.ring.node_for(b) == node]


def test_killed_node_then_rejoin(daemon_factory, hosts):
    cluster = Cluster(daemon_factory, hosts).start()
    client = cluster.client()
    ids = ids_of(600, seed=7)
    assert all(client.put_many([(b, b * 64) for b in ids]))
    victim = cluster.nodes[1]
    _run_with_failure(client, ids, victim.kill)
    lost = _owned(client, ids, victim.address)
    kept = [b for b in ids if b not in set(lost)]
    assert lost and kept
    # The dead node's blocks are misses, its puts fail (reported), the others work.
    started = time.monotonic()
    got = client.get_many(ids)
    assert time.monotonic() - started < 2 * TIMEOUT_S + 1.0
    assert all(got[i] is None for i, b in enumerate(ids) if b in set(lost))
    assert all(got[i] == b * 64 for i, b in enumerate(ids) if b not in set(lost))
    puts = client.put_many([(b, b"new") for b in lost[:5] + kept[:5]])
    assert puts == [False] * 5 + [True] * 5
    assert client.node_errors()[victim.address] is not None
    # It comes back on the same address with its data (recovered after SIGKILL).
    victim.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and client.get(lost[0]) is None:
        time.sleep(0.3)
    assert client.get_many(lost) == [b * 64 for b in lost]
    assert client.node_errors()[victim.address] is None
    client.close()


def test_cut_off_node_then_heal(daemon_factory, hosts):
    cluster = Cluster(daemon_factory, hosts).start()
    client = cluster.client()
    ids = ids_of(600, seed=8)
    assert all(client.put_many([(b, b * 64) for b in ids]))
    _run_with_failure(client, ids, lambda: cluster.cut(2))
    cut_off = set(_owned(client, ids, cluster.nodes[2].address))
    got = client.get_many(ids)
    assert all((got[i] is None) == (b in cut_off) for i, b in enumerate(ids))
    cluster.heal(2)
    deadline = time.monotonic() + 10
    probe = next(iter(cut_off))
    while time.monotonic() < deadline and client.get(probe) is None:
        time.sleep(0.3)
    assert client.get_many(ids) == [b * 64 for b in ids]
    client.close()


def test_slow_node_does_not_serialise_the_others(daemon_factory, hosts):
    cluster = Cluster(daemon_factory, hosts).start()
    client = cluster.client()
    ids = ids_of(300, seed=9)
    assert all(client.put_many([(b, b) for b in ids]))
    cluster.nodes[0].signal_all(signal.SIGSTOP)  # alive but not answering
    try:
        started = time.monotonic()
        got = client.get_many(ids)
        elapsed = time.monotonic() - started
        frozen = set(_owned(client, ids, cluster.nodes[0].address))
        assert all((got[i] is None) == (b in frozen) for i, b in enumerate(ids))
        # One timeout for the frozen node, not one per node in turn.
        assert elapsed < TIMEOUT_S + 1.0, elapsed
        # Now known down: the next call does not wait for it at all.
        started = time.monotonic()
        client.get_many(ids)
        assert time.monotonic() - started < TIMEOUT_S
    finally:
        cluster.nodes[0].signal_all(signal.SIGCONT)
    client.close()


def test_replicas_survive_a_killed_node(daemon_factory, hosts):
    cluster = Cluster(daemon_factory, hosts).start()
    client = cluster.client(replicas=2)
    ids = ids_of(300, seed=12)
    assert all(client.put_many([(b, b * 8) for b in ids]))
    # Two copies on distinct nodes: 600 entries over the three nodes.
    counts = [cluster.engine_stats(i)["index_entries"] for i in range(NODES)]
    assert sum(counts) == 2 * len(ids)
    for b in ids[:20]:
        owners = client.ring.nodes_for(b, 2)
        assert len(set(owners)) == 2
    cluster.nodes[0].kill()
    # Every block still has a live replica: reads fall through to it.
    assert client.get_many(ids) == [b * 8 for b in ids]
    assert client.exists_many(ids) == [True] * len(ids)
    assert client.lookup_prefix(ids) == len(ids)
    assert client.delete_many(ids[:10]) == [True] * 10
    client.close()


# ---- etcd membership ----------------------------------------------------------------


@pytest.fixture
def etcd(tmp_path, hosts):
    """A real etcd on loopback (and on each test host's gateway address)."""
    if shutil.which("etcd") is None:
        pytest.skip("needs etcd (Debian package etcd-server)")
    client_port = pick_ports(span=1)
    peer_port = pick_ports(span=1)
    listen = [f"http://127.0.0.1:{client_port}"]
    if hosts is not None:
        listen += [f"http://{hosts.gateway_ip(i)}:{client_port}" for i in range(NODES)]
    proc = subprocess.Popen(
        ["etcd", "--name", "wqs-test", "--data-dir", str(tmp_path / "etcd"),
         "--listen-client-urls", ",".join(listen),
         "--advertise-client-urls", f"http://127.0.0.1:{client_port}",
         "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
         "--initial-cluster", f"wqs-test=http://127.0.0.1:{peer_port}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "etcd.log", "wb"),
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", client_port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"etcd did not start: {(tmp_path / 'etcd.log').read_text()[-2000:]}")
            time.sleep(0.1)
    try:
        yield client_port
    finally:
        proc.kill()
        proc.wait()


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_etcd_join_and_leave(daemon_factory, hosts, etcd, tmp_path, capsys):
    def node_config(i: int) -> dict:
        endpoint = f"{hosts.gateway_ip(i)}:{etcd}" if hosts is not None else f"127.0.0.1:{etcd}"
        return {"node_id": f"node{i}",  # one host name for all: the default would clash
                "etcd": {"endpoints": [endpoint], "prefix": "/wqs/test/", "lease_ttl": 2}}

    cluster = Cluster(daemon_factory, hosts)
    for i in range(2):
        cluster.start_node(i, node_config(i))
    client = wqs.Client(config=wqs.client.ClientConfig(
        etcd={"endpoints": [f"127.0.0.1:{etcd}"], "prefix": "/wqs/test/"},
        timeout_s=TIMEOUT_S, connect_timeout_s=TIMEOUT_S))
    try:
        assert set(client.nodes) == set(cluster.addresses)
        # A third daemon joins: clients see it without a restart, and it gets blocks.
        cluster.start_node(2, node_config(2))
        _wait_for(lambda: len(client.nodes) == 3, 10, "the third node to join")
        ids = ids_of(3000, seed=11)
        assert all(client.put_many([(b, b"v") for b in ids]))
        counts = [cluster.engine_stats(i)["index_entries"] for i in range(3)]
        assert all(c > 600 for c in counts), (
            f"blocks per node {counts}; ring {client.ring!r} with vnodes "
            f"{[client.ring.vnodes(a) for a in client.nodes]}")
        # The cluster map (and `wqs stat --cluster`) lists every registered node.
        with ControlClient(cluster.nodes[0].control_address) as cc:
            mapped = {row["address"] for row in cc.cluster_map()}
        assert mapped == set(cluster.addresses)
        from wqs.cli import main as wqs_cli

        assert wqs_cli(["--servers", cluster.nodes[0].address, "stat", "--cluster",
                        "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert {r["address"] for r in rows} == set(cluster.addresses)
        # A client config naming only etcd is enough for the CLI too.
        config = tmp_path / "client.yaml"
        config.write_text(f"etcd: {{endpoints: ['127.0.0.1:{etcd}'], prefix: /wqs/test/}}\n")
        assert wqs_cli(["--config", str(config), "stat", "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert {r["address"] for r in rows} == set(cluster.addresses)
        # A clean stop leaves at once (lease revoked); a killed node when its lease ends.
        assert cluster.nodes[2].terminate() == 0
        _wait_for(lambda: len(client.nodes) == 2, 5, "the stopped node to leave")
        cluster.nodes[1].kill()
        _wait_for(lambda: set(client.nodes) == {cluster.nodes[0].address}, 10,
                  "the killed node's lease to expire")
        assert client.get(ids[0]) in (b"v", None)  # answers, never hangs
    finally:
        client.close()
