"""Eviction policies: which reclaimable region goes first, and which of its blocks are
copied forward (reinserted) before it is dropped.

A policy only ranks and picks; the region table decides which regions are candidates at
all (sealed, not pinned by writes in flight, and the crash-ordering rule in regions.py).
As in CacheLib Navy, eviction is by whole region: the device only sees region-sized
appends, and copying a block forward is how it outlives its region.

* ``fifo``: the oldest region first, the lowest write amplification. With
  ``reinsert_hits``, every block read since it was written is copied forward (up to
  half a region per reclaim), whether it was read a second ago or a lap ago.
* ``lru``: the region read least recently first (a read stamps its region).
* ``block-lru`` (the default): per-block LRU made to fit FIFO regions. Every block
  carries the tick of its last use (recency.py). The blocks LRU would keep are the most
  recently used ones filling WANT_FRACTION of the device; when the oldest region is
  reclaimed, those of its blocks that were read at least once (ever: a copy keeps the
  mark) are copied forward, the most recently used first and,
  among blocks used by the same request, in the order they were written (a prompt's
  blocks are put in chain order, so a chain keeps its prefix before its tail), within
  a write budget of WA_BUDGET bytes of copies per byte that puts wrote. Victims stay in
  write order, so the crash-ordering rule never holds a reclaim back, even under
  rewrites.

Why not more (bench/README.md, "Results: prefix-aware caching", has the figures): on
multi-turn chat traces this holds within 1-2 points of a per-block LRU cache of the same
size at a write amplification of 1.05-1.25, where ``fifo`` with reinsertion writes
1.5-1.6 bytes per byte put. Ordering copies by read frequency (S3-FIFO's main queue),
choosing among several candidate regions, or skipping blocks whose chain parent is gone
moved the simulated hit rate by under half a point.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from wqs.engine import format as fmt
from wqs.engine.index import META_HEAD, META_HIT, META_LEN_MASK, Index
from wqs.engine.recency import RecencyClock
from wqs.engine.regions import RegionTable

POLICIES = ("fifo", "lru", "block-lru")


class EvictionPolicy(Protocol):
    name: str
    by_age: bool  # ranks by write order alone (so the crash-ordering rule holds by itself)
    copy_fraction: float  # the most of a region one reclaim may copy forward (< 1: progress)
    copies_keep_hit_mark: bool  # a copy of a block read before counts as read (META_HIT)

    def victim(self, regions: RegionTable, candidates: np.ndarray) -> int: ...

    def keep(self, slots: np.ndarray, budget: int) -> list[int]:
        """Of a victim's entries (index slots), those to copy forward, within budget bytes."""
        ...

    def earn(self, put_bytes_written: int) -> None:
        """Puts have written this many bytes to the device in all (a running total)."""
        ...


def entry_bytes(metas: np.ndarray) -> np.ndarray:
    """Bytes on the device of entries with these metas (fmt.entry_len, vectorised)."""
    plen = (metas & np.uint32(META_LEN_MASK)).astype(np.int64)
    return (plen + fmt.ENTRY_HEADER_SIZE + fmt.UNIT - 1) // fmt.UNIT * fmt.UNIT


class FifoPolicy:
    """The oldest region (lowest generation) first."""

    name = "fifo"
    by_age = True
    copy_fraction = 0.5
    copies_keep_hit_mark = False  # read since written: a copy must be read again to stay

    def __init__(self, index: Index, reinsert_hits: bool) -> None:
        self.index = index
        self.reinsert_hits = reinsert_hits

    def victim(self, regions: RegionTable, candidates: np.ndarray) -> int:
        return int(candidates[np.argmin(regions.gen[candidates])])

    def keep(self, slots: np.ndarray, budget: int) -> list[int]:
        """The unsegmented entries read since they were written (META_HIT)."""
        if not self.reinsert_hits:
            return []
        out = []
        for s in slots.tolist():
            meta = int(self.index.metas[s])
            if not meta & META_HIT or meta & META_HEAD:
                continue
            elen = fmt.entry_len(meta & META_LEN_MASK)
            if elen <= budget:
                out.append(s)
                budget -= elen
        return out

    def earn(self, put_bytes_written: int) -> None:
        pass


class LruPolicy(FifoPolicy):
    """The region read least recently first (a read stamps its region's last_access)."""

    name = "lru"
    by_age = False

    def victim(self, regions: RegionTable, candidates: np.ndarray) -> int:
        return int(candidates[np.argmin(regions.last_access[candidates])])


WANT_FRACTION = 0.5  # of the device: the most recently used blocks filling it are kept
WA_BUDGET = 0.25  # bytes copied forward per byte of puts written
CREDIT_REGIONS = 4  # unused copy budget is banked up to this many regions
SAMPLE = 4096  # index entries sampled to place the cutoff


class BlockLruPolicy(FifoPolicy):
    """Per-block LRU over FIFO regions (see the module's note)."""

    name = "block-lru"
    by_age = True
    # The write budget bounds what copying costs over time; per reclaim, a region whose
    # blocks are nearly all in use (a system prompt's, put together) keeps them all.
    copy_fraction = 0.9
    copies_keep_hit_mark = True  # "read at least once" lasts: recency decides the rest

    def __init__(self, index: Index, sb: fmt.Superblock, clock: RecencyClock,
                 reinsert_hits: bool, seed: int = 0) -> None:
        super().__init__(index, reinsert_hits)
        self.clock = clock
        self.region_size = sb.region_size
        self.capacity = max(1, sb.num_regions - 2) * (sb.region_size - fmt.UNIT)
        self.rng = np.random.default_rng(seed)
        self.credit = float(sb.region_size)  # bytes that may be copied now
        self._earned_base = 0

    def earn(self, put_bytes_written: int) -> None:
        new = put_bytes_written - self._earned_base
        self._earned_base = put_bytes_written
        self.credit = min(self.credit + WA_BUDGET * new, CREDIT_REGIONS * self.region_size)

    def cutoff_age(self) -> int:
        """The age (in ticks) up to which blocks are wanted: the most recently used ones
        filling WANT_FRACTION of the device, estimated from a sample of the index."""
        index = self.index
        if index.count <= SAMPLE:
            live = np.flatnonzero(index.tags)
        else:
            pick = self.rng.integers(0, index.capacity, 4 * SAMPLE)
            live = pick[index.tags[pick] != 0][:SAMPLE]
        if not len(live):
            return -1
        ages = self.clock.ages(index.stamps[live])
        order = np.argsort(ages, kind="stable")
        held = np.cumsum(entry_bytes(index.metas[live])[order]) * (index.count / len(live))
        k = int(np.searchsorted(held, WANT_FRACTION * self.capacity, side="right"))
        return int(ages[order[k]]) - 1 if k < len(live) else int(ages.max())

    def keep(self, slots: np.ndarray, budget: int) -> list[int]:
        if not self.reinsert_hits or not len(slots):
            return []
        index = self.index
        metas = index.metas[slots]
        ages = self.clock.ages(index.stamps[slots])
        # A block never read is not copied, however recent: a write-only stream (a block
        # put and never asked for) costs no copies at all.
        read = (metas & np.uint32(META_HIT)) != 0
        wanted = (ages <= self.cutoff_age()) & read & ((metas & np.uint32(META_HEAD)) == 0)
        if not wanted.any():
            return []
        idx = np.flatnonzero(wanted)
        idx = idx[np.lexsort((index.locs[slots[idx]], ages[idx]))]  # youngest, then written first
        sizes = entry_bytes(metas[idx])
        budget = min(budget, int(self.credit))
        fits = np.cumsum(sizes) <= budget
        chosen = idx[fits]
        self.credit -= float(sizes[fits].sum())
        return slots[chosen].tolist()


def make_policy(name: str, index: Index, sb: fmt.Superblock, clock: RecencyClock, *,
                reinsert_hits: bool = True) -> EvictionPolicy:
    if name == "fifo":
        return FifoPolicy(index, reinsert_hits)
    if name == "lru":
        return LruPolicy(index, reinsert_hits)
    if name == "block-lru":
        return BlockLruPolicy(index, sb, clock, reinsert_hits)
    raise ValueError(f"unknown eviction policy {name!r}: one of {', '.join(POLICIES)}")
