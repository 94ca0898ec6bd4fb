"""The in-memory index: block ID -> entry location, in 16 bytes a slot.

An open-addressing hash table (linear probing, backward-shift deletion) in three numpy
arrays. Like CacheLib's Navy, it keeps a 64-bit tag of the block ID rather than the ID
itself: the entry header on the device holds the full ID and every read checks it, so
two IDs whose tags collide (odds 2**-64 per pair) cost a miss, never wrong bytes.

Slot layout: tag u64 (0 = empty), loc u32 (entry offset in UNITs from the data start),
meta u32 (payload length in the low 27 bits, flags above).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xxhash

META_LEN_BITS = 27  # payload length < 128 MiB per entry (an entry fits in a region)
META_LEN_MASK = (1 << META_LEN_BITS) - 1
META_HIT = 1 << 27  # read while resident: a candidate for reinsertion on reclaim
META_HEAD = 1 << 28  # the entry is the head of a segmented block
SLOT_BYTES = 16

MAX_LOAD = 0.75  # grow beyond this
GROWTH = 1.5  # so the load after growth is 0.5 and the average stays near 32 B/block
MIN_CAPACITY = 1024


def block_tag(block_id: bytes) -> int:
    """The 64-bit tag the index keeps for a block ID (never 0, which marks empty)."""
    return xxhash.xxh3_64_intdigest(block_id) or 1


@dataclass(frozen=True)
class Location:
    loc: int  # offset from the data start, in UNITs
    payload_len: int
    meta: int

    @property
    def hit(self) -> bool:
        return bool(self.meta & META_HIT)

    @property
    def head(self) -> bool:
        return bool(self.meta & META_HEAD)


class Index:
    """Block tag -> Location. Not thread-safe: the engine holds its lock around calls."""

    def __init__(self, capacity: int = MIN_CAPACITY, max_capacity: int | None = None) -> None:
        self.max_capacity = max_capacity
        self._alloc(max(capacity, MIN_CAPACITY))
        self.count = 0

    def _alloc(self, capacity: int) -> None:
        if self.max_capacity is not None:
            capacity = min(capacity, self.max_capacity)
        self.capacity = capacity
        self.tags = np.zeros(capacity, dtype=np.uint64)
        self.locs = np.zeros(capacity, dtype=np.uint32)
        self.metas = np.zeros(capacity, dtype=np.uint32)

    @property
    def nbytes(self) -> int:
        return self.tags.nbytes + self.locs.nbytes + self.metas.nbytes

    def _find_slot(self, tag: int) -> int:
        """The slot holding `tag`, or the empty slot where it would go."""
        tags = self.tags
        cap = self.capacity
        i = tag % cap
        while True:
            t = int(tags[i])
            if t == tag or t == 0:
                return i
            i += 1
            if i == cap:
                i = 0

    def get(self, tag: int) -> Location | None:
        i = self._find_slot(tag)
        if int(self.tags[i]) == 0:
            return None
        meta = int(self.metas[i])
        return Location(int(self.locs[i]), meta & META_LEN_MASK, meta)

    def __contains__(self, tag: int) -> bool:
        return int(self.tags[self._find_slot(tag)]) != 0

    def put(self, tag: int, loc: int, payload_len: int, flags: int = 0) -> None:
        assert tag != 0 and 0 <= payload_len <= META_LEN_MASK
        i = self._find_slot(tag)
        if int(self.tags[i]) == 0:
            if (self.count + 1) > self.capacity * MAX_LOAD:
                self._grow()
                i = self._find_slot(tag)
            self.count += 1
            self.tags[i] = tag
        self.locs[i] = loc
        self.metas[i] = payload_len | flags

    def mark_hit(self, tag: int) -> None:
        i = self._find_slot(tag)
        if int(self.tags[i]) != 0:
            self.metas[i] |= np.uint32(META_HIT)

    def remove(self, tag: int, loc: int | None = None) -> bool:
        """Remove `tag` (only if it still points at `loc`, when given)."""
        i = self._find_slot(tag)
        if int(self.tags[i]) == 0 or (loc is not None and int(self.locs[i]) != loc):
            return False
        self._delete_slot(i)
        return True

    def _delete_slot(self, i: int) -> None:
        # Backward-shift deletion keeps every probe chain unbroken without tombstones.
        tags, cap = self.tags, self.capacity
        j = i
        while True:
            j = (j + 1) % cap
            t = int(tags[j])
            if t == 0:
                break
            home = t % cap
            # Move slot j back to i unless its home lies cyclically in (i, j].
            if (i < j and (home <= i or home > j)) or (i > j and home <= i and home > j):
                tags[i], self.locs[i], self.metas[i] = tags[j], self.locs[j], self.metas[j]
                i = j
        tags[i] = 0
        self.locs[i] = 0
        self.metas[i] = 0
        self.count -= 1

    def _grow(self) -> None:
        new_cap = int(self.capacity * GROWTH) + 1
        if self.max_capacity is not None and self.capacity >= self.max_capacity:
            raise AssertionError("index is at its maximum capacity")
        old = (self.tags, self.locs, self.metas)
        self._alloc(new_cap)
        self.count = 0
        self.bulk_load(*old)

    def bulk_load(self, tags: np.ndarray, locs: np.ndarray, metas: np.ndarray) -> None:
        """Insert many live slots at once (used on growth and checkpoint load)."""
        live = np.nonzero(tags)[0]
        for k in live:
            tag = int(tags[k])
            i = self._find_slot(tag)
            if int(self.tags[i]) == 0:
                self.count += 1
            self.tags[i] = tag
            self.locs[i] = locs[k]
            self.metas[i] = metas[k]

    def slots_in_range(self, lo: int, hi: int) -> np.ndarray:
        """Indices of live slots whose loc is in [lo, hi): the entries of one region."""
        mask = (self.locs >= lo) & (self.locs < hi) & (self.tags != 0)
        return np.nonzero(mask)[0]

    def remove_slots(self, slots: np.ndarray) -> None:
        """Remove the given slots (from slots_in_range): a region is being reclaimed."""
        tags = [int(self.tags[s]) for s in slots]
        for tag in tags:
            self.remove(tag)

    def clear(self) -> None:
        self._alloc(MIN_CAPACITY)
        self.count = 0
