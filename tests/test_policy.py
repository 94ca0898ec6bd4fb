"""Eviction policies: block-lru's stamps, cutoff, copy order and write budget, on the
engine over real files and on the policy's own parts."""

from __future__ import annotations

import dataclasses
import random
from types import SimpleNamespace

import numpy as np

from tests.conftest import MiB, block_id
from wqs.engine import format as fmt
from wqs.engine import policy as policy_module
from wqs.engine.index import META_HIT, Index, block_tag
from wqs.engine.policy import BlockLruPolicy
from wqs.engine.recency import MASK, MAX_AGE, WRAP_GUARD, RecencyClock


def _stamp(engine, key: bytes) -> int:
    slot = engine.core.index.slot_of(block_tag(key))
    assert slot is not None
    return int(engine.core.index.stamps[slot])


def test_block_lru_keeps_the_blocks_in_use_and_drops_the_rest(open_engine, small_config):
    assert small_config.eviction == "block-lru"  # the default
    engine = open_engine(small_config, size=16 * MiB)
    rng = random.Random(1)
    hot = {block_id(i): rng.randbytes(30_000) for i in range(20)}
    engine.put_many(list(hot.items()))
    for i in range(1000, 2500):  # ~45 MB of puts through a 16 MiB device
        engine.put(block_id(i), rng.randbytes(30_000))
        if i % 25 == 0:
            assert engine.get_many(list(hot)) == list(hot.values())
    s = engine.stats()
    assert s.evicted_regions > 30 and s.reinserted_blocks > 0
    assert engine.get_many(list(hot)) == list(hot.values())
    assert not any(engine.exists_many([block_id(i) for i in range(1000, 1100)]))
    # What copying cost: within the policy's budget (a bank of CREDIT_REGIONS regions
    # plus WA_BUDGET per byte of puts written).
    own = s.written_bytes - s.reinserted_bytes
    assert s.reinserted_bytes <= policy_module.CREDIT_REGIONS * MiB + policy_module.WA_BUDGET * own
    assert s.written_bytes / own < 1 + policy_module.WA_BUDGET + 0.05


def test_fifo_with_reinsertion_has_no_write_budget(open_engine, small_config):
    """The comparison the default is chosen against: fifo copies every read block."""
    engine = open_engine(dataclasses.replace(small_config, eviction="fifo"), size=16 * MiB)
    rng = random.Random(2)
    keys = [block_id(i) for i in range(400)]
    for k in keys:
        engine.put(k, rng.randbytes(30_000))
    for round_ in range(6):  # read everything still held, then push a region's worth
        held = [k for k, ok in zip(keys, engine.exists_many(keys)) if ok]
        engine.get_many(held)
        for i in range(40):
            engine.put(block_id(10_000 + round_ * 40 + i), rng.randbytes(30_000))
    s = engine.stats()
    assert s.written_bytes / (s.written_bytes - s.reinserted_bytes) > 1 + policy_module.WA_BUDGET


def test_probes_stamp_nothing_and_uses_stamp_the_block(open_engine, small_config):
    engine = open_engine(dataclasses.replace(small_config, dram_cache_bytes=4 * MiB))
    a, b = block_id(1), block_id(2)
    engine.put_many([(a, b"a" * 5000), (b, b"b" * 5000)])
    put_stamp = _stamp(engine, a)
    assert engine.exists(a) and engine.lookup_prefix([a, b]) == 2
    assert _stamp(engine, a) == put_stamp  # a probe is not a use
    assert engine.get(a) == b"a" * 5000  # served by the DRAM tier: a use all the same
    assert _stamp(engine, a) > put_stamp
    before = _stamp(engine, b)
    engine.put(b, b"B" * 5000)  # a put again is a use
    assert _stamp(engine, b) > before


def test_stamps_restart_at_zero_and_the_engine_keeps_its_blocks(open_engine, small_config,
                                                                tmp_path):
    engine = open_engine(small_config)
    blocks = {block_id(i): bytes([i]) * 9000 for i in range(30)}
    engine.put_many(list(blocks.items()))
    engine.get_many(list(blocks))
    engine.close()
    engine = open_engine(small_config)
    index = engine.core.index
    assert not index.stamps[index.tags != 0].any()  # not persisted: all "used at start"
    assert engine.get_many(list(blocks)) == list(blocks.values())
    assert _stamp(engine, block_id(3)) > 0


def _policy(num_regions: int = 10, region_size: int = MiB) -> tuple[BlockLruPolicy, Index,
                                                                    RecencyClock]:
    index = Index()
    clock = RecencyClock()
    sb = SimpleNamespace(region_size=region_size, num_regions=num_regions)
    return BlockLruPolicy(index, sb, clock, reinsert_hits=True), index, clock


def _add(index: Index, tags: list[int], locs: list[int], stamps: list[int],
         payload: int = 60_000, flags: int = META_HIT) -> np.ndarray:
    for t, loc, st in zip(tags, locs, stamps):
        index.put(t, loc, payload, flags, stamp=st)
    return np.array([index.slot_of(t) for t in tags])


def test_copies_go_youngest_first_and_a_chain_keeps_its_prefix_before_its_tail():
    policy, index, clock = _policy()
    clock.now = 100
    # A chain put in one request (one stamp, written in order: locs 0, 16, 32, ...) and
    # an older block; the budget takes three entries of 64 KiB.
    chain = _add(index, [11, 12, 13, 14, 15], [0, 16, 32, 48, 64], [90] * 5)
    old = _add(index, [99], [80], [50])
    slots = np.concatenate([chain[::-1], old])  # the order the region gives is no order
    entry = fmt.entry_len(60_000)
    kept = policy.keep(slots, 3 * entry)
    assert [int(index.tags[s]) for s in kept] == [11, 12, 13]


def test_only_the_most_recently_used_half_of_the_device_is_wanted():
    policy, index, clock = _policy(num_regions=10)  # 8 usable regions
    clock.now = 10_000
    entry = fmt.entry_len(60_000)
    n = 8 * (MiB - fmt.UNIT) // entry  # a full device of 64 KiB entries
    slots = _add(index, list(range(1, n + 1)), [16 * i for i in range(n)],
                 [clock.now - i for i in range(n)])  # block i used i ticks ago
    cut = policy.cutoff_age()
    assert abs(cut - n * policy_module.WANT_FRACTION) <= 2
    policy.credit = 1e12
    kept = set(policy.keep(slots, 1 << 40))
    assert kept == {int(s) for s in slots[: cut + 1]}


def test_copies_spend_credit_and_puts_earn_it():
    policy, index, clock = _policy()
    clock.now = 5
    slots = _add(index, list(range(1, 21)), [16 * i for i in range(20)], [5] * 20)
    entry = fmt.entry_len(60_000)
    policy.credit = 2.5 * entry
    assert len(policy.keep(slots, 1 << 30)) == 2
    assert len(policy.keep(slots, 1 << 30)) == 0  # half an entry left
    policy.earn(int(4 * entry / policy_module.WA_BUDGET))
    assert len(policy.keep(slots, 1 << 30)) == 4
    policy.earn(10**15)  # banked up to CREDIT_REGIONS regions, no more
    assert policy.credit == policy_module.CREDIT_REGIONS * MiB


def test_the_clock_wraps_and_clamping_keeps_old_blocks_old():
    policy, index, clock = _policy()
    clock.now = MASK - 5
    slots = _add(index, [1, 2], [0, 16], [MASK - 10, 3])  # block 2: used after the wrap
    clock.now = 10
    assert clock.ages(index.stamps[slots]).tolist() == [21, 7]
    # A block left alone for more than a lap would look young again; clamping every
    # WRAP_GUARD ticks caps its age first.
    index.stamps[slots[0]] = (clock.now - MAX_AGE - 100) & MASK
    assert not clock.clamp_due()
    clock.now = (clock.now + WRAP_GUARD) & MASK
    assert clock.clamp_due()
    clock.clamp(index)
    ages = clock.ages(index.stamps[slots]).tolist()
    assert ages == [MAX_AGE, 7 + WRAP_GUARD] and not clock.clamp_due()


def test_a_block_never_read_is_not_copied_however_recent():
    policy, index, clock = _policy()
    clock.now = 50
    read = _add(index, [1, 2], [0, 16], [49, 49])
    unread = _add(index, [3, 4], [32, 48], [50, 50], flags=0)
    kept = policy.keep(np.concatenate([read, unread]), 1 << 30)
    assert sorted(int(index.tags[s]) for s in kept) == [1, 2]


def test_a_write_only_stream_costs_no_copies(open_engine, small_config):
    engine = open_engine(small_config, size=16 * MiB)
    rng = random.Random(7)
    for i in range(900):  # ~1.7 laps, nothing ever read
        engine.put(block_id(i), rng.randbytes(30_000))
    s = engine.stats()
    assert s.evicted_regions > engine.sb.num_regions and s.reinserted_bytes == 0


def test_a_copy_keeps_the_read_mark_and_its_stamp(open_engine, small_config):
    engine = open_engine(small_config, size=16 * MiB)
    rng = random.Random(8)
    hot = block_id(1)
    engine.put(hot, b"h" * 30_000)
    i = 100
    while engine.stats().reinserted_blocks == 0:
        if i % 50 == 0:  # in use: read now and then
            assert engine.get(hot) == b"h" * 30_000
            stamp = _stamp(engine, hot)
        engine.put(block_id(i), rng.randbytes(30_000))
        i += 1
        assert i < 2000
    loc = engine.index.get(block_tag(hot))
    assert loc.hit and _stamp(engine, hot) == stamp  # moved, still "read", same last use
