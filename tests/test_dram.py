"""The DRAM tier: byte bounds, coherence, and S3-FIFO's hit ratio against LRU."""

from __future__ import annotations

import random

import numpy as np
import pytest

from wqs.engine.dram import LRUTier, S3FIFOTier, make_dram_tier


@pytest.mark.parametrize("cls", [LRUTier, S3FIFOTier])
def test_bounded_in_bytes(cls):
    tier = cls(10_000)
    rng = random.Random(1)
    for i in range(2000):
        tier.put(i.to_bytes(16, "big"), bytes(rng.randrange(1, 2000)))
        assert tier.used <= tier.capacity
        if i % 3 == 0:
            tier.get(rng.randrange(i + 1).to_bytes(16, "big"))
    assert 0 < len(tier)
    tier.clear()
    assert tier.used == 0 and len(tier) == 0


@pytest.mark.parametrize("cls", [LRUTier, S3FIFOTier])
def test_replace_remove_and_oversized(cls):
    tier = cls(1000)
    tier.put(b"k", b"a" * 10)
    tier.put(b"k", b"b" * 20)
    assert tier.get(b"k") == b"b" * 20 and tier.used == 20
    tier.remove(b"k")
    assert tier.get(b"k") is None and tier.used == 0
    tier.put(b"big", b"x" * 600)  # more than a quarter of the tier: not cached
    assert tier.get(b"big") is None and tier.used == 0


def test_probe_is_not_an_access():
    tier = S3FIFOTier(1000)
    tier.put(b"a", b"x" * 50)
    for _ in range(10):
        assert b"a" in tier
    for i in range(100):  # a stream of one-hit wonders pushes "a" out
        tier.put(i.to_bytes(4, "big"), b"y" * 50)
    assert b"a" not in tier


def _hit_ratio(tier, trace) -> float:
    hits = 0
    for key in trace:
        k = int(key).to_bytes(8, "big")
        if tier.get(k) is not None:
            hits += 1
        else:
            tier.put(k, b"v" * 100)
    return hits / len(trace)


def test_s3fifo_beats_lru_on_a_kv_cache_like_trace():
    # Reused prefixes (Zipf-popular system prompts and conversations) interleaved with
    # blocks seen once (fresh user turns) - the shape of a prefix-cache workload.
    rng = np.random.default_rng(7)
    n = 60_000
    popular = rng.zipf(1.2, n) % 5000
    one_hit = 1_000_000 + np.arange(n)
    trace = np.where(rng.random(n) < 0.5, popular, one_hit)
    capacity = 500 * 100  # room for 500 blocks
    s3 = _hit_ratio(S3FIFOTier(capacity), trace)
    lru = _hit_ratio(LRUTier(capacity), trace)
    assert s3 > lru * 1.05, (s3, lru)


def test_factory():
    assert make_dram_tier(0, "s3fifo") is None
    assert isinstance(make_dram_tier(10, "lru"), LRUTier)
    with pytest.raises(ValueError):
        make_dram_tier(10, "arc")
