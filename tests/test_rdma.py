"""The RDMA transport's sans-IO parts (endpoints, regions, credits, the link machine) run
everywhere; the verbs layer needs pyverbs, and traffic needs an RDMA device."""

from __future__ import annotations

import importlib.util
import random
from collections import deque

import pytest

from wqs.errors import ProtocolError
from wqs.rdma import probe
from wqs.rdma.link import RDMA, RECV, SEND, LinkMachine, PostRdma, PostRecv, PostSend
from wqs.rdma.verbs import MAX_RD_ATOMIC, Completion, _gid_bytes, _gid_text
from wqs.rdma.wire import (
    ENDPOINT, MEMORY, Credits, Endpoint, LinkState, Memory, RdmaError, check_peer,
    describe_wc, path_mtu)

GID = bytes.fromhex("fe800000000000000202c9fffe000001")


def ep(**kw) -> Endpoint:
    base = dict(qpn=0x1234, psn=77, lid=0, mtu=5, port=1, gid=GID, recv_depth=8,
                recv_size=8192)
    base.update(kw)
    return Endpoint(**base)


# --- wire ---------------------------------------------------------------------------

def test_endpoints_and_regions_round_trip():
    e = ep()
    assert ENDPOINT.size == 36 and MEMORY.size == 24
    assert Endpoint.unpack(e.pack()) == e and e.global_route
    m = Memory(3, 0xABCD, 0x7F0000001000, 1 << 20)
    assert Memory.unpack(m.pack()) == m


@pytest.mark.parametrize("field, value", [
    ("qpn", 0), ("qpn", 1 << 24), ("psn", 1 << 24), ("mtu", 6), ("mtu", 0), ("port", 0),
    ("gid", b"short"), ("recv_depth", 0), ("recv_size", 100), ("recv_size", 2 << 20),
])
def test_endpoints_out_of_range_are_refused(field, value):
    with pytest.raises(ProtocolError, match="RDMA endpoint out of range"):
        ep(**{field: value})


def test_bad_bytes_are_protocol_errors():
    with pytest.raises(ProtocolError, match="expected 36"):
        Endpoint.unpack(b"x" * 35)
    with pytest.raises(ProtocolError, match="out of range"):  # qpn 0 in the bytes
        Endpoint.unpack(ENDPOINT.pack(0, 0, 0, 5, 1, GID, 8, 8192))
    with pytest.raises(ProtocolError, match="empty or wraps"):
        Memory.unpack(MEMORY.pack(1, 2, 2**64 - 10, 100))
    with pytest.raises(ProtocolError, match="empty or wraps"):
        Memory.unpack(MEMORY.pack(1, 2, 4096, 0))


def test_peers_must_share_a_fabric_and_agree_on_the_mtu():
    ib = ep(lid=5, gid=bytes(16))
    assert not ib.global_route
    with pytest.raises(RdmaError, match="not on the same fabric"):
        check_peer(ep(), ib)
    check_peer(ep(), ep(mtu=3))
    assert path_mtu(ep(mtu=5), ep(mtu=3)) == 3


def test_completion_errors_read_as_words():
    assert describe_wc(12) == "transport retry counter exceeded (the peer is unreachable)"
    assert describe_wc(10, 0x88) == "remote access error (a bad rkey or range) (vendor error 0x88)"
    assert describe_wc(99) == "status 99"
    s = LinkState()
    assert not s.usable
    s.ready()
    assert s.completion(0)
    assert not s.completion(5, what="send") and s.reason.startswith("send: work request flushed")
    assert not s.completion(0)  # failed for good


def test_credits():
    c = Credits(2)
    assert c.take() and c.take() and not c.take() and c.available() == 0
    c.give()
    assert c.take()


def test_gids_as_text_and_bytes():
    assert _gid_text(GID) == "fe80:0000:0000:0000:0202:c9ff:fe00:0001"
    assert _gid_bytes(_gid_text(GID)) == GID


# --- the link machine ---------------------------------------------------------------

def ok(wr_id: int, n: int = 0, opcode: int = 0) -> Completion:
    return Completion(wr_id, 0, opcode, n, 0)


def test_start_posts_every_receive_and_frames_wait_for_slots_and_credits():
    m = LinkMachine(4, 8192, 2, ep(recv_depth=3), counts_answers=True)
    m.start()
    assert m.take() == [PostRecv(k) for k in range(4)]
    sent = []
    for k in range(5):
        assert m.send(bytes([k]) * 10, lambda k=k: sent.append(k))
    posts = m.take()
    assert [type(a) for a in posts] == [PostSend, PostSend]  # two send slots
    m.completed(ok(posts[0].wr_id), None)
    assert sent == [0]
    (third,) = m.take()
    assert third.frame == bytes([2]) * 10  # in order
    m.completed(ok(posts[1].wr_id), None)
    assert m.take() == []  # a slot is free, but the peer's 3 receives are all promised
    m.answered()
    (fourth,) = m.take()
    assert fourth.frame == bytes([3]) * 10
    with pytest.raises(ValueError, match="exceeds the peer's 8192-byte receives"):
        m.send(bytes(8193))


def test_received_frames_come_out_and_their_slot_is_reposted():
    m = LinkMachine(2, 8192, 2, ep(), counts_answers=False)
    m.start()
    m.take()
    slots = {1: b"frame-one!"}
    frames = m.completed(ok(1 << 2 | RECV, 5, 128), lambda slot, n: slots[slot][:n])
    assert frames == [b"frame"] and m.take() == [PostRecv(1)]


def test_reads_in_flight_are_bounded_and_writes_are_not():
    m = LinkMachine(1, 8192, 1, ep(), counts_answers=False)
    m.start()
    m.take()
    done = []
    for k in range(MAX_RD_ATOMIC + 3):
        m.transfer(False, [(0x1000 * k, 10, 7)], 0x9000, 42, lambda good, k=k: done.append(k))
    m.transfer(True, [(0x5000, 10, 7)], 0x9000, 42, lambda good: done.append("w"))
    posts = m.take()
    assert sum(not p.write for p in posts) == MAX_RD_ATOMIC and sum(p.write for p in posts) == 1
    m.completed(ok(posts[0].wr_id, opcode=2), None)
    (next_read,) = m.take()
    assert not next_read.write and next_read.local == ((0x1000 * MAX_RD_ATOMIC, 10, 7),)
    assert done == [0]


def test_an_error_completion_fails_everything_and_posts_nothing_more():
    m = LinkMachine(2, 8192, 1, ep(), counts_answers=True)
    m.start()
    m.take()
    sent, done = [], []
    m.send(b"a", lambda: sent.append("a"))
    m.send(b"b", lambda: sent.append("b"))  # waits for the send slot
    m.transfer(True, [(1, 1, 1)], 2, 3, done.append)
    posts = m.take()
    bad = Completion(posts[0].wr_id, 12, 0, 0, 0)  # retry exceeded
    assert m.completed(bad, None) == []
    assert done == [False] and sent == ["a"]  # what it held goes back; "b" is dropped
    assert not m.send(b"c") and m.take() == []
    assert "transport retry counter exceeded" in m.state.reason
    m.transfer(False, [(1, 1, 1)], 2, 3, done.append)
    assert done == [False, False]


class Wire:
    """Two link machines joined by a perfect fabric: SENDs land in posted receives (a
    SEND with none posted is an RNR: the test fails), transfers copy bytes."""

    def __init__(self, a: LinkMachine, b: LinkMachine, memory: dict[int, bytearray]) -> None:
        self.ends = {id(a): (a, b), id(b): (b, a)}
        self.posted = {id(a): deque(), id(b): deque()}
        self.bufs = {id(a): {}, id(b): {}}
        self.memory = memory
        self.inbox = {id(a): [], id(b): []}

    def run(self, end: LinkMachine, on_frames) -> None:
        me, peer = self.ends[id(end)]
        for action in me.take():
            if isinstance(action, PostRecv):
                self.posted[id(me)].append(action.slot)
            elif isinstance(action, PostSend):
                assert self.posted[id(peer)], "RNR: a SEND with no receive posted"
                slot = self.posted[id(peer)].popleft()
                self.bufs[id(peer)][slot] = action.frame
                self.inbox[id(peer)].append(ok(slot << 2 | RECV, len(action.frame), 128))
                me.completed(ok(action.wr_id), None)
            else:
                for addr, n, _ in action.local:
                    if action.write:
                        self.memory[action.remote_addr][:n] = self.memory[addr][:n]
                    else:
                        self.memory[addr][:n] = self.memory[action.remote_addr][:n]
                me.completed(ok(action.wr_id, opcode=1 if action.write else 2), None)
        inbox, self.inbox[id(me)] = self.inbox[id(me)], []
        for c in inbox:
            on_frames(me.completed(c, lambda slot, n, me=me: self.bufs[id(me)][slot][:n]))


def test_a_burst_of_requests_never_outruns_the_peers_receives():
    client_ep, server_ep = ep(recv_depth=3), ep(recv_depth=4)
    client = LinkMachine(3, 8192, 8, server_ep, counts_answers=True)
    server = LinkMachine(4, 8192, 2, client_ep, counts_answers=False)
    memory = {0x100: bytearray(b"client's block"), 0x200: bytearray(14)}
    wire = Wire(client, server, memory)
    client.start()
    server.start()
    answers = []
    wire.run(server, None)  # each end's receives are posted before the link is up
    wire.run(client, None)

    def on_request(frames):
        for f in frames:  # the daemon answers each request, after a one-sided write
            server.transfer(True, [(0x100, 14, 1)], 0x200, 9, lambda good: None)
            server.send(b"answer:" + f)

    def on_answer(frames):
        for f in frames:
            answers.append(f)
            client.answered()

    rng = random.Random(5)
    for k in range(100):
        client.send(b"req%d" % k)
        for _ in range(rng.randint(0, 2)):
            wire.run(client, on_answer)
            wire.run(server, on_request)
    for _ in range(200):
        wire.run(client, on_answer)
        wire.run(server, on_request)
    assert answers == [b"answer:req%d" % k for k in range(100)]
    assert memory[0x200] == memory[0x100] and client.idle and server.idle


# --- verbs ----------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("pyverbs") is None,
                    reason="pyverbs is not importable here (Debian: python3-pyverbs, "
                           "linked into the venv by scripts/link-pyverbs.sh)")
def test_the_verbs_layer_loads_pyverbs_and_says_why_there_is_no_device():
    from wqs.rdma.verbs import Nic, _pyverbs

    pv = _pyverbs()
    assert pv.enums.IBV_WR_RDMA_WRITE != pv.enums.IBV_WR_RDMA_READ
    found = probe()
    if found.available:
        nic = Nic()
        assert len(nic.gid) == 16
        nic.close()
    else:
        with pytest.raises(RdmaError, match="RDMA"):
            Nic()


def test_probe_says_exactly_what_is_missing():
    found = probe()
    assert found.reason
    if not found.available:
        assert any(w in found.reason for w in ("pyverbs", "RDMA"))


def test_slots_are_first_fit_aligned_and_merge_when_given_back():
    from wqs.rdma.wire import Slots

    s = Slots(64 << 10)
    a, b, c = s.take(100), s.take(5000), s.take(4096)
    assert (a, b, c) == (0, 4096, 12288)
    assert s.take(64 << 10) is None
    s.give(b, 5000)
    assert s.take(8192) == 4096  # the hole is reused
    s.give(4096, 8192)
    s.give(a, 100)
    s.give(c, 4096)
    assert s.free == [(0, 64 << 10)] and s.available == 64 << 10
    with pytest.raises(AssertionError, match="given back twice"):
        s.give(0, 4096)


# --- a daemon and a client where there is no RDMA device ------------------------------

from tests.daemons import daemon_factory  # noqa: E402,F401 (fixture)

needs_no_rdma = pytest.mark.skipif(probe().available, reason="this machine has an RDMA "
                                   "device: the no-device behaviour is not what it shows")


@needs_no_rdma
def test_without_a_device_the_daemon_says_why_and_clients_get_a_clear_error(daemon_factory):  # noqa: F811
    import socket

    import wqs
    from wqs.errors import TransportUnavailable
    from wqs.rpc import protocol as p

    d = daemon_factory()
    assert "RDMA transport: not served (" in d.stderr_text()
    with wqs.Client([d.address], transport="rdma") as c:
        with pytest.raises(TransportUnavailable, match="transport rdma: .*(pyverbs|RDMA)"):
            c.put(b"\x01" * 16, b"x")
    # RDMA_CONNECT by hand: refused with the reason, the connection goes on.
    with socket.create_connection(("127.0.0.1", d.port)) as s:
        s.sendall(p.encode_request(p.HelloRequest(1))
                  + p.encode_request(p.RdmaConnectRequest(2, ep().pack()))
                  + p.encode_request(p.PingRequest(3)))
        dec, msgs = p.FrameDecoder(response=True), []
        while len(msgs) < 3:
            dec.feed(s.recv(65536))
            while (m := dec.next_message()) is not None:
                msgs.append(m)
    assert isinstance(msgs[1], p.ErrorResponse) and msgs[1].status == p.Status.BAD_REQUEST
    assert "RDMA is not served by this node: not served:" in msgs[1].message
    assert isinstance(msgs[2], p.PingResponse)


@needs_no_rdma
def test_rdma_on_without_a_device_refuses_to_start(daemon_factory):  # noqa: F811
    d = daemon_factory(config={"rdma": {"enabled": "on"}}, wait=False)
    assert d.wait() != 0
    assert "RdmaError" in d.stderr_text() and ("pyverbs" in d.stderr_text()
                                              or "RDMA" in d.stderr_text())


@pytest.mark.skipif(not probe().available, reason=f"needs an RDMA device: {probe().reason}")
def test_blocks_move_over_an_rdma_link(daemon_factory):  # noqa: F811
    import wqs

    d = daemon_factory(config={"rdma": {"enabled": "on"}})
    with wqs.Client([d.address], transport="rdma") as c:
        mem = c.shared_memory(4 << 20)
        views = mem.block_views(65536, 8)
        for k, v in enumerate(views[:4]):
            v[:] = bytes([k]) * 65536
        assert all(c.put_many([(k + 1, views[k]) for k in range(4)]))
        got = c.get_many([k + 1 for k in range(4)], outs=views[4:])
        assert [bytes(g) for g in got] == [bytes([k]) * 65536 for k in range(4)]
        assert c.get(1) == bytes([0]) * 65536  # bytes: through the bounce memory
        assert c.put(9, b"plain bytes") and c.get(9) == b"plain bytes"
