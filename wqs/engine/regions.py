"""The region table: per-region state, the clean pool, and the crash-ordering rule.

A region is the unit of allocation and eviction. Its life:

    FREE -> PREPARING -> CLEAN -> OPEN -> SEALED -> RECLAIMING -> FREE
            (header write  (in the   (taking  (full)   (its hit blocks
             in flight)    clean pool) entries)          being read back)

Only FREE, OPEN and SEALED reach the checkpoint; the other states live in memory and
are saved as what they are on the device (PREPARING, CLEAN: no entries, so FREE;
RECLAIMING: every entry still indexed, so SEALED).

Owned by the engine core's loop; no locks.
"""

from __future__ import annotations

from array import array
from collections import deque

import numpy as np

from wqs.engine import format as fmt
from wqs.engine.index import Index

FREE, OPEN, SEALED, PREPARING, CLEAN, RECLAIMING = 0, 1, 2, 3, 4, 5
STATE_NAMES = {FREE: "free", OPEN: "open", SEALED: "sealed", PREPARING: "preparing",
               CLEAN: "clean", RECLAIMING: "reclaiming"}


class RegionTable:
    """Per-region state in numpy arrays, plus the pool of clean regions.

    Each region also keeps the index tags of the entries published into it (8 B per
    entry), so that reclaiming it finds its index slots by probing for those tags:
    scanning the whole index instead costs time in proportion to the device (30 ms
    per reclaim at 30 M slots, about a terabyte of 64 KiB blocks).
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.gen = np.zeros(n, dtype=np.uint64)
        self.write_ptr = np.zeros(n, dtype=np.uint32)
        self.state = np.zeros(n, dtype=np.uint8)
        self.last_access = np.zeros(n, dtype=np.uint64)
        self.inflight = np.zeros(n, dtype=np.int64)  # writes in flight into it: a pin
        # Entries a later write made obsolete (a newer version, or a tombstone), which
        # a crash scan would bring back if that later write's region went first.
        self.superseded = np.zeros(n, dtype=np.uint32)
        self.clean: deque[int] = deque()  # CLEAN regions, in the order they open
        self.clock = 0  # ticks once per read batch and per region opened (LRU's time)
        self._tags = [array("Q") for _ in range(n)]

    # ---- transitions ---------------------------------------------------------------

    def prepared(self, region: int) -> None:
        """Its new header is on the device: into the clean pool."""
        assert self.state[region] == PREPARING
        self.state[region] = CLEAN
        self.clean.append(region)

    def open(self, region: int, now: int) -> None:
        assert self.state[region] == CLEAN
        self.state[region] = OPEN
        self.write_ptr[region] = fmt.UNIT
        self.last_access[region] = now
        self.superseded[region] = 0
        self._tags[region] = array("Q")

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def touch(self, regions: int | np.ndarray) -> None:
        """A read of these regions: they are the most recently used now."""
        self.last_access[regions] = self.tick()

    def free(self, region: int) -> None:
        """Its entries are gone from the index."""
        assert self.inflight[region] == 0, "a region with writes in flight cannot be freed"
        self.state[region] = FREE
        self.write_ptr[region] = 0
        self.superseded[region] = 0
        self._tags[region] = array("Q")

    def reset(self) -> None:
        assert not self.inflight.any()
        self.gen[:] = 0
        self.write_ptr[:] = 0
        self.state[:] = FREE
        self.last_access[:] = 0
        self.superseded[:] = 0
        self.clean.clear()
        self.clock = 0
        self._tags = [array("Q") for _ in range(self.n)]

    def count(self, *states: int) -> int:
        return int(np.count_nonzero(np.isin(self.state, states)))

    def saved_states(self) -> np.ndarray:
        """States as the checkpoint keeps them (FREE, SEALED), with STATE_SUPERSEDED on
        live regions holding superseded entries."""
        live = np.isin(self.state, (OPEN, SEALED, RECLAIMING))
        states = np.where(live, SEALED, FREE).astype(np.uint8)
        marked = live & (self.superseded > 0)
        return states | np.where(marked, fmt.STATE_SUPERSEDED, 0).astype(np.uint8)

    # ---- the crash-ordering rule -------------------------------------------------

    def reclaimable(self, by_age: bool, *, in_turn: bool = False) -> np.ndarray:
        """The sealed regions that may be reclaimed now, not pinned by writes in flight;
        with in_turn, also those that may go once the ones before them are gone.

        `by_age`: the policy takes regions in write order (FIFO), which never breaks
        the rule below. Any other order (LRU) may: where a region holds entries that a
        later write superseded, reclaiming the later write's region first would let a
        crash scan find the old version with nothing newer to hide it. So no region
        newer than the oldest one holding superseded entries goes before it (in turn,
        only a pinned one holds the rest back). Where blocks are rarely rewritten (KV
        blocks named by their content) that leaves LRU free; with many rewrites it
        tends to FIFO. Every policy's choice is filtered through here.
        """
        usable = (self.state == SEALED) & (self.inflight == 0)
        if not by_age:
            holders = np.isin(self.state, (OPEN, SEALED, RECLAIMING)) & (self.superseded > 0)
            if in_turn:
                holders &= self.inflight > 0
            if holders.any():
                usable &= self.gen <= self.gen[holders].min()
        return np.flatnonzero(usable)

    # ---- per-region entry tags ---------------------------------------------------

    def record(self, region: int, tags: np.ndarray) -> None:
        """Entries with these index tags were published into `region`."""
        self._tags[region].frombytes(tags.astype(np.uint64).tobytes())

    def record_one(self, region: int, tag: int) -> None:
        self._tags[region].append(tag)

    def supersede(self, regions: int | np.ndarray) -> None:
        """One entry in each of `regions` (repeats count again) is obsolete."""
        if isinstance(regions, int):
            self.superseded[regions] += 1  # np.add.at costs microseconds even for one
        else:
            np.add.at(self.superseded, regions, 1)

    def written_tags(self, region: int) -> np.ndarray:
        return np.frombuffer(self._tags[region], dtype=np.uint64)

    def rebuild_tags(self, index: Index, units_per_region: int) -> None:
        """The per-region tags of every live index entry (after a checkpoint or scan)."""
        live = np.flatnonzero(index.tags)
        regions = index.locs[live] // units_per_region
        order = np.argsort(regions, kind="stable")
        regions, tags = regions[order], index.tags[live][order]
        bounds = np.flatnonzero(np.diff(regions)) + 1
        self._tags = [array("Q") for _ in range(self.n)]
        for part in np.split(np.arange(len(tags)), bounds):
            if len(part):
                self.record(int(regions[part[0]]), tags[part])
