"""wqs.AsyncClient against real wqsd processes on loopback: round trips, out buffers,
limits and BUSY re-asks, several nodes, failing nodes, authentication, many coroutines on
shared connections, interop with wqs.Client, nodes re-cut into other shards, and that it
runs no thread of its own.

Every test runs its coroutine under a generous bound (RUN_BOUND_S): a hang fails the test
instead of stalling the run; no assertion is about how long something took."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import threading

import numpy as np
import pytest
import yaml

import wqs
from tests.daemons import DaemonFactory, DaemonProcess, daemon_factory  # noqa: F401
from wqs.config import ClientConfig, parse_hostport
from wqs.errors import AuthError, BlockTooLarge, ConfigError, NodeUnavailable, ProtocolError
from wqs.ring import shard_of
from wqs.rpc import protocol as p

KiB, MiB = 1 << 10, 1 << 20
ENGINE = {"region_size": "1M", "max_block_size": "2M", "dram_cache_bytes": "8M",
          "io_threads": 4}
SHARDED = {"engine": ENGINE, "workers": 3}
ONE_SHARD = {"engine": ENGINE, "workers": 1}
TOKEN = "async-client-secret"
RUN_BOUND_S = 120.0


def bid(i: int) -> bytes:
    return i.to_bytes(16, "big")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, RUN_BOUND_S))


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A daemon of three shards for the round trips (the tests use disjoint ids)."""
    f = DaemonFactory(tmp_path_factory.mktemp("async"))
    try:
        yield f(config=SHARDED, device_size="256M")  # no eviction in these tests
    finally:
        f.cleanup()


# --------------------------------------------------------------------------- round trips


def test_round_trips_of_many_sizes(shared):
    sizes = [0, 1, 15, 4095, 4096, 4097, 64 * KiB - 1, 64 * KiB, 64 * KiB + 1, 256 * KiB + 3,
             MiB, 2 * MiB]
    rng = random.Random(1)
    items = [(bid(1000 + i), rng.randbytes(n)) for i, n in enumerate(sizes * 3)]
    ids = [b for b, _ in items]

    async def main() -> None:
        async with wqs.AsyncClient([shared.address]) as c:
            assert await c.shards(shared.address) == 3
            assert await c.exists_many(ids) == [False] * len(ids)
            put = await c.put_many(items)
            assert put == [True] * len(items) and not put.errors
            got = await c.get_many(ids[::-1] + [bid(999)])
            assert got[:-1] == [v for _, v in items][::-1] and got[-1] is None
            assert all(type(g) is bytes for g in got[:-1])  # as Client returns
            assert await c.exists_many(ids + [bid(999)]) == [True] * len(ids) + [False]
            # single blocks, and int ids
            assert await c.put(12345, b"int id") and await c.get(12345) == b"int id"
            assert await c.exists(12345) and await c.delete(12345)
            assert not await c.delete(12345) and await c.get(12345) is None
            assert not await c.exists(12345)
            # a chain over three shards: lookup_prefix counts the leading run
            assert await c.lookup_prefix(ids) == len(ids)
            assert await c.delete_many([ids[5], bid(998)]) == [True, False]
            assert await c.lookup_prefix(ids) == 5
            assert await c.lookup_prefix([]) == 0
            assert (await c.get_many([]), await c.put_many([])) == ([], [])
            rtt = await c.ping()
            assert list(rtt) == [shared.address] and rtt[shared.address] > 0
            assert c.failed_requests == 0 and c.node_errors() == {shared.address: None}

    run(main())


def test_lookup_prefix_on_one_unsharded_node_longer_than_one_frame(daemon_factory):
    """LOOKUP_PREFIX requests, one frame of max_items after another while all are there."""
    d = daemon_factory(config=ONE_SHARD)
    ids = [bid(i) for i in range(5000)]  # more than max_items (4096)

    async def main() -> None:
        async with wqs.AsyncClient([d.address]) as c:
            assert await c.shards(d.address) == 1
            assert all(await c.put_many([(b, b"x") for b in ids]))
            assert await c.lookup_prefix(ids) == 5000
            assert await c.delete(ids[4500])
            assert await c.lookup_prefix(ids) == 4500
            assert await c.delete(ids[100])
            assert await c.lookup_prefix(ids) == 100

    run(main())


def test_outs_numpy_and_bytearray(shared):
    arr = np.arange(256 * 1024, dtype=np.float16).reshape(512, 512)  # 512 KiB
    small = np.arange(100, dtype=np.int32)
    blob = os.urandom(3 * 64 * KiB)

    async def main() -> None:
        async with wqs.AsyncClient([shared.address]) as c:
            ids = [bid(2000), bid(2001), bid(2002), bid(2003)]
            assert all(await c.put_many(zip(ids, [arr, small, blob, b"tiny"])))
            outs = [np.zeros_like(arr), np.zeros_like(small), bytearray(len(blob) + 10),
                    bytearray(4)]
            got = await c.get_many(ids + [bid(2999)], outs=outs + [bytearray(8)])
            assert not got.errors and got[4] is None
            assert np.array_equal(outs[0], arr) and np.array_equal(outs[1], small)
            assert bytes(outs[2][:len(blob)]) == blob and outs[2][len(blob):] == bytes(10)
            assert outs[3] == b"tiny"
            # each hit is a view of its out buffer, of the block's length
            for g, o in zip(got[:4], outs):
                assert isinstance(g, memoryview)
                assert np.shares_memory(np.frombuffer(g, np.uint8), np.frombuffer(o, np.uint8))
            assert [g.nbytes for g in got[:4]] == [arr.nbytes, small.nbytes, len(blob), 4]
            # get(out=)
            out = np.empty_like(arr)
            assert await c.get(ids[0], out=out) is True and np.array_equal(out, arr)
            untouched = np.full(8, 7, np.uint8)
            assert await c.get(bid(2999), out=untouched) is False and (untouched == 7).all()
            with pytest.raises(TypeError):
                await c.get(ids[0], out=bytes(arr.nbytes))  # read-only

    run(main())


def test_an_out_too_small_is_that_blocks_error_only(shared):
    big, mid = os.urandom(300 * KiB), os.urandom(5000)

    async def main() -> None:
        async with wqs.AsyncClient([shared.address], connections_per_node=1) as c:
            ids = [bid(2100), bid(2101), bid(2102), bid(2103)]
            assert all(await c.put_many(zip(ids, [big, mid, big, mid])))
            outs = [bytearray(len(big) - 1), bytearray(len(mid)), bytearray(len(big)),
                    bytearray(len(mid) - 1)]
            got = await c.get_many(ids, outs=outs)
            assert got[0] is None and got[3] is None
            assert isinstance(got.errors[0], BlockTooLarge) and isinstance(got.errors[3],
                                                                          BlockTooLarge)
            assert sorted(got.errors) == [0, 3]
            assert bytes(got[1]) == mid and bytes(got[2]) == big
            assert outs[0] == bytes(len(big) - 1)  # nothing written into the small one
            with pytest.raises(BlockTooLarge):
                await c.get(ids[0], out=bytearray(10))
            # the connections stayed in step
            assert await c.get_many(ids) == [big, mid, big, mid]
            assert c.failed_requests == 0

    run(main())


def test_a_block_too_large_for_the_node(shared):
    async def main() -> None:
        async with wqs.AsyncClient([shared.address]) as c:
            ok = os.urandom(1000)
            result = await c.put_many([(bid(2200), ok), (bid(2201), bytes(2 * MiB + 1)),
                                       (bid(2202), ok)])
            assert result == [True, False, True]
            assert list(result.errors) == [1] and isinstance(result.errors[1], BlockTooLarge)
            with pytest.raises(BlockTooLarge):
                await c.put(bid(2203), bytes(3 * MiB))
            assert await c.get_many([bid(2200), bid(2201), bid(2202)]) == [ok, None, ok]

    run(main())


def test_get_answers_marked_busy_are_asked_again(daemon_factory):
    """100 blocks of 256 KiB from a shard that holds at most 4 MiB for a connection: its
    answers carry a part of them and mark the rest BUSY."""
    d = daemon_factory(config={**ONE_SHARD, "max_connection_bytes": "4M",
                               "engine": {**ENGINE, "dram_cache_bytes": 0}},
                       device_size="128M")
    rng = random.Random(5)
    items = [(bid(i), rng.randbytes(256 * KiB)) for i in range(100)]
    ids = [b for b, _ in items]

    async def main() -> None:
        async with wqs.AsyncClient([d.address]) as c:
            assert all(await c.put_many(items))
            assert await c.get_many(ids) == [v for _, v in items]
            outs = [np.empty(256 * KiB, np.uint8) for _ in ids]
            got = await c.get_many(ids, outs=outs)
            assert not got.errors and [o.tobytes() for o in outs] == [v for _, v in items]
            assert c.failed_requests == 0

    run(main())
    # The same request, asked once by hand: the daemon did answer part of it BUSY.
    with socket.create_connection(parse_hostport(d.address), timeout=10) as s:
        s.sendall(p.encode_request(p.HelloRequest(1)) + p.encode_request(p.GetRequest(2, ids)))
        dec, answers = p.FrameDecoder(response=True), []
        while len(answers) < 2:
            if (msg := dec.next_message()) is not None:
                answers.append(msg)
                continue
            data = s.recv(1 << 20)
            assert data
            dec.feed(data)
    statuses = [it.status for it in answers[1].items]
    assert 0 < statuses.count(p.Status.BUSY) < 100 and p.Status.OK in statuses


# --------------------------------------------------------------------------- nodes


def _cluster(factory, n: int, config=None) -> list[DaemonProcess]:
    return [factory(name=f"node{i}", config=config or {"engine": ENGINE, "workers": 2})
            for i in range(n)]


def test_several_nodes_and_replicas(daemon_factory):
    nodes = _cluster(daemon_factory, 3)
    addresses = [d.address for d in nodes]
    rng = random.Random(7)
    items = [(bid(i), rng.randbytes(rng.randrange(0, 200_000))) for i in range(300)]
    ids = [b for b, _ in items]

    async def main() -> None:
        async with wqs.AsyncClient(addresses, timeout_s=3) as c:
            assert all(await c.put_many(items))
            owners = c.ring.group(ids)
            assert sorted(owners) == sorted(addresses)  # every node holds some
            assert await c.get_many(ids) == [v for _, v in items]
            assert await c.lookup_prefix(ids) == 300
            # each node holds exactly its share
            for address, idx in owners.items():
                async with wqs.AsyncClient([address]) as one:
                    assert await one.exists_many(ids) == [i in set(idx) for i in range(300)]
        # two replicas: a block survives the loss of one of its nodes
        config = ClientConfig(servers=addresses, replicas=2, timeout_s=3, connect_timeout_s=3)
        async with wqs.AsyncClient(config=config) as c:
            more = [(bid(1000 + i), rng.randbytes(5000)) for i in range(100)]
            assert all(await c.put_many(more))
            nodes[0].kill()
            got = await c.get_many([b for b, _ in more])
            assert got == [v for _, v in more]
            assert await c.exists_many([b for b, _ in more]) == [True] * 100
            assert await c.lookup_prefix([b for b, _ in more]) == 100

    run(main())


def test_a_node_killed_mid_run_makes_its_blocks_misses(daemon_factory):
    nodes = _cluster(daemon_factory, 3)
    victim = nodes[1]
    rng = random.Random(9)
    values = {bid(i): rng.randbytes(rng.randrange(1, 50_000)) for i in range(240)}
    ids = list(values)

    async def main() -> None:
        c = wqs.AsyncClient([d.address for d in nodes], timeout_s=2, connect_timeout_s=2)
        assert all(await c.put_many(values.items()))
        on_victim = {ids[i] for i in c.ring.group(ids)[victim.address]}
        assert on_victim
        killed = asyncio.Event()
        rounds_before = [0]
        checked_after = [0]

        async def worker(k: int) -> None:
            for _ in range(400):
                after = killed.is_set()
                mine = ids[k::8]
                got = await c.get_many(mine)
                for i, (b, g) in enumerate(zip(mine, got)):
                    if b not in on_victim:
                        assert g == values[b], got.errors.get(i)
                    elif after:
                        assert g is None and isinstance(got.errors[i], NodeUnavailable)
                    else:
                        assert g is None or g == values[b]
                if after:
                    checked_after[0] += 1
                    if checked_after[0] >= 40:
                        return
                else:
                    rounds_before[0] += 1
                await asyncio.sleep(0)

        workers = [asyncio.ensure_future(worker(k)) for k in range(8)]
        while rounds_before[0] < 16:
            await asyncio.sleep(0.01)
        victim.kill()
        killed.set()
        await asyncio.gather(*workers)
        assert checked_after[0] >= 40
        put = await c.put_many([(b, b"new") for b in ids])
        assert [put[i] for i in range(len(ids))] == [b not in on_victim for b in ids]
        assert all(isinstance(put.errors[i], NodeUnavailable)
                   for i, b in enumerate(ids) if b in on_victim)
        assert c.node_errors()[victim.address] is not None
        assert c.failed_requests > 0
        await c.close()

    run(main())


def test_a_frozen_node_times_out_and_comes_back(daemon_factory):
    """A node that accepts but never answers (SIGSTOP): its blocks are misses once the
    call's timeout passes, the node is skipped for a while, and used again once it is
    back."""
    nodes = _cluster(daemon_factory, 2)
    frozen = nodes[0]
    items = [(bid(i), os.urandom(3000)) for i in range(100)]
    ids = [b for b, _ in items]

    async def main() -> None:
        c = wqs.AsyncClient([d.address for d in nodes], timeout_s=1.0, connect_timeout_s=1.0)
        assert all(await c.put_many(items))
        on_frozen = {ids[i] for i in c.ring.group(ids)[frozen.address]}
        frozen.signal_all(signal.SIGSTOP)
        try:
            got = await c.get_many(ids)
            for i, b in enumerate(ids):
                if b in on_frozen:
                    assert got[i] is None and isinstance(got.errors[i], NodeUnavailable)
                else:
                    assert got[i] == items[i][1]
            assert "no answer within" in c.node_errors()[frozen.address]
            assert (await c.ping())[frozen.address] is None
        finally:
            frozen.signal_all(signal.SIGCONT)
        for _ in range(200):  # back after its retry interval
            got = await c.get_many(ids)
            if not got.errors:
                break
            await asyncio.sleep(0.1)
        assert got == [v for _, v in items]
        assert c.node_errors()[frozen.address] is None
        await c.close()

    run(main())


# --------------------------------------------------------------------------- auth


def test_auth_token_right_wrong_missing(daemon_factory, shared):
    d = daemon_factory(config={**SHARDED, "auth_token": TOKEN})

    async def main() -> None:
        async with wqs.AsyncClient([d.address], auth_token=TOKEN) as c:
            assert await c.put(bid(1), b"secret block") and await c.get(bid(1)) == b"secret block"
            assert await c.shards(d.address) == 3
        async with wqs.AsyncClient([d.address], auth_token="wrong-token") as c:
            with pytest.raises(AuthError):
                await c.get_many([bid(1)])
            with pytest.raises(AuthError):
                await c.connect()
        async with wqs.AsyncClient([d.address]) as c:
            with pytest.raises(AuthError, match="requires an auth token"):
                await c.put(bid(2), b"x")
        # mutual: a node that does not ask for the token cannot prove it knows it
        async with wqs.AsyncClient([shared.address], auth_token=TOKEN) as c:
            with pytest.raises(AuthError):
                await c.get(bid(1))

    run(main())


def test_a_peer_that_is_not_a_wqs_node_is_a_protocol_error():
    async def main() -> None:
        async def junk(reader, writer) -> None:
            await reader.readexactly(p.HEADER.size)  # the HELLO
            writer.write(b"HTTP/1.0 400 Bad Request\r\n\r\n" + b"x" * 64)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(junk, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with wqs.AsyncClient([f"127.0.0.1:{port}"]) as c:
                with pytest.raises(ProtocolError, match="bad magic"):
                    await c.get(bid(1))
        finally:
            server.close()
            await server.wait_closed()

    run(main())


# --------------------------------------------------------------------------- sharing


def test_many_coroutines_share_the_connections(shared):
    async def main() -> None:
        async with wqs.AsyncClient([shared.address], connections_per_node=2) as c:
            async def worker(k: int) -> None:
                rng = random.Random(k)
                for r in range(6):
                    mine = [(bid(100_000 + 1000 * k + 10 * r + j),
                             rng.randbytes(rng.choice([0, 100, 5000, 70_000, 200_000])))
                            for j in range(5)]
                    assert all(await c.put_many(mine))
                    assert await c.get_many([b for b, _ in mine]) == [v for _, v in mine]
                    outs = [bytearray(len(v)) for _, v in mine]
                    await c.get_many([b for b, _ in mine], outs=outs)
                    assert outs == [v for _, v in mine]
                    assert await c.exists(mine[0][0])
                    assert await c.delete(mine[1][0])

            await asyncio.gather(*(worker(k) for k in range(64)))
            node = c._nodes[shared.address]
            conns = node.all_conns()
            assert len(conns) <= 3 * 2 and all(not x.closed for x in conns)
            assert c.failed_requests == 0

    run(main())


def test_cancelled_calls_leave_the_connections_in_step(shared):
    rng = random.Random(11)
    items = [(bid(3000 + i), rng.randbytes(MiB)) for i in range(24)]
    ids = [b for b, _ in items]

    async def main() -> None:
        async with wqs.AsyncClient([shared.address], connections_per_node=1) as c:
            assert all(await c.put_many(items))
            for spins in range(0, 12, 2):
                outs = [bytearray(MiB) for _ in ids]
                task = asyncio.ensure_future(c.get_many(ids, outs=outs))
                put = asyncio.ensure_future(c.put_many(items[:6]))
                for _ in range(spins):
                    await asyncio.sleep(0)
                task.cancel()
                put.cancel()
                await asyncio.gather(task, put, return_exceptions=True)
                assert await c.get_many(ids) == [v for _, v in items]
            assert c.failed_requests == 0

    run(main())


def test_interop_with_the_sync_client(daemon_factory):
    nodes = _cluster(daemon_factory, 2)
    addresses = [d.address for d in nodes]
    rng = random.Random(13)
    a_items = [(bid(i), rng.randbytes(rng.randrange(0, 300_000))) for i in range(120)]
    s_items = [(bid(500 + i), rng.randbytes(rng.randrange(0, 300_000))) for i in range(120)]

    async def main() -> None:
        async with wqs.AsyncClient(addresses) as ac:
            with wqs.Client(addresses) as sc:
                assert all(await ac.put_many(a_items))
                assert sc.get_many([b for b, _ in a_items]) == [v for _, v in a_items]
                assert all(sc.put_many(s_items))
                assert await ac.get_many([b for b, _ in s_items]) == [v for _, v in s_items]
                chain = [b for b, _ in a_items]
                assert sc.lookup_prefix(chain) == await ac.lookup_prefix(chain) == 120
                assert await ac.delete_many(chain[:10]) == [True] * 10
                assert sc.exists_many(chain[:11]) == [False] * 10 + [True]
                assert await ac.shards(addresses[0]) == sc.shards(addresses[0]) == 2

    run(main())


# --------------------------------------------------------------------------- shards


def test_a_node_restarted_with_other_shards_is_relearnt(daemon_factory):
    """Same address, freshly formatted device, 2 shards then 4: the client routes by the
    new layout without failing a block."""
    d = daemon_factory(config={"engine": ENGINE, "workers": 2})
    items = [(bid(i), bytes([i]) * 1000) for i in range(200)]
    ids = [b for b, _ in items]

    def recut() -> None:
        assert d.terminate() == 0
        os.unlink(d.device_path)
        d.config["workers"] = 4
        d.config_path.write_text(yaml.safe_dump(d.config))
        d.start()

    async def main() -> None:
        async with wqs.AsyncClient([d.address], timeout_s=5) as c:
            assert all(await c.put_many(items))
            assert await c.shards(d.address) == 2
            await asyncio.to_thread(recut)  # the loop runs meanwhile, as in a server
            put = await c.put_many(items)
            assert put == [True] * 200 and not put.errors
            assert await c.shards(d.address) == 4
            assert await c.get_many(ids) == [v for _, v in items]
            assert await c.lookup_prefix(ids) == 200
        with wqs.Client([d.address]) as sc:  # where a fresh client looks for them
            assert sc.get_many(ids) == [v for _, v in items]

    run(main())


def test_a_block_refused_as_wrong_shard_is_sent_where_it_belongs(daemon_factory):
    """A client that routes by a stale layout (here: told the node has one shard) gets
    WRONG_SHARD for the misrouted blocks, re-learns the shards and sends them again."""
    d = daemon_factory(config={"engine": ENGINE, "workers": 2})
    items = [(bid(i), os.urandom(2000)) for i in range(100)]
    ids = [b for b, _ in items]
    assert {shard_of(b, 2) for b in ids} == {0, 1}

    async def main() -> None:
        async with wqs.AsyncClient([d.address]) as c:
            await c.connect()
            node = c._nodes[d.address]
            assert len(node.ports) == 2

            def stale() -> None:
                for conn in node.conns[1]:
                    if conn is not None:
                        conn.fail(NodeUnavailable("closed by the test"))
                node.ports = node.ports[:1]
                node.conns = node.conns[:1]

            stale()
            assert await c.put_many(items) == [True] * 100
            assert c.failed_requests == 1  # the one WRONG_SHARD answer
            assert len(node.ports) == 2
            stale()
            got = await c.get_many(ids)
            assert got == [v for _, v in items] and c.failed_requests == 2
            stale()
            assert await c.lookup_prefix(ids) == 100
        with wqs.Client([d.address]) as sc:
            assert sc.get_many(ids) == [v for _, v in items]

    run(main())


# --------------------------------------------------------------------------- threads


def test_the_async_client_starts_no_thread(daemon_factory, shared):
    dead = daemon_factory(config=ONE_SHARD)
    dead_address = dead.address
    dead.kill()  # a node that refuses connections: the failure path too

    async def main() -> None:
        before = threading.active_count()
        idents = {t.ident for t in threading.enumerate()}
        items = [(bid(4000 + i), os.urandom(i * 1000)) for i in range(50)]
        async with wqs.AsyncClient([shared.address]) as c:
            await c.connect()
            assert all(await c.put_many(items))
            assert await c.get_many([b for b, _ in items]) == [v for _, v in items]
            outs = [bytearray(len(v)) for _, v in items]
            await c.get_many([b for b, _ in items], outs=outs)
            assert await c.lookup_prefix([b for b, _ in items]) == 50
            assert all(await c.exists_many([b for b, _ in items]))
            assert (await c.ping())[shared.address] is not None
            assert all(await c.delete_many([b for b, _ in items]))
        async with wqs.AsyncClient([shared.address, dead_address], timeout_s=1) as c:
            got = await c.get_many([bid(i) for i in range(100)])
            assert any(isinstance(e, NodeUnavailable) for e in got.errors.values())
        assert threading.active_count() == before
        assert {t.ident for t in threading.enumerate()} == idents

    run(main())


# --------------------------------------------------------------------------- construction


def test_constructed_like_client(shared, tmp_path):
    path = tmp_path / "client.yaml"
    path.write_text(yaml.safe_dump({"servers": [shared.address], "timeout_s": 3}))

    async def main() -> None:
        for c in (wqs.AsyncClient([shared.address], timeout_s=3),
                  wqs.AsyncClient(config=ClientConfig(servers=[shared.address])),
                  wqs.AsyncClient.from_config(str(path))):
            async with c:
                assert await c.put(bid(5000), b"cfg") and await c.get(bid(5000)) == b"cfg"
        with pytest.raises(TypeError):
            wqs.AsyncClient([shared.address], config=ClientConfig(servers=[shared.address]))
        with pytest.raises(ConfigError):
            wqs.AsyncClient(config=ClientConfig(etcd={"endpoints": ["127.0.0.1:2379"]}))
        for transport in ("shm", "rdma"):  # not silently TCP
            with pytest.raises(ConfigError, match=f"TCP only, not {transport}"):
                wqs.AsyncClient([shared.address], transport=transport)
        c = wqs.AsyncClient([shared.address])
        await c.close()
        with pytest.raises(RuntimeError):
            await c.get(bid(5000))

    run(main())
