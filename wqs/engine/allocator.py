"""Space at the head of the open region, and the sequence numbers writes are ordered by.

No IO and no waiting: when the open region is full the next one comes from the clean
pool (regions whose new header is already on the device); when the pool is empty the
allocator says so and the writer waits for the reclaimer to refill it.

Owned by the engine core's loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from wqs.engine import format as fmt
from wqs.engine.regions import OPEN, SEALED, RegionTable

UNIT = fmt.UNIT


@dataclass(slots=True)
class Slot:
    """Space reserved for one entry: where it goes and the gen/seq it is written with."""

    region: int
    offset: int  # within the region
    gen: int
    seq: int


class Allocator:
    """Hands out slots in the open region, in strictly increasing (gen, offset) order."""

    def __init__(self, regions: RegionTable, region_size: int, next_seq: int) -> None:
        assert next_seq >= 1
        self.regions = regions
        self.region_size = region_size
        self.seq = next_seq  # the next sequence number to hand out
        self.active = -1  # the open region, or -1
        self.active_ptr = 0

    def next_seq(self) -> int:
        seq = self.seq
        self.seq += 1
        return seq

    def room(self) -> int:
        """Bytes the open region can still take."""
        return self.region_size - self.active_ptr if self.active >= 0 else 0

    def place(self, room: int, opened: int, elens: list[int]) -> tuple[int, int]:
        """Where entries of these lengths would go after a region with `room` bytes left,
        `opened` new regions in: (room left, regions opened) afterwards. Entries do not
        split, so a region may end with an unusable tail; this counts it exactly."""
        for elen in elens:
            if elen > room:
                opened += 1
                room = self.region_size - UNIT
            room -= elen
        return room, opened

    def reserve(self, elen: int) -> Slot | None:
        """Space for one entry of elen bytes, or None if it needs a new region and the
        clean pool is empty. Pins the region until the writer unpins it."""
        assert 0 < elen <= self.region_size - UNIT and elen % UNIT == 0
        if self.active < 0 or self.active_ptr + elen > self.region_size:
            if not self.regions.clean:
                return None
            self.seal()
            region = self.regions.clean.popleft()
            self.regions.open(region, self.regions.tick())
            self.active, self.active_ptr = region, UNIT
        r = self.regions
        slot = Slot(self.active, self.active_ptr, int(r.gen[self.active]), self.next_seq())
        # Pinned from now on: a region with writes in flight is never reclaimed.
        r.inflight[self.active] += 1
        self.active_ptr += elen
        r.write_ptr[self.active] = self.active_ptr
        return slot

    def seal(self) -> None:
        """Close the open region to further entries."""
        if self.active >= 0:
            assert self.regions.state[self.active] == OPEN
            self.regions.state[self.active] = SEALED
            self.active = -1
            self.active_ptr = 0

    def reset(self) -> None:
        self.active = -1
        self.active_ptr = 0
