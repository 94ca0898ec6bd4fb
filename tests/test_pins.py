"""Pins: leases on blocks a client is about to load. The pin table's rules, the engine
keeping pinned blocks through reclaim, a device held by pins answering NO_SPACE rather
than hanging, and the PIN request through a daemon and the SDK."""

from __future__ import annotations

import dataclasses
import random

import pytest

import wqs
from tests.conftest import MiB, block_id
from tests.daemons import daemon_factory  # noqa: F401 (fixture)
from wqs.engine.index import block_tag
from wqs.engine.pins import PinTable
from wqs.errors import NoSpace


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_pin_expires_by_itself_and_is_cut_to_the_longest_lease():
    clock = Clock()
    pins = PinTable(max_pin_s=10, max_bytes=1 << 20, clock=clock)
    assert pins.pin(1, 4096, 60)  # asked for a minute, granted ten seconds
    clock.t += 9.9
    assert pins.pinned(1)
    clock.t += 0.2
    assert not pins.pinned(1) and pins.live() == [] and pins.nbytes == 0
    assert not pins.pin(2, 4096, 0) and not pins.pin(2, 4096, -1)  # no lease of nothing


def test_pinning_again_never_stretches_a_lease_past_its_limit():
    clock = Clock()
    pins = PinTable(max_pin_s=10, max_bytes=1 << 20, clock=clock)
    assert pins.pin(1, 4096, 3)
    for _ in range(20):  # a client (or a loop of lookups with pins) asking every second
        clock.t += 1
        pins.pin(1, 4096, 3)
        if clock.t >= 1010:
            break
    assert clock.t == 1010 and not pins.pinned(1)  # the lease began at 1000: over at 1010
    clock.t += 9.9
    assert not pins.pin(1, 4096, 3)  # and it may not begin another for max_pin_s
    clock.t += 0.1
    assert pins.pin(1, 4096, 3) and pins.pinned(1)  # only after that, anew


def test_a_pin_ended_early_continues_its_lease_window():
    clock = Clock()
    pins = PinTable(max_pin_s=10, max_bytes=1 << 20, clock=clock)
    assert pins.pin(1, 4096, 2)
    pins.unpin(1)  # loaded: released at once
    clock.t += 5
    assert pins.pin(1, 4096, 8)  # a new lookup within the window: pinned up to its end
    clock.t += 5
    assert not pins.pinned(1) and not pins.pin(1, 4096, 1)


def test_pinned_bytes_are_capped():
    pins = PinTable(max_pin_s=10, max_bytes=3 * 4096, clock=Clock())
    assert [pins.pin(t, 4096, 5) for t in range(1, 6)] == [True, True, True, False, False]
    assert pins.refused == 2 and pins.nbytes == 3 * 4096
    assert pins.pin(2, 4096, 5)  # pinning again costs nothing more
    pins.unpin(1)
    assert pins.pin(4, 4096, 5) and pins.nbytes == 3 * 4096


def test_a_pinned_block_outlives_a_lap_of_puts_and_goes_once_its_pin_ends(
        open_engine, small_config):
    # fifo without reinsertion: nothing but the pin keeps a block.
    config = dataclasses.replace(small_config, eviction="fifo", reinsert_hits=False)
    engine = open_engine(config, size=16 * MiB)
    clock = Clock()
    engine.core.pins._clock = clock
    rng = random.Random(3)
    kept, other = block_id(1), block_id(2)
    engine.put_many([(kept, b"k" * 30_000), (other, b"o" * 30_000)])
    assert engine.exists_many([kept, other]) == [True, True]  # a probe pins nothing
    assert engine.lookup_prefix([kept, other]) == 2
    assert engine.pin_many([kept], 20) == [True]
    laps = engine.sb.num_regions
    i = 100
    while engine.stats().evicted_regions <= laps:  # every region went at least once
        engine.put(block_id(i), rng.randbytes(30_000))
        i += 1
    assert engine.stats().pinned_blocks == 1
    assert engine.get(other) is None  # unpinned: gone with its region
    assert engine.get(kept) == b"k" * 30_000  # copied forward with its region
    clock.t += 21  # the pin ran out
    while engine.stats().evicted_regions <= 2 * laps + 1:
        engine.put(block_id(i), rng.randbytes(30_000))
        i += 1
    assert engine.get(kept) is None and engine.stats().pinned_blocks == 0


def test_a_device_held_by_pins_answers_no_space_not_a_hang(open_engine, small_config):
    """The oldest region holds a superseded entry (a block put again), so the crash-
    ordering rule lets no newer region go before it; pin most of it, and nothing may go:
    the put waiting for room fails NO_SPACE at once. Released, puts go on."""
    engine = open_engine(small_config, size=16 * MiB)  # block-lru: copies up to 0.9 region
    rng = random.Random(4)
    first = [block_id(i) for i in range(32)]  # 32 x 32 KiB entries: region 0, all but 4 KiB
    engine.put_many([(k, rng.randbytes(30_000)) for k in first])
    region0 = engine.index.get(block_tag(first[0])).loc // engine.units_per_region
    engine.put(first[0], rng.randbytes(30_000))  # supersedes an entry of region 0
    assert engine.pin_many(first[1:], 25) == [True] * 31  # 992 KiB > 0.9 of the region
    with pytest.raises(NoSpace, match="pinned"):
        for i in range(100, 1000):
            engine.put(block_id(i), rng.randbytes(30_000))
    assert engine.stats().no_space_puts >= 1
    assert engine.regions.state[region0] != 0 and engine.exists_many(first) == [True] * 32
    engine.pin_many(first[1:], 0)  # released
    for i in range(1000, 1400):
        engine.put(block_id(i), rng.randbytes(30_000))
    assert engine.stats().evicted_regions > 0


def test_pins_past_the_cap_are_refused_and_puts_go_on_evicting_the_rest(open_engine,
                                                                         small_config):
    engine = open_engine(small_config, size=16 * MiB)
    rng = random.Random(5)
    keys = [block_id(i) for i in range(200)]  # ~6.4 MB: more than a quarter of the device
    engine.put_many([(k, rng.randbytes(30_000)) for k in keys])
    pinned = engine.pin_many(keys, 25)
    assert 0 < sum(pinned) < len(keys)  # pinned up to max_pinned_share, the rest refused
    held = [k for k, ok in zip(keys, pinned) if ok]
    i = 1000
    while engine.stats().evicted_regions <= engine.sb.num_regions:  # a lap at least
        engine.put(block_id(i), rng.randbytes(30_000))
        i += 1
    assert all(v is not None for v in engine.get_many(held))
    s = engine.stats()
    assert s.pins_refused > 0 and s.pinned_bytes <= 0.25 * s.capacity_bytes


def test_a_block_being_copied_forward_is_found_and_read(open_engine, small_config):
    """Between its region's drop and its copy's publication a moving block is out of the
    index; reads, probes and pins still find it (a pinned block never goes missing)."""
    from tests.rings import HookedRing

    engine = open_engine(small_config)
    core, loop = engine.core, engine._reactor
    key = block_id(1)
    engine.put(key, b"m" * 20_000)
    assert engine.pin_many([key], 20) == [True]
    region = engine.index.get(block_tag(key)).loc // engine.units_per_region
    i = 0
    while core.allocator.active == region:  # seal it
        engine.put(block_id(100 + i), bytes(100_000))
        i += 1
    ring = HookedRing.install(core)
    ring.hold_writes = True
    core.reclaimer._reclaim(region)
    loop.run_until(lambda: bool(ring.held))  # the copy is written, not yet published
    assert block_tag(key) in core.writer.reinserting
    assert block_tag(key) not in core.index
    assert core.exists_many([key]) == [True] and core.lookup_prefix([key]) == 1
    got = []
    core.get([key], got.append)
    assert got and got[0].results[0].tobytes() == b"m" * 20_000
    assert core.pin_many([key], 20) == ([True], [True])
    ring.release()
    loop.run_until(lambda: core.idle)
    assert core.index.get(block_tag(key)).hit  # read while it moved: the copy says so
    assert engine.get(key) == b"m" * 20_000 and block_tag(key) in core.index


def test_pin_through_the_daemon_and_the_sdk(daemon_factory):
    d = daemon_factory(config={"workers": 2, "engine": {"dram_cache_bytes": 0, "max_pin_s": 5,
                                                        "region_size": "1M"}},
                       device_size="64M")
    ids = [block_id(i) for i in range(40)]
    with wqs.Client([d.address]) as c:
        assert all(c.put_many([(b, b"x" * 1000) for b in ids[:30]]))
        assert c.exists_many(ids, pin_s=2) == [True] * 30 + [False] * 10
        stats = c_stats(d)
        assert stats["pinned_blocks"] == 30 and stats["pins_granted"] == 30
        assert c.pin_many(ids[:5], 60) == [True] * 5  # cut to max_pin_s by the node
        assert c.exists_many(ids) == [True] * 30 + [False] * 10  # no pin: as before
        assert c_stats(d)["pins_granted"] == 35
        c.unpin_many(ids)
        assert c_stats(d)["pinned_blocks"] == 0
        assert c.pin_many(ids[28:32], 1) == [True, True, False, False]


def c_stats(d) -> dict[str, int]:
    from wqs.rpc.control import ControlClient

    with ControlClient(d.control_address) as control:
        return control.stats()["engine"]


def test_a_put_the_pins_leave_no_room_for_is_answered_no_space(daemon_factory):
    """The engine test above, on the wire: the item fails NO_SPACE, nothing hangs."""
    d = daemon_factory(config={"workers": 1, "engine": {"dram_cache_bytes": 0,
                                                        "region_size": "1M"}},
                       device_size="16M")
    rng = random.Random(6)
    first = [block_id(i) for i in range(32)]
    with wqs.Client([d.address], timeout_s=10) as c:
        assert all(c.put_many([(k, rng.randbytes(30_000)) for k in first]))
        assert c.put(first[0], rng.randbytes(30_000))  # a superseded entry in region 0
        assert c.pin_many(first[1:], 20) == [True] * 31
        failed = None
        for i in range(100, 1000):
            r = c.put_many([(block_id(i), rng.randbytes(30_000))])
            if not r[0]:
                failed = r.errors[0]
                break
        assert failed is not None and "NO_SPACE" in str(failed)
        assert c_stats(d)["no_space_puts"] >= 1
        c.unpin_many(first)
        assert c.put(block_id(5000), rng.randbytes(30_000))


def test_pins_through_the_async_client(daemon_factory):
    import asyncio

    d = daemon_factory(config={"workers": 2, "engine": {"dram_cache_bytes": 0,
                                                        "region_size": "1M"}},
                       device_size="64M")
    ids = [block_id(i) for i in range(10)]

    async def go() -> None:
        async with wqs.AsyncClient([d.address]) as c:
            assert all(await c.put_many([(b, b"y" * 500) for b in ids[:6]]))
            assert await c.exists_many(ids, pin_s=3) == [True] * 6 + [False] * 4
            assert await c.pin_many(ids[4:8], 3) == [True, True, False, False]
            await c.unpin_many(ids)

    asyncio.run(asyncio.wait_for(go(), 60))
    assert c_stats(d)["pins_granted"] == 8 and c_stats(d)["pinned_blocks"] == 0


def test_no_space_fails_the_waiting_puts_but_keeps_the_copies_queued(open_engine,
                                                                     small_config):
    """A copy forward may carry a pinned block: NO_SPACE fails puts, never such a copy."""
    from wqs.engine.writer import REINSERT

    engine = open_engine(small_config)
    core = engine.core
    copy = core.writer.stage(block_id(1), 1000, REINSERT)
    copy.pieces[0].payload[:] = b"c" * 1000
    core.writer.reinserting[block_tag(block_id(1))] = copy
    put = core.writer.stage(block_id(2), 1000)
    answered = []
    core.writer.queue.extend([copy, put])  # as if both waited for a clean region
    put.callback = answered.append
    core.writer.fail_queued("no space: test", no_space=True)
    assert answered == [put] and put.no_space and put.error == "no space: test"
    assert list(core.writer.queue) == [copy] and block_tag(block_id(1)) in core.writer.reinserting
    assert core.stats_counters.no_space_puts == 1 and core.stats_counters.write_errors == 0
    engine._reactor.run_until(lambda: core.idle)  # the copy goes out once there is room
    assert engine.get(block_id(1)) == b"c" * 1000
