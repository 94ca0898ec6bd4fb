"""The numpy hash index against a dict model, and its footprint."""

from __future__ import annotations

import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from wqs.engine.index import META_HIT, MIN_CAPACITY, Index

ops = st.lists(
    st.tuples(st.sampled_from(["put", "remove", "hit"]), st.integers(1, 300),
              st.integers(0, 10_000)),
    max_size=400,
)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_index_matches_a_dict(operations):
    # Small tag space and a tiny table force long probe chains and wrap-around,
    # which is where backward-shift deletion can go wrong.
    index = Index(capacity=16)
    model: dict[int, tuple[int, int]] = {}
    for op, tag, loc in operations:
        tag = tag * 1024 + 7  # many tags share a home slot modulo small capacities
        if op == "put":
            index.put(tag, loc, loc % 500)
            model[tag] = (loc, loc % 500)
        elif op == "remove":
            assert index.remove(tag) == (tag in model)
            model.pop(tag, None)
        else:
            index.mark_hit(tag)
        assert index.count == len(model)
    for tag, (loc, n) in model.items():
        found = index.get(tag)
        assert found is not None and (found.loc, found.payload_len) == (loc, n)
    for tag in range(1, 301):
        if tag * 1024 + 7 not in model:
            assert index.get(tag * 1024 + 7) is None


def test_remove_only_if_location_matches():
    index = Index()
    index.put(5, 100, 10)
    assert index.remove(5, loc=99) is False
    assert index.remove(5, loc=100) is True
    assert 5 not in index


def test_hit_bit_survives_and_is_reset_by_put():
    index = Index()
    index.put(9, 1, 10)
    found = index.mark_hit(9)
    assert (found.loc, found.payload_len, found.hit) == (1, 10, True)
    assert index.mark_hit(12345) is None
    assert index.get(9).hit
    index.put(9, 2, 10)
    assert not index.get(9).hit and index.get(9).meta & META_HIT == 0


def test_slots_in_range_finds_one_regions_entries():
    index = Index()
    for tag in range(1, 101):
        index.put(tag, tag * 10, 1)
    slots = index.slots_in_range(200, 300)
    assert sorted(int(index.locs[s]) for s in slots) == list(range(200, 300, 10))
    index.remove_slots(slots)
    assert index.count == 90 and index.get(20) is None and index.get(30) is not None


def test_footprint_is_at_most_40_bytes_per_block_once_grown():
    rng = random.Random(1)
    index = Index()
    n = 200_000
    for _ in range(n):
        index.put(rng.getrandbits(64) | 1, 1, 1)
    assert index.capacity > MIN_CAPACITY
    assert index.nbytes / index.count <= 40.5  # 20 B per slot at a load of at least 0.5


batches = st.lists(
    st.tuples(st.sampled_from(["put_many", "stamp_many", "remove_region", "put", "touch",
                                              "remove"]),
              st.lists(st.tuples(st.integers(1, 300), st.integers(0, 999)), max_size=40)),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(batches)
def test_batch_operations_match_a_dict(operations):
    # Tags that share home slots, and batches that repeat a tag, in a table small
    # enough to grow and wrap: the cases where vectorised probing could go wrong.
    index = Index(capacity=16)
    model: dict[int, tuple[int, int]] = {}
    stamps: dict[int, int] = {}  # the stamp each entry must carry wherever it moves
    for step, (op, items) in enumerate(operations):
        tags = [t * 1024 + 7 for t, _ in items]
        if op in ("put_many", "stamp_many") and items:
            locs = [loc for _, loc in items]
            stamp = (1 << 32) - 1 - step if op == "stamp_many" else None
            index.put_many(np.array(tags, dtype=np.uint64), np.array(locs, dtype=np.uint32),
                           np.array([loc % 500 for loc in locs], dtype=np.uint32),
                           stamp=stamp)
            for tag, loc in zip(tags, locs):
                model[tag] = (loc, loc % 500)  # the last occurrence wins
                # Without a stamp an overwrite keeps the entry's, a new entry gets 0.
                stamps[tag] = stamp if stamp is not None else stamps.get(tag, 0)
        elif op == "put":
            for tag, (_, loc) in zip(tags, items):
                index.put(tag, loc, loc % 500)
                model[tag] = (loc, loc % 500)
                stamps.setdefault(tag, 0)
        elif op == "touch":
            for tag, (_, loc) in zip(tags, items):
                found = index.mark_hit_raw(tag, loc + step)
                assert (found is not None) == (tag in model)
                if found is not None:
                    stamps[tag] = loc + step
        elif op == "remove":
            for tag in tags:
                assert index.remove(tag) == (tag in model)
                model.pop(tag, None)
                stamps.pop(tag, None)
        else:  # drop every entry whose loc is in a "region" of 100 units
            lo = items[0][1] // 100 * 100 if items else 0
            index.remove_slots(index.slots_in_range(lo, lo + 100))
            model = {t: v for t, v in model.items() if not lo <= v[0] < lo + 100}
            stamps = {t: a for t, a in stamps.items() if t in model}
        assert index.count == len(model)
    every = np.array([t * 1024 + 7 for t in range(1, 301)], dtype=np.uint64)
    slots, found = index.get_many(every)
    for tag, slot, hit in zip(every.tolist(), slots.tolist(), found.tolist()):
        assert hit == (tag in model)
        if hit:
            assert (int(index.locs[slot]), int(index.metas[slot]) & ~META_HIT) == model[tag]
            assert int(index.stamps[slot]) == stamps[tag]
            assert index.get(tag).loc == model[tag][0]
        else:
            assert index.get(tag) is None


def test_removing_a_large_region_keeps_every_other_entry_reachable():
    rng = np.random.default_rng(3)
    index = Index()
    tags = rng.integers(1, 2**63, size=50_000, dtype=np.uint64)
    tags = np.unique(tags)
    locs = rng.integers(0, 10_000, size=len(tags), dtype=np.uint32)
    index.put_many(tags, locs, np.ones(len(tags), dtype=np.uint32))
    assert index.count == len(tags)
    index.remove_slots(index.slots_in_range(2_000, 4_000))
    gone = (locs >= 2_000) & (locs < 4_000)
    _, found = index.get_many(tags)
    assert np.array_equal(found, ~gone)
    assert index.count == int(np.count_nonzero(~gone))
