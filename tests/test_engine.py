"""The storage engine on real files with O_DIRECT."""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import threading
import time

import numpy as np
import pytest

from tests.conftest import MiB, block_id, crash, flip_bytes, run_concurrently
from tests.rings import HookedRing
from wqs.engine import Engine
from wqs.engine import recovery
from wqs.engine import writer as writer_module
from wqs.engine.regions import OPEN, SEALED
from wqs.engine import format as fmt
from wqs.engine.index import block_tag
from wqs.errors import BlockTooLarge, FormatError
from wqs.nvme import DirectDevice


@pytest.fixture(params=["scalar", "batch"])
def publish_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Publish a batch entry by entry, or (batch) every batch of two or more with numpy
    (a single entry, and so every tombstone, always goes entry by entry)."""
    monkeypatch.setattr(writer_module, "SCALAR_PUBLISH_MAX",
                        10**9 if request.param == "scalar" else 1)
    return request.param


def test_round_trip_of_every_size_shape(open_engine, small_config):
    engine = open_engine(small_config)
    rng = random.Random(1)
    sizes = [0, 1, 63, 64, 4031, 4032, 4033, 4096, 65536, 65537, 1 * MiB - 8192,
             3 * MiB + 17]  # the last one is split into segments
    blocks = {block_id(i): rng.randbytes(n) for i, n in enumerate(sizes)}
    for k, v in blocks.items():
        engine.put(k, v)
    for k, v in blocks.items():
        assert engine.get(k) == v
    assert engine.get(block_id(999)) is None
    s = engine.stats()
    assert s.hits_ssd == len(sizes) and s.misses == 1


def test_buffers_numpy_memoryview_and_get_into(open_engine, small_config):
    engine = open_engine(small_config)
    arr = np.arange(4096, dtype=np.float32).reshape(64, 64)
    engine.put(block_id(1), arr)
    engine.put(block_id(2), memoryview(b"hello"))
    out = np.zeros_like(arr)
    assert engine.get_into(block_id(1), out) == arr.nbytes
    assert np.array_equal(out, arr)
    small = bytearray(3)
    with pytest.raises(ValueError, match="holds 3 B"):
        engine.get_into(block_id(2), small)
    assert engine.get_into(block_id(3), bytearray(10)) is None


def test_get_into_from_ssd_dram_and_segments_with_exact_counters(open_engine, small_config,
                                                                   tmp_path):
    """get_into over an SSD hit, a DRAM hit, a segmented block, a corrupt block and a
    miss: the bytes land in the caller's buffer, counted as get() counts them; an SSD
    hit enters the DRAM tier like a get's; a too-small buffer is refused untouched."""
    engine = open_engine(dataclasses.replace(small_config, dram_cache_bytes=4 * MiB),
                         size=32 * MiB)
    rng = random.Random(5)
    blocks = {block_id(i): rng.randbytes(40_000 + i) for i in range(4)}
    blocks[block_id(9)] = rng.randbytes(2 * MiB + 777)  # segmented (1 MiB regions)
    engine.put_many(list(blocks.items()))
    engine.dram.clear()
    dev = str(tmp_path / "dev")
    flip_bytes(dev, engine.core.reader.device_offset(engine.core.reader._lookup(block_id(3))[0])
               + fmt.ENTRY_HEADER_SIZE + 100)
    out = np.zeros(3 * MiB, dtype=np.uint8)
    s0 = engine.stats()
    for k in (block_id(0), block_id(1), block_id(9)):
        n = engine.get_into(k, out)
        assert n == len(blocks[k]) and out[:n].tobytes() == blocks[k]
    assert engine.get_into(block_id(3), out) is None  # corrupt
    assert engine.get_into(block_id(77), out) is None  # never written
    s1 = engine.stats()
    assert (s1.gets - s0.gets, s1.hits_ssd - s0.hits_ssd, s1.misses - s0.misses) == (5, 3, 2)
    assert s1.checksum_failures - s0.checksum_failures == 1
    assert s1.get_bytes - s0.get_bytes == sum(len(blocks[block_id(i)]) for i in (0, 1, 9))
    assert engine.get_into(block_id(0), out) == len(blocks[block_id(0)])  # now from DRAM
    assert engine.stats().hits_dram - s1.hits_dram == 1
    small = bytearray(b"x" * 1000)
    with pytest.raises(ValueError, match="holds 1000 B"):
        engine.get_into(block_id(2), small)  # an SSD hit, too big for the buffer
    assert small == b"x" * 1000
    with pytest.raises(ValueError, match="read-only"):
        engine.get_into(block_id(2), bytes(50_000))


def test_block_limit(open_engine, small_config):
    engine = open_engine(small_config)
    with pytest.raises(BlockTooLarge):
        engine.put(block_id(1), bytes(small_config.max_block_size + 1))
    engine.put(block_id(1), bytes(small_config.max_block_size))  # exactly the limit fits
    assert len(engine.get(block_id(1))) == small_config.max_block_size


def test_put_many_coalesces_and_reads_back(open_engine, small_config, publish_path):
    engine = open_engine(small_config)
    rng = random.Random(2)
    items = [(block_id(i), rng.randbytes(rng.randrange(1, 100_000))) for i in range(40)]
    engine.put_many(items)
    assert engine.get_many([k for k, _ in items]) == [v for _, v in items]
    assert engine.exists_many([block_id(0), block_id(1000)]) == [True, False]


def test_lookup_prefix_counts_leading_hits(open_engine, small_config):
    engine = open_engine(small_config)
    for i in range(5):
        engine.put(block_id(i), b"x")
    engine.put(block_id(7), b"x")
    assert engine.lookup_prefix([block_id(i) for i in range(10)]) == 5
    assert engine.lookup_prefix([block_id(9), block_id(0)]) == 0
    assert engine.lookup_prefix([]) == 0


def test_newest_version_wins_across_clean_and_unclean_restart(open_engine, small_config):
    engine = open_engine(small_config)
    engine.put(block_id(1), b"v1")
    engine.put(block_id(1), b"v2")
    engine.put(block_id(2), b"a" * 5000)
    assert engine.get(block_id(1)) == b"v2"
    engine.close()
    engine = open_engine(small_config)
    assert engine.get(block_id(1)) == b"v2"
    engine.put(block_id(1), b"v3")
    crash(engine)
    engine = open_engine(small_config)
    assert engine.get(block_id(1)) == b"v3"
    assert engine.get(block_id(2)) == b"a" * 5000


def test_delete_survives_a_crash(open_engine, small_config):
    engine = open_engine(small_config)
    engine.put(block_id(1), b"doomed")
    engine.put(block_id(2), b"kept")
    assert engine.delete(block_id(1)) is True
    assert engine.delete(block_id(1)) is False
    assert engine.get(block_id(1)) is None
    crash(engine)
    engine = open_engine(small_config)
    assert engine.get(block_id(1)) is None
    assert engine.get(block_id(2)) == b"kept"


def test_concurrent_puts_of_same_and_different_ids(open_engine, small_config, publish_path):
    engine = open_engine(dataclasses.replace(small_config, region_size=4 * MiB), size=64 * MiB)

    def writer(t: int) -> None:
        rng = random.Random(t)
        for i in range(60):
            engine.put(block_id(10_000 + t * 100 + i), rng.randbytes(20_000))
            engine.put(block_id(1), bytes([t]) * 1000)  # every thread races on ID 1

    errors = run_concurrently(writer, 8)
    assert not errors
    value = engine.get(block_id(1))
    assert value is not None and len(value) == 1000 and len(set(value)) == 1
    for t in range(8):
        rng = random.Random(t)
        for i in range(60):
            assert engine.get(block_id(10_000 + t * 100 + i)) == rng.randbytes(20_000)
    crash(engine)
    engine = open_engine(dataclasses.replace(small_config, region_size=4 * MiB), size=64 * MiB)
    assert engine.get(block_id(1)) == value  # the version that won before the crash


def test_a_failed_group_write_fails_every_put_in_it_and_publishes_none(open_engine,
                                                                       small_config):
    """Puts written as one group: when the device refuses the write, the call raises,
    none of them is readable, and the engine goes on once the device recovers."""
    from wqs.errors import DeviceError

    engine = open_engine(dataclasses.replace(small_config, region_size=4 * MiB), size=64 * MiB)
    engine.put(block_id(1), b"first")  # the clean pool is filled: only entries fail below
    ring = HookedRing.install(engine.core)
    ring.fail_writes = True
    with pytest.raises(DeviceError, match="device write failed: Input/output error"):
        engine.put_many([(block_id(500 + t), bytes([t]) * 70_000) for t in range(8)])
    assert engine.stats().write_errors == 8 and engine.stats().puts == 1
    ring.fail_writes = False
    assert all(engine.get(block_id(500 + t)) is None for t in range(8))
    engine.put(block_id(500), b"after")
    assert engine.get(block_id(500)) == b"after"
    assert engine.core.regions.inflight.sum() == 0  # every pin came back


def test_puts_fail_instead_of_hanging_when_no_region_can_be_prepared(open_engine,
                                                                     small_config):
    """The device refuses every write, region headers included: puts waiting for a clean
    region fail with the reason instead of waiting for ever; the engine recovers."""
    from wqs.errors import DeviceError

    engine = open_engine(small_config)
    ring = HookedRing.install(engine.core)
    ring.fail_writes = True
    with pytest.raises(DeviceError, match="no region could be prepared.*Input/output error"):
        engine.put_many([(block_id(t), bytes(50_000)) for t in range(40)])
    assert engine.get(block_id(0)) is None
    ring.fail_writes = False
    time.sleep(1.1)  # the failed regions' quarantine
    engine.put(block_id(0), b"back")
    assert engine.get(block_id(0)) == b"back"


def test_large_batches_are_written_in_parallel_chunks(open_engine, small_config):
    """A group's back-to-back entries go out as vectored writes of at most WRITE_CHUNK,
    several in one submission, and land back to back (a scan finds every entry)."""
    from wqs.engine import writer as writer_mod

    engine = open_engine(dataclasses.replace(small_config, region_size=8 * MiB), size=64 * MiB)
    ring = HookedRing.install(engine.core)
    blocks = [(block_id(900 + i), os.urandom(64 * 1024)) for i in range(64)]  # ~4.3 MiB
    engine.put_many(blocks)
    sizes = [n for _, n, _ in ring.writes if n > fmt.UNIT]  # not the region headers
    assert max(sizes) <= writer_mod.WRITE_CHUNK and len(sizes) > 4
    assert max(writes for _, writes in ring.submits) > 4  # several chunks in flight at once
    crash(engine)
    engine = open_engine(dataclasses.replace(small_config, region_size=8 * MiB), size=64 * MiB)
    assert all(engine.get(b) == data for b, data in blocks)


def _assert_regions_know_their_entries(engine):
    """What reclaim finds from a region's written tags is exactly what a scan of the
    whole index finds for that region, and no entry points into a free region."""
    upr = engine.units_per_region
    for region in range(engine.sb.num_regions):
        lo = region * upr
        by_tags = engine.index.slots_at(engine.regions.written_tags(region), lo, lo + upr)
        by_scan = engine.index.slots_in_range(lo, lo + upr)
        assert np.array_equal(by_tags, np.sort(by_scan)), region
        if engine.regions.state[region] == 0:  # FREE
            assert len(by_scan) == 0


def test_reclaim_finds_a_regions_entries_from_its_tags_across_recovery(open_engine,
                                                                      small_config,
                                                                      publish_path):
    engine = open_engine(small_config, size=16 * MiB)
    rng = random.Random(4)
    for _ in range(40):  # about 3x the device: regions are reclaimed and reused
        batch = [(block_id(rng.randrange(400)), rng.randbytes(rng.randrange(1, 60_000)))
                 for _ in range(40)]
        engine.put_many(batch)  # repeated IDs rewrite blocks within and across batches
        for k, _ in batch[:5]:
            engine.put(k, b"again")
        engine.delete(batch[5][0])
    assert engine.stats().evicted_regions > 0
    _assert_regions_know_their_entries(engine)
    crash(engine)
    engine = open_engine(small_config, size=16 * MiB)  # rebuilt by the scan
    _assert_regions_know_their_entries(engine)
    engine.put_many([(block_id(1000 + i), rng.randbytes(50_000)) for i in range(200)])
    _assert_regions_know_their_entries(engine)
    engine.close()
    engine = open_engine(small_config, size=16 * MiB)  # rebuilt from the checkpoint
    _assert_regions_know_their_entries(engine)


def test_a_large_get_many_is_read_in_windows(open_engine, small_config, monkeypatch):
    from wqs.engine import engine as engine_mod

    monkeypatch.setattr(engine_mod, "READ_WINDOW_BLOCKS", 4)
    engine = open_engine(small_config)
    blocks = {block_id(i): os.urandom(60_000 + i) for i in range(20)}  # 64 KiB entries
    engine.put_many(list(blocks.items()))
    ring = HookedRing.install(engine.core)
    assert engine.get_many(list(blocks)) == list(blocks.values())
    assert [reads for reads, _ in ring.submits] == [4] * 5  # one device batch per window


def test_sync_writes_are_durable_before_a_put_returns(open_engine, small_config):
    """engine.sync: every write carries RWF_DSYNC (durable when it completes, without a
    blocking flush), and the device accepts it."""
    engine = open_engine(dataclasses.replace(small_config, sync=True))
    ring = HookedRing.install(engine.core)
    for i in range(5):
        engine.put(block_id(i), bytes([i]) * 10_000)
    assert ring.writes and all(dsync for _, _, dsync in ring.writes)
    assert [engine.get(block_id(i)) for i in range(5)] == [bytes([i]) * 10_000 for i in range(5)]
    plain = open_engine(small_config, name="plain")
    ring = HookedRing.install(plain.core)
    plain.put(block_id(1), b"x" * 10_000)
    assert not any(dsync for _, _, dsync in ring.writes)


def test_full_device_evicts_and_never_fails_a_put(open_engine, small_config):
    engine = open_engine(small_config, size=16 * MiB)
    capacity = engine.stats().capacity_bytes
    rng = random.Random(3)
    n = 3 * capacity // 50_000
    last = {}
    for i in range(n):
        data = rng.randbytes(50_000)
        engine.put(block_id(i), data)
        if i >= n - 20:
            last[block_id(i)] = data
    s = engine.stats()
    assert s.evicted_regions > 0 and s.evicted_blocks > 0
    assert s.puts == n
    for k, v in last.items():
        assert engine.get(k) == v
    assert engine.get(block_id(0)) is None  # the oldest blocks went first (FIFO)
    # And the survivors are still there after a crash-recovery scan.
    crash(engine)
    engine = open_engine(small_config, size=16 * MiB)
    for k, v in last.items():
        assert engine.get(k) == v
    assert engine.get(block_id(0)) is None


def test_lru_never_lets_a_crash_bring_back_an_overwritten_version(open_engine, small_config):
    """v1 of a block sits in a region that reads keep warm, v2 in one nobody reads. Pure
    LRU would reclaim v2's region first, and a crash scan would then find v1 and serve it.
    The engine must reclaim v1's region no later than v2's, so v1 never comes back."""
    config = dataclasses.replace(small_config, eviction="lru", reinsert_hits=False)
    engine = open_engine(config, size=16 * MiB)
    rng = random.Random(21)
    key, v1, v2 = block_id(10_000), b"one" * 10_000, b"two" * 10_000
    engine.put(key, v1)
    warm = [block_id(i) for i in range(20)]  # v1's region (31 entries fit in one)
    for i in range(60):  # and 40 more, so that v2 starts in a region of its own
        engine.put(block_id(i), rng.randbytes(30_000))
    assert engine.core.reader._lookup(key)[0] // engine.units_per_region == \
        engine.core.reader._lookup(warm[-1])[0] // engine.units_per_region
    engine.put(key, v2)  # v1 is superseded where it lies
    i = 60
    while block_tag(key) in engine.index:  # until v2's region is reclaimed
        assert i < 3000, "v2 was never evicted"
        engine.put(block_id(i), rng.randbytes(30_000))
        i += 1
        if i % 10 == 0:
            engine.get_many(warm)  # keeps v1's region the most recently read
    crash(engine)
    engine = open_engine(config, size=16 * MiB)  # recovers by scanning
    assert engine.get(key) is None


def test_superseded_counts_survive_checkpoint_and_scan(open_engine, small_config,
                                                      publish_path):
    """Rewrites, a batch holding one ID twice, and deletes mark the old entries' regions:
    a crash scan counts them again exactly; a checkpoint keeps which regions have any."""
    engine = open_engine(small_config, size=16 * MiB)
    rng = random.Random(8)
    for i in range(60):
        engine.put(block_id(i % 25), rng.randbytes(9000))  # 35 rewrites
    engine.put_many([(block_id(100 + i % 20), rng.randbytes(5000)) for i in range(30)])
    # Ten IDs the index holds, five of them twice: 10 old versions and 5 repeats.
    engine.put_many([(block_id(100 + i % 10), rng.randbytes(5000)) for i in range(15)])
    for i in range(0, 25, 5):
        engine.delete(block_id(i))
    counts = engine.regions.superseded.copy()
    assert counts.sum() == 35 + 10 + 15 + 5
    crash(engine)
    engine = open_engine(small_config, size=16 * MiB)  # by scanning
    assert np.array_equal(engine.regions.superseded, counts)
    engine.close()
    engine = open_engine(small_config, size=16 * MiB)  # from the checkpoint
    assert np.array_equal(engine.regions.superseded > 0, counts > 0)
    assert engine.stats().recovered_blocks == 25 + 20 - 5


def test_a_checkpoint_without_superseded_marks_assumes_every_region_has_some(
        open_engine, small_config, tmp_path):
    """A checkpoint written before the marks existed (flags 0) cannot say which regions
    hold superseded entries; LRU must then treat them all as holding some."""
    engine = open_engine(small_config)
    for i in range(100):
        engine.put(block_id(i), bytes([i]) * 9000)
    engine.close()
    with open(tmp_path / "dev", "r+b") as f:
        sb = fmt.unpack_superblock(f.read(fmt.UNIT))
        f.seek(sb.meta_offset)
        header = fmt.unpack_checkpoint_header(f.read(fmt.UNIT))
        assert header.flags == fmt.CKP_SUPERSEDED
        f.seek(sb.meta_offset)
        f.write(fmt.pack_checkpoint_header(dataclasses.replace(header, flags=0)))
        f.flush()
        os.fsync(f.fileno())  # the engine reads it back with O_DIRECT
    engine = open_engine(small_config)
    live = engine.regions.state != 0
    assert live.any() and np.all(engine.regions.superseded[live] > 0)
    assert engine.get(block_id(7)) == bytes([7]) * 9000


def test_lru_with_superseded_entries_everywhere_still_makes_room(open_engine, small_config):
    """Every region holds a superseded entry, so LRU must reclaim in write order; a block
    that needs several regions at once must still get them, not wait forever."""
    config = dataclasses.replace(small_config, eviction="lru", reinsert_hits=False)
    engine = open_engine(config, size=16 * MiB)
    rng = random.Random(9)
    for i in range(400):
        engine.put(block_id(i % 7), rng.randbytes(30_000))
        if i % 3 == 0:
            engine.get(block_id(rng.randrange(7)))
    live = np.isin(engine.regions.state, (OPEN, SEALED))  # regions holding entries
    assert np.all(engine.regions.superseded[live] > 0)
    big = rng.randbytes(5 * MiB)  # six regions' worth of segments
    errors = run_concurrently(lambda _: engine.put(block_id(999), big), 1, timeout=30)
    assert not errors
    assert engine.get(block_id(999)) == big


def test_reinsertion_keeps_hot_blocks_through_reclaim(open_engine, small_config):
    engine = open_engine(small_config, size=16 * MiB)
    hot = random.Random(4).randbytes(30_000)
    engine.put(block_id(0), hot)
    rng = random.Random(5)
    for i in range(1, 1500):
        engine.put(block_id(i), rng.randbytes(30_000))
        if i % 50 == 0:
            assert engine.get(block_id(0)) == hot  # a hit marks it for reinsertion
    s = engine.stats()
    assert s.evicted_regions > 10 and s.reinserted_blocks > 0
    assert engine.get(block_id(0)) == hot


def test_lru_eviction_prefers_unread_regions(open_engine, small_config):
    config = dataclasses.replace(small_config, eviction="lru", reinsert_hits=False)
    engine = open_engine(config, size=16 * MiB)
    rng = random.Random(6)
    first = rng.randbytes(30_000)
    engine.put(block_id(0), first)
    for i in range(1, 900):
        engine.put(block_id(i), rng.randbytes(30_000))
        if i % 20 == 0:
            assert engine.get(block_id(0)) == first  # keeps its region the most recent
    assert engine.stats().evicted_regions > 0
    assert engine.get(block_id(0)) == first
    assert engine.get(block_id(1)) is not None  # shares block 0's region
    assert engine.get(block_id(100)) is None  # an unread region, evicted


def test_corrupted_blocks_are_misses_and_the_rest_intact(open_engine, small_config, tmp_path):
    engine = open_engine(small_config)
    rng = random.Random(7)
    blocks = {block_id(i): rng.randbytes(rng.randrange(100, 200_000)) for i in range(60)}
    for k, v in blocks.items():
        engine.put(k, v)
    victims = rng.sample(sorted(blocks), 15)
    for k in victims:
        found = engine.core.reader._lookup(k)
        region, unit = divmod(found[0], engine.units_per_region)
        entry_offset = engine.sb.region_offset(region) + unit * fmt.UNIT
        # Hit the payload of some, the header of others.
        where = rng.randrange(0, fmt.ENTRY_HEADER_SIZE + found[1])
        flip_bytes(str(tmp_path / "dev"), entry_offset + where, 4)
    for k, v in blocks.items():
        got = engine.get(k)
        if k in victims:
            assert got is None
        else:
            assert got == v
    assert engine.stats().checksum_failures == len(victims)
    # A scan after a crash skips the corrupt entries too.
    crash(engine)
    engine = open_engine(small_config)
    for k, v in blocks.items():
        assert engine.get(k) == (None if k in victims else v)


def test_get_many_mixes_hits_misses_segments_and_corruption(open_engine, small_config,
                                                          tmp_path):
    """One get_many over whole blocks, segmented ones, unknown IDs, a repeated ID, a
    corrupt block and a block with one corrupt segment: right bytes or None each, and
    exact counters."""
    engine = open_engine(small_config, size=32 * MiB)
    rng = random.Random(11)
    small = {block_id(i): rng.randbytes(rng.randrange(1, 90_000)) for i in range(20)}
    big = {block_id(100 + i): rng.randbytes(2 * MiB + 5000 * i) for i in range(3)}
    engine.put_many(list(small.items()) + list(big.items()))
    dev = str(tmp_path / "dev")

    def payload_offset(entry_id):
        loc = engine.core.reader._lookup(entry_id)[0]
        return engine.core.reader.device_offset(loc) + fmt.ENTRY_HEADER_SIZE

    flip_bytes(dev, payload_offset(block_id(3)) + 10)
    head = fmt.unpack_entry_header(recovery.read_unit(
        engine.device, payload_offset(block_id(101)) - fmt.ENTRY_HEADER_SIZE))
    flip_bytes(dev, payload_offset(fmt.segment_id(block_id(101), head.seq, 2)) + 999)
    flip_bytes(dev, payload_offset(block_id(102)) - 30)  # the head's own header
    wanted = list(small) + list(big) + [block_id(7), block_id(555), block_id(556)]
    before = engine.stats()
    got = engine.get_many(wanted)
    expect = {**small, **big}
    bad = {block_id(3), block_id(101), block_id(102), block_id(555), block_id(556)}
    for k, v in zip(wanted, got):
        assert v == (None if k in bad else expect[k]), k
    after = engine.stats()
    assert after.gets - before.gets == len(wanted)
    assert after.misses - before.misses == len(bad)
    assert after.hits_ssd - before.hits_ssd == len(wanted) - len(bad)
    assert after.checksum_failures - before.checksum_failures == 3
    assert engine.get(block_id(100)) == big[block_id(100)]  # and through get()
    assert after.get_bytes - before.get_bytes == sum(
        len(expect[k]) for k in wanted if k not in bad)


def test_a_corrupt_newest_version_never_lets_a_crash_serve_an_older_one(open_engine,
                                                                        small_config, tmp_path):
    """v1 of two blocks lies intact in an older region, v2 corrupt in a newer one. Reads
    find v2 corrupt (get and get_many); after a crash the scan skips v2, and must not
    serve v1 either: the engine wrote a tombstone when it found v2 corrupt."""
    engine = open_engine(small_config)
    keys = [block_id(1), block_id(2)]
    for k in keys:
        engine.put(k, b"old" * 3000)
    for i in range(40):  # v2 in later regions than v1
        engine.put(block_id(100 + i), bytes(30_000))
    for k in keys:
        engine.put(k, b"new" * 3000)
        loc = engine.core.reader._lookup(k)[0]
        flip_bytes(str(tmp_path / "dev"), engine.core.reader.device_offset(loc) + fmt.ENTRY_HEADER_SIZE + 5)
    assert engine.get(keys[0]) is None
    assert engine.get_many([keys[1], block_id(100)]) == [None, bytes(30_000)]
    assert engine.stats().checksum_failures == 2
    crash(engine)
    engine = open_engine(small_config)
    assert engine.get_many(keys) == [None, None]
    assert engine.get(block_id(100)) == bytes(30_000)


def test_a_corrupt_entry_tombstone_spares_versions_written_after_it(open_engine,
                                                                    small_config, tmp_path):
    """The tombstone names the corrupt version's position: a version written between the
    corrupt one and the tombstone survives it, now and after a crash scan."""
    engine = open_engine(small_config)
    key = block_id(5)
    engine.put(key, b"v1" * 500)
    engine.put(key, b"v2" * 500)
    loc, _, gen, _ = engine.core.reader._lookup(key)
    engine.put(key, b"v3" * 500)
    # v2 found corrupt by a read that raced v3: the next call buries it before returning.
    engine.core.reader.corrupt.append((key, gen, loc))
    assert engine.get(key) == b"v3" * 500
    assert not engine.core.reader.corrupt
    crash(engine)
    engine = open_engine(small_config)
    assert engine.get(key) == b"v3" * 500


def test_torn_header_mid_region_is_skipped_by_the_scan(open_engine, small_config, tmp_path):
    engine = open_engine(small_config)
    for i in range(10):
        engine.put(block_id(i), bytes([i]) * 9000)
    found = engine.core.reader._lookup(block_id(4))
    region, unit = divmod(found[0], engine.units_per_region)
    crash(engine)
    # Tear entry 4's header: the scan must resynchronise on entry 5.
    flip_bytes(str(tmp_path / "dev"), engine.sb.region_offset(region) + unit * fmt.UNIT + 20)
    engine = open_engine(small_config)
    for i in range(10):
        assert engine.get(block_id(i)) == (None if i == 4 else bytes([i]) * 9000)


def test_damaged_checkpoint_falls_back_to_scan(open_engine, small_config, tmp_path):
    engine = open_engine(small_config)
    for i in range(20):
        engine.put(block_id(i), bytes([i]) * 3000)
    meta_offset = engine.sb.meta_offset
    engine.close()
    flip_bytes(str(tmp_path / "dev"), meta_offset + fmt.UNIT + 100)  # inside the body
    engine = open_engine(small_config)
    for i in range(20):
        assert engine.get(block_id(i)) == bytes([i]) * 3000


def test_evict_all_drops_everything_durably(open_engine, small_config):
    engine = open_engine(small_config)
    for i in range(10):
        engine.put(block_id(i), b"x" * 100)
    assert engine.evict_all() == 10
    assert engine.get(block_id(0)) is None
    engine.put(block_id(50), b"after")
    crash(engine)
    engine = open_engine(small_config)
    assert engine.get(block_id(0)) is None
    assert engine.get(block_id(50)) == b"after"


def test_dram_tier_serves_hits_and_stays_coherent(open_engine, small_config):
    config = dataclasses.replace(small_config, dram_cache_bytes=1 * MiB)
    engine = open_engine(config)
    engine.put(block_id(1), b"a" * 1000)
    assert engine.get(block_id(1)) == b"a" * 1000
    assert engine.stats().hits_dram == 1
    engine.put(block_id(1), b"b" * 1000)
    assert engine.get(block_id(1)) == b"b" * 1000
    engine.delete(block_id(1))
    assert engine.get(block_id(1)) is None
    assert engine.stats().dram_bytes <= 1 * MiB


def test_stats_gauges(open_engine, small_config):
    engine = open_engine(small_config)
    s = engine.stats()
    assert s.regions_free == s.regions_total and s.index_entries == 0
    engine.put(block_id(1), b"x" * 10_000)
    s = engine.stats()
    assert s.regions_used == 1 and s.index_entries == 1 and s.used_bytes > 10_000
    assert s.put_bytes == 10_000 and s.index_bytes > 0


# ---- formatting and opening ---------------------------------------------------------


def _file(tmp_path, name: str, size: int) -> str:
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_format_refuses_a_filesystem_unless_forced(tmp_path, small_config):
    path = _file(tmp_path, "ext4.img", 16 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", path], check=True)
    device = DirectDevice(path, io_engine=small_config.io_engine)
    try:
        with pytest.raises(FormatError, match="TYPE=ext4"):
            Engine.format(device, small_config)
        Engine.format(device, small_config, force=True)
        Engine.open(device, small_config).close()
    finally:
        device.close()


def test_format_refuses_a_wqs_device_unless_forced(open_engine, small_config, tmp_path):
    engine = open_engine(small_config)
    engine.put(block_id(1), b"precious")
    engine.close()
    device = DirectDevice(str(tmp_path / "dev"), io_engine=small_config.io_engine)
    try:
        with pytest.raises(FormatError, match="already holds a WQS device"):
            Engine.format(device, small_config)
        new_sb = Engine.format(device, small_config, force=True)
        engine = Engine.open(device, small_config)
        assert engine.sb.uuid == new_sb.uuid
        assert engine.get(block_id(1)) is None  # the old device's blocks are gone
        engine.close()
    finally:
        device.close()


def test_open_refuses_a_device_without_superblock(tmp_path, small_config):
    device = DirectDevice(_file(tmp_path, "blank", 16 * MiB))
    try:
        with pytest.raises(FormatError, match="not a WQS device"):
            Engine.open(device, small_config)
    finally:
        device.close()


def test_format_refuses_a_device_too_small(tmp_path, small_config):
    device = DirectDevice(_file(tmp_path, "tiny", 2 * MiB))
    try:
        with pytest.raises(FormatError, match="at least 3"):
            Engine.format(device, small_config)
    finally:
        device.close()


def test_default_geometry_fits_a_256_mib_device(tmp_path):
    from wqs.config import EngineConfig

    config = EngineConfig(dram_cache_bytes=0)
    device = DirectDevice(_file(tmp_path, "dev256", 256 * MiB))
    try:
        sb = Engine.format(device, config)
        assert sb.num_regions >= 10 and sb.region_size == 16 * MiB
        engine = Engine.open(device, config)
        big = random.Random(8).randbytes(config.max_block_size)  # 64 MiB: four segments
        engine.put(block_id(1), big)
        assert engine.get(block_id(1)) == big
        engine.close()
    finally:
        device.close()


def test_concurrent_large_batches_on_a_small_device_wait_instead_of_failing(open_engine,
                                                                              small_config):
    # 14 regions of 1 MiB; four writers with 3 MiB batches pin up to 16 regions at once
    # if nothing made them wait for each other.
    engine = open_engine(small_config, size=16 * MiB)

    def writer(t: int) -> None:
        rng = random.Random(t)
        for i in range(12):
            engine.put_many([(block_id(t * 1000 + i * 10 + k), rng.randbytes(700_000))
                             for k in range(4)])

    errors = run_concurrently(writer, 4)
    assert not errors, errors
    assert engine.stats().evicted_regions > 0
    # Every block is either evicted or exact, never damaged by a concurrent batch.
    survivors = 0
    for t in range(4):
        rng = random.Random(t)
        for i in range(12):
            for k in range(4):
                expected = rng.randbytes(700_000)
                got = engine.get(block_id(t * 1000 + i * 10 + k))
                assert got in (None, expected)
                survivors += got is not None
    assert survivors >= 8
    assert engine.stats().checksum_failures == 0


def test_a_write_larger_than_the_device_can_hold_is_refused(open_engine, small_config):
    engine = open_engine(small_config, size=8 * MiB)  # 6 regions of 1 MiB
    with pytest.raises(BlockTooLarge, match="regions"):
        engine.put(block_id(1), bytes(5 * MiB))
    engine.put(block_id(2), b"still works")
    assert engine.get(block_id(2)) == b"still works"


def test_get_many_serves_the_dram_tier_first_and_refills_it(open_engine, small_config):
    engine = open_engine(dataclasses.replace(small_config, dram_cache_bytes=4 * MiB))
    blocks = {block_id(i): os.urandom(50_000) for i in range(10)}
    engine.put_many(list(blocks.items()))  # write-through: all of them enter the tier
    s0 = engine.stats()
    assert engine.get_many(list(blocks)) == list(blocks.values())
    s1 = engine.stats()
    assert (s1.hits_dram - s0.hits_dram, s1.hits_ssd - s0.hits_ssd) == (10, 0)
    engine.dram.clear()
    assert engine.get_many(list(blocks)) == list(blocks.values())
    s2 = engine.stats()
    assert (s2.hits_dram - s1.hits_dram, s2.hits_ssd - s1.hits_ssd) == (0, 10)
    assert engine.get_many(list(blocks)) == list(blocks.values())  # read from the tier again
    assert engine.stats().hits_dram - s2.hits_dram == 10


def test_dram_tier_never_serves_an_overwritten_version(open_engine, small_config):
    """A get's read of v1 is still in flight when a put of v2 publishes: the get answers
    v1 (the newest when it looked) but must not put v1 into the DRAM tier over v2."""
    engine = open_engine(dataclasses.replace(small_config, dram_cache_bytes=4 * MiB))
    core, loop = engine.core, engine._reactor
    key = block_id(1)
    engine.put(key, b"v1" * 100)
    engine.dram.clear()
    ring = HookedRing.install(core)
    ring.hold_reads = True
    got, put_done = [], []
    core.get([key], got.append)
    loop.run_until(lambda: bool(ring.held))  # v1 is read, its completion held back
    core.put(key, b"v2" * 100, put_done.append)
    loop.run_until(lambda: bool(put_done))
    assert put_done[0].error is None and engine.dram.get(key) == b"v2" * 100
    ring.release()
    assert got[0].results[0].tobytes() == b"v1" * 100
    core.release(got[0].results[0])
    assert engine.dram.get(key) == b"v2" * 100
    assert engine.get(key) == b"v2" * 100
    assert engine.delete(key) and engine.get(key) is None

def test_a_block_deleted_while_it_is_copied_forward_stays_deleted(open_engine, small_config):
    """Reclaim copies a read block forward (reinsertion); a delete comes in after the
    region was dropped but before the copy is published: the copy must not publish,
    now or after a crash, or the delete would be undone. (fifo: it copies exactly the
    blocks read since they were written, here the one block.)"""
    small_config = dataclasses.replace(small_config, eviction="fifo")
    engine = open_engine(small_config)
    core, loop = engine.core, engine._reactor
    key = block_id(1)
    engine.put(key, b"v1" * 1000)
    assert engine.get(key) == b"v1" * 1000  # read: a candidate for reinsertion
    region = core.reader._lookup(key)[0] // engine.units_per_region
    i = 0
    while core.allocator.active == region:  # seal it
        engine.put(block_id(100 + i), bytes(100_000))
        i += 1
    ring = HookedRing.install(core)
    ring.hold_writes = True
    core.reclaimer._reclaim(region)  # reads the region back, drops it, copies key forward
    loop.run_until(lambda: bool(ring.held))  # the copy's write is done, its answer held
    assert block_tag(key) in core.writer.reinserting and block_tag(key) not in core.index
    assert core.exists_many([key]) == [True]  # found while it moves (the copy's buffer)
    found = []
    core.delete_many([key], found.append)  # present, being moved: a tombstone goes after it
    ring.release()
    loop.run_until(lambda: bool(found))
    assert found == [[True]]
    loop.run_until(lambda: core.idle)
    assert engine.get(key) is None and core.stats_counters.reinserted_blocks == 0
    crash(engine)
    engine = open_engine(small_config)
    assert engine.get(key) is None


def test_get_one_answers_as_get_does(open_engine, small_config, tmp_path):
    """The single-block read path: a DRAM hit, an SSD hit, a segmented block, a miss and a
    corrupt entry, each answered as the batch path answers it, with the same counters."""
    engine = open_engine(dataclasses.replace(small_config, dram_cache_bytes=4 * MiB),
                         size=32 * MiB)
    core, loop = engine.core, engine._reactor
    blocks = {block_id(1): b"hot" * 100, block_id(2): os.urandom(70_000),
              block_id(3): os.urandom(2 * MiB + 5), block_id(4): os.urandom(30_000)}
    engine.put_many(list(blocks.items()))
    engine.dram.clear()
    engine.get(block_id(1))  # now in the DRAM tier
    loc = core.reader._lookup(block_id(4))[0]
    flip_bytes(str(tmp_path / "dev"), core.reader.device_offset(loc) + fmt.ENTRY_HEADER_SIZE + 9)

    def one(key: bytes):
        got: list = []
        held = core.reader.get_one(key, lambda _, r: got.append(r), None)
        loop.run_until(lambda: bool(got))
        r = got[0]
        value = None if r is None else r.tobytes()
        if r is not None:
            # what the read holds while in flight (a segmented block's head only: the
            # rest is known once the head is read); nothing for a DRAM hit
            assert held == 0 if r.bufs == [] else 0 < held <= r.nbytes
            core.release(r)
        return value

    before = engine.stats()
    assert one(block_id(1)) == blocks[block_id(1)]
    assert one(block_id(2)) == blocks[block_id(2)]
    assert one(block_id(3)) == blocks[block_id(3)]
    assert one(block_id(4)) is None  # corrupt: a miss, and buried
    assert one(block_id(9)) is None
    after = engine.stats()
    assert after.gets - before.gets == 5 and after.misses - before.misses == 2
    assert after.hits_dram - before.hits_dram == 1 and after.hits_ssd - before.hits_ssd == 2
    assert after.checksum_failures - before.checksum_failures == 1
    loop.run_until(lambda: core.idle)  # the corrupt entry's tombstone is written
    assert core.pool.outstanding == 0  # every buffer came back
