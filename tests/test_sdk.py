"""The SDK against real daemons and against peers that misbehave on purpose."""

from __future__ import annotations

import socket
import threading
import time

import pytest

import wqs
from tests.daemons import daemon_factory  # noqa: F401 (fixture)
from wqs.errors import NodeUnavailable
from wqs.rpc import protocol as p


def bid(i: int) -> bytes:
    return i.to_bytes(16, "big")


def test_lookup_prefix_over_more_ids_than_one_frame_holds(daemon_factory):
    d = daemon_factory(config={"workers": 1, "engine": {"dram_cache_bytes": 0}},
                       device_size="128M")
    ids = [bid(i) for i in range(5000)]  # > max_items (4096): two LOOKUP_PREFIX frames
    with wqs.Client([d.address]) as c:
        for k in range(0, len(ids), 500):
            assert all(c.put_many([(b, b"x") for b in ids[k : k + 500]]))
        assert c.lookup_prefix(ids) == 5000
        assert c.delete(ids[4500])
        assert c.lookup_prefix(ids) == 4500  # the hole in the second frame
        assert c.delete(ids[100])
        assert c.lookup_prefix(ids) == 100  # the first frame's count ends it


def test_the_client_reads_its_token_file(daemon_factory, tmp_path):
    d = daemon_factory(config={"auth_token": "t0ken-in-a-file"})
    token = tmp_path / "token"
    token.write_text("t0ken-in-a-file\n")
    with wqs.Client([d.address], auth_token_file=str(token)) as c:
        assert c.put(bid(1), b"one") and c.get(bid(1)) == b"one"


class FakeNode:
    """A TCP peer that answers HELLO like a node, then GETs with rows for other ids."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        dec = p.FrameDecoder()
        while True:
            data = conn.recv(65536)
            if not data:
                return
            dec.feed(data)
            while (msg := dec.next_message()) is not None:
                if isinstance(msg, p.HelloRequest):
                    conn.sendall(p.encode_response(p.HelloResponse(
                        msg.request_id, bytes(32), False, p.Limits())))
                elif isinstance(msg, p.GetRequest):  # a well-formed answer, wrong ids
                    rows = [p.GetItem(bid(999), p.Status.OK, b"not yours")
                            for _ in msg.ids]
                    conn.sendall(p.encode_response(p.GetResponse(msg.request_id, rows)))


def test_an_answer_for_other_blocks_is_refused_not_returned():
    fake = FakeNode()
    with wqs.Client([fake.address], timeout_s=2) as c:
        got = c.get_many([bid(1), bid(2)])
    assert got == [None, None]
    assert all(isinstance(e, NodeUnavailable) and "does not answer the GET" in str(e)
               for e in got.errors.values())


def test_a_node_that_never_answers_its_handshake_does_not_fail_the_others(daemon_factory):
    """A black hole (accepts, never speaks) among live nodes: its blocks miss within the
    timeouts, every other node's blocks come back, and the live nodes stay up."""
    live = [daemon_factory(config={"workers": 1}) for _ in range(2)]
    hole = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nobody answers
    hole_address = f"127.0.0.1:{hole.getsockname()[1]}"
    ids = [bid(i) for i in range(300)]
    with wqs.Client([d.address for d in live], timeout_s=1.0,
                    connect_timeout_s=0.5) as writer:
        assert all(writer.put_many([(b, b) for b in ids]))
    # Connecting to the hole takes longer than the others' answers may: they must still
    # count (the call's time for answers starts once every request is out).
    with wqs.Client([*(d.address for d in live), hole_address], timeout_s=0.6,
                    connect_timeout_s=0.8) as c:
        owner = dict(zip(ids, c.ring.assign(ids)))
        for _ in range(2):  # connect to the live nodes first, then the hole every time
            started = time.monotonic()
            got = c.get_many(ids)
            assert time.monotonic() - started < 0.8 + 0.6 + 1
            for b, value in zip(ids, got):
                if owner[b] == hole_address:
                    assert value is None
                else:  # stored on a live node before the hole joined: found there
                    assert value == b or c.ring.assign([b])[0] == hole_address
        errors = c.node_errors()
        assert errors[hole_address] is not None
        assert all(errors[d.address] is None for d in live)
    hole.close()


def test_a_block_larger_than_the_node_takes_fails_alone(daemon_factory):
    d = daemon_factory(config={"workers": 1, "engine": {"max_block_size": "1M"}})
    with wqs.Client([d.address]) as c:
        results = c.put_many([(bid(1), b"small"), (bid(2), bytes(2 << 20)), (bid(3), b"s")])
        assert list(results) == [True, False, True]
        assert "exceeds" in str(results.errors[1]) and set(results.errors) == {1}
        with pytest.raises(wqs.errors.BlockTooLarge):
            c.put(bid(2), bytes(2 << 20))
