"""The in-memory index: block ID -> entry location, in 20 bytes a slot.

An open-addressing hash table (linear probing, backward-shift deletion) in three numpy
arrays. Like CacheLib's Navy, it keeps a 64-bit tag of the block ID rather than the ID
itself: the entry header on the device holds the full ID and every read checks it, so
two IDs whose tags collide (odds 2**-64 per pair) cost a miss, never wrong bytes.

Slot layout: tag u64 (0 = empty), loc u32 (entry offset in UNITs from the data start),
meta u32 (payload length in the low 27 bits, flags above). Beside them, `stamps` (u32
per slot) holds when the entry was last used, on the eviction policy's clock
(wqs/engine/recency.py); it moves with its entry and is not persisted: after a restart
every entry's stamp is 0, the clock's start, as if all were used at once.

The `*_many` methods do the same for a batch in a few numpy operations (all probe
chains advance together), which is what put_many, get_many and region reclaim use:
per-call Python costs more than the probing itself.
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np
import xxhash

META_LEN_BITS = 27  # payload length < 128 MiB per entry (an entry fits in a region)
META_LEN_MASK = (1 << META_LEN_BITS) - 1
META_HIT = 1 << 27  # read while resident: a candidate for reinsertion on reclaim
META_HEAD = 1 << 28  # the entry is the head of a segmented block
SLOT_BYTES = 20  # tag, loc, meta (the 16 B a checkpoint keeps) and the stamp

MAX_LOAD = 0.75  # grow beyond this
PROBE_WINDOW = 16  # slots find_slots compares per chain and round
_PROBE_STEPS = np.arange(PROBE_WINDOW, dtype=np.int64)
GROWTH = 1.5  # so the load after growth is 0.5 and the average stays near 40 B/block
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
        self.stamps = np.zeros(capacity, dtype=np.uint32)

    def load(self, tags: np.ndarray, locs: np.ndarray, metas: np.ndarray) -> None:
        """Take a table as a checkpoint kept it (its stamps start at 0)."""
        assert len(tags) == len(locs) == len(metas)
        self.tags, self.locs, self.metas = tags, locs, metas
        self.stamps = np.zeros(len(tags), dtype=np.uint32)
        self.capacity = len(tags)
        self.count = int(np.count_nonzero(tags))

    @property
    def nbytes(self) -> int:
        return self.tags.nbytes + self.locs.nbytes + self.metas.nbytes + self.stamps.nbytes

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

    def find_slots(self, tags: np.ndarray) -> np.ndarray:
        """For each tag, the slot holding it or the empty slot where it would go.

        Each round looks at PROBE_WINDOW slots of every unfinished chain at once: at
        the loads this table runs at, the longest of 32 chains is often 10-20 slots,
        and a round per slot would cost more than the probing itself.
        """
        cap = self.capacity
        slots = (tags % np.uint64(cap)).astype(np.int64)
        pending = np.arange(len(tags))
        while len(pending):
            window = slots[pending, None] + _PROBE_STEPS
            window[window >= cap] -= cap
            found = self.tags[window]
            stop = (found == tags[pending, None]) | (found == 0)
            ended = stop.any(axis=1)
            first = stop.argmax(axis=1)
            slots[pending[ended]] = window[ended, first[ended]]
            pending = pending[~ended]
            slots[pending] = (slots[pending] + PROBE_WINDOW) % cap
        return slots

    def get_many(self, tags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(slots, found) for a batch of tags: found[i] says whether tags[i] is held."""
        slots = self.find_slots(tags)
        return slots, self.tags[slots] == tags

    def put_many(self, tags: np.ndarray, locs: np.ndarray, metas: np.ndarray,
                 slots: np.ndarray | None = None, stamp: int | None = None) -> None:
        """put() for a batch. Where a tag repeats, its last occurrence wins. `slots`, if
        given, is find_slots(tags) on the table as it is now (saves probing again);
        `stamp`, if given, becomes every entry's stamp (else new ones get 0)."""
        assert tags.dtype == np.uint64 and np.all(tags != 0)
        if len(set(tags.tolist())) != len(tags):
            # Keep each tag's last occurrence (first in the reversed batch).
            _, first = np.unique(tags[::-1], return_index=True)
            keep = np.sort(len(tags) - 1 - first)
            tags, locs, metas = tags[keep], locs[keep], metas[keep]
            slots = None
        if slots is None:
            slots = self.find_slots(tags)
        found = self.tags[slots] == tags
        self.locs[slots[found]] = locs[found]
        self.metas[slots[found]] = metas[found]
        if stamp is not None:
            self.stamps[slots[found]] = stamp
        new = ~found
        if new.any():
            self._insert_absent(tags[new], locs[new], metas[new], slots[new],
                                0 if stamp is None else stamp)

    def _insert_absent(self, tags: np.ndarray, locs: np.ndarray, metas: np.ndarray,
                       slots: np.ndarray | None = None, stamps: np.ndarray | int = 0) -> None:
        """Insert distinct tags that are not in the table yet (`slots`: as in put_many;
        `stamps`: theirs, or one for all)."""
        stamps = np.broadcast_to(np.asarray(stamps, dtype=np.uint32), tags.shape)
        while self.count + len(tags) > self.capacity * MAX_LOAD:
            self._grow()
            slots = None
        while len(tags):
            if slots is None:
                slots = self.find_slots(tags)
            # Tags whose probes end on distinct empty slots can all go in at once; of
            # several that end on the same slot, one goes in and the rest probe again.
            taken, first = np.unique(slots, return_index=True)
            self.tags[taken] = tags[first]
            self.locs[taken] = locs[first]
            self.metas[taken] = metas[first]
            self.stamps[taken] = stamps[first]
            self.count += len(first)
            rest = np.ones(len(tags), dtype=bool)
            rest[first] = False
            tags, locs, metas, stamps = tags[rest], locs[rest], metas[rest], stamps[rest]
            slots = None

    def get(self, tag: int) -> Location | None:
        i = self._find_slot(tag)
        if int(self.tags[i]) == 0:
            return None
        meta = int(self.metas[i])
        return Location(int(self.locs[i]), meta & META_LEN_MASK, meta)

    def __contains__(self, tag: int) -> bool:
        return int(self.tags[self._find_slot(tag)]) != 0

    def put(self, tag: int, loc: int, payload_len: int, flags: int = 0,
            stamp: int | None = None) -> None:
        """Point `tag` at `loc`; its stamp becomes `stamp` if given (a new entry's is 0)."""
        assert tag != 0 and 0 <= payload_len <= META_LEN_MASK
        i = self._find_slot(tag)
        if int(self.tags[i]) == 0:
            if (self.count + 1) > self.capacity * MAX_LOAD:
                self._grow()
                i = self._find_slot(tag)
            self.count += 1
            self.tags[i] = tag
            self.stamps[i] = 0
        if stamp is not None:
            self.stamps[i] = stamp
        self.locs[i] = loc
        self.metas[i] = payload_len | flags

    def slot_of(self, tag: int) -> int | None:
        """The slot holding `tag`, or None (valid until the table next changes)."""
        i = self._find_slot(tag)
        return i if self.tags[i] else None

    def mark_hit(self, tag: int) -> Location | None:
        """Mark the tag's entry as read (a reinsertion candidate); its location, if any."""
        i = self._find_slot(tag)
        if int(self.tags[i]) == 0:
            return None
        meta = int(self.metas[i]) | META_HIT
        self.metas[i] = meta
        return Location(int(self.locs[i]), meta & META_LEN_MASK, meta)

    def loc_of(self, tag: int) -> int | None:
        """The location the tag's entry is at, or None (get() without the object)."""
        i = self._find_slot(tag)
        return int(self.locs[i]) if self.tags[i] else None

    def mark_hit_raw(self, tag: int, stamp: int) -> tuple[int, int] | None:
        """mark_hit, as a (loc, meta) tuple: the read path's form (no object per lookup);
        the entry's stamp becomes `stamp` (the read's time on the policy's clock)."""
        i = self._find_slot(tag)
        if not self.tags[i]:
            return None
        metas = self.metas
        meta = int(metas[i]) | META_HIT
        metas[i] = meta
        self.stamps[i] = stamp
        return int(self.locs[i]), meta

    def stamp(self, tag: int, stamp: int) -> bool:
        """Set a held entry's stamp (a use that reads nothing: a DRAM-tier hit)."""
        i = self._find_slot(tag)
        if not self.tags[i]:
            return False
        self.stamps[i] = stamp
        return True

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
                self.stamps[i] = self.stamps[j]
                i = j
        tags[i] = 0
        self.locs[i] = 0
        self.metas[i] = 0
        self.stamps[i] = 0
        self.count -= 1

    def _grow(self) -> None:
        new_cap = int(self.capacity * GROWTH) + 1
        if self.max_capacity is not None and self.capacity >= self.max_capacity:
            raise AssertionError("index is at its maximum capacity")
        old = (self.tags, self.locs, self.metas, self.stamps)
        self._alloc(new_cap)
        self.count = 0
        self.bulk_load(*old)

    def bulk_load(self, tags: np.ndarray, locs: np.ndarray, metas: np.ndarray,
                  stamps: np.ndarray | None = None) -> None:
        """Insert the live slots of another table (growth; the tags are distinct)."""
        live = np.nonzero(tags)[0]
        self._insert_absent(tags[live], locs[live], metas[live],
                            stamps=0 if stamps is None else stamps[live])

    def slots_at(self, tags: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """Distinct slots holding one of `tags` with a loc in [lo, hi): the entries of one
        region, found from the tags written into it, without scanning the table."""
        slots, found = self.get_many(tags)
        slots = slots[found]
        locs = self.locs[slots]
        return np.unique(slots[(locs >= lo) & (locs < hi)])

    def slots_in_range(self, lo: int, hi: int) -> np.ndarray:
        """Indices of live slots whose loc is in [lo, hi), by scanning the whole table
        (time in proportion to the table; the engine uses slots_at, tests compare)."""
        mask = (self.locs >= lo) & (self.locs < hi) & (self.tags != 0)
        return np.nonzero(mask)[0]

    def remove_slots(self, slots: np.ndarray) -> None:
        """Remove the given slots (from slots_at): a region is being reclaimed.

        Batch form of backward-shift deletion: empty the slots, then take out every
        entry between an emptied slot and the next empty one (the only entries whose
        probe chain may now be broken) and insert those again.
        """
        if not len(slots):
            return
        slots = np.unique(slots)
        assert np.all(self.tags[slots] != 0)
        self.tags[slots] = 0
        self.locs[slots] = 0
        self.metas[slots] = 0
        self.stamps[slots] = 0
        self.count -= len(slots)
        displaced = []
        pos = slots + 1
        while len(pos):
            pos[pos >= self.capacity] -= self.capacity
            pos = pos[self.tags[pos] != 0]
            displaced.append(pos)
            pos = pos + 1
        moved = np.unique(np.concatenate(displaced))
        if len(moved):
            tags, locs, metas = self.tags[moved], self.locs[moved], self.metas[moved]
            stamps = self.stamps[moved]
            self.tags[moved] = 0
            self.stamps[moved] = 0
            self.count -= len(moved)
            self._insert_absent(tags, locs, metas, stamps=stamps)

    def clear(self) -> None:
        self._alloc(MIN_CAPACITY)
        self.count = 0
