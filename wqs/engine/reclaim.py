"""Reclaim: keeps the pool of clean regions full, off the allocation path.

A region becomes clean when its new header (with a fresh generation) is on the device.
The reclaimer prepares FREE regions that way; when none is free it reclaims the
policy's victim among the regions the crash-ordering rule allows:

    victim -> (the blocks to keep read back, while still indexed: the pinned ones
               (pins.py), and those the policy picks)
           -> its index entries dropped -> FREE -> new header written -> clean pool
           -> the read-back blocks copied forward through the writer (reinsertion),
              each keeping its policy stamp

All of it is IO on the loop's ring; a put short of space simply waits in the writer's
queue until the pool has what it needs (CacheLib Navy's clean-region pool refilled by
its reclaim jobs).

Regions enter the clean pool in the order of their generations, whatever order their
header writes complete in: the allocator opens them in pool order, and a region opened
later must carry a higher generation, or a crash scan would replay its entries first.

Owned by the engine core's loop.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import numpy as np

from wqs.engine import format as fmt
from wqs.engine.allocator import Allocator
from wqs.engine.index import META_HEAD, META_HIT, Index, block_tag
from wqs.engine.pins import PinTable
from wqs.engine.policy import EvictionPolicy, entry_bytes
from wqs.engine.recovery import parse_entry
from wqs.engine.regions import FREE, PREPARING, RECLAIMING, SEALED, RegionTable
from wqs.engine.stats import EngineStats
from wqs.engine.writer import REINSERT, Writer
from wqs.nvme.buffers import BufferPool, IoBuffer
from wqs.nvme.device import IoRing, describe_io_result

log = logging.getLogger("wqs.engine")

UNIT = fmt.UNIT
# Clean regions kept ready (beyond what the writer waits for): one is enough for the
# writer never to wait while the next is reclaimed, and each costs a region of capacity
# per shard, which a small device feels.
CLEAN_TARGET = 1
RETRY_AFTER_S = 1.0  # a region whose header write failed is not tried again before this


class Reclaimer:
    def __init__(self, sb: fmt.Superblock, regions: RegionTable, index: Index,
                 allocator: Allocator, policy: EvictionPolicy, writer: Writer, ring: IoRing,
                 pool: BufferPool, stats: EngineStats, pins: PinTable, *,
                 sync: bool) -> None:
        self.sb = sb
        self.regions = regions
        self.index = index
        self.allocator = allocator
        self.policy = policy
        self.writer = writer
        self.ring = ring
        self.pool = pool
        self.stats = stats
        self.pins = pins
        self.sync = sync  # headers durable before a put in their region is answered
        self.upr = sb.region_size // UNIT
        self._preparing: deque[list] = deque()  # [region, done, ok] in generation order
        self._reclaiming = 0
        self._quarantine: dict[int, float] = {}  # region -> when to try it again
        self.last_error = ""  # why the last header write failed

    @property
    def idle(self) -> bool:
        return not self._preparing and not self._reclaiming

    def step(self) -> None:
        """Start whatever brings the clean pool up to what the writer needs (turn end)."""
        r = self.regions
        want = max(CLEAN_TARGET, self.writer.want_regions)
        supply = len(r.clean) + len(self._preparing) + self._reclaiming
        held_back = False  # pins held back every region that could have gone
        self.policy.earn(self.stats.written_bytes - self.stats.reinserted_bytes)
        while supply < want:
            region = self._free_region()
            if region is not None:
                self._prepare(region)
            elif self._reclaiming:
                break  # one reclaim at a time: its image read is a whole region
            else:
                candidates = r.reclaimable(self.policy.by_age)
                if len(candidates) and len(self.pins):
                    candidates = self._not_held_by_pins(candidates)
                    held_back = not len(candidates)
                if not len(candidates):
                    break
                self._reclaim(self.policy.victim(r, candidates))
            supply += 1
        if self.writer.want_regions and not supply:
            if self._quarantine:
                # Nothing clean, nothing on the way, and the free regions are those whose
                # header writes just failed: the device is refusing writes. Fail the
                # waiting puts now rather than hold them until it recovers, if ever.
                self.writer.fail_queued("device write failed: no region could be prepared "
                                        f"({self.last_error})")
            elif held_back:
                # Every region that could go holds more pinned bytes than one reclaim may
                # copy: the waiting puts get NO_SPACE now, not whenever pins expire.
                self.writer.fail_queued("no space: the regions that could be evicted are "
                                        "held by pinned blocks", no_space=True)

    def _pinned_slots(self) -> np.ndarray:
        """Index slots of the pinned blocks the index holds."""
        tags = np.array(self.pins.live(), dtype=np.uint64)
        if not len(tags):
            return np.zeros(0, dtype=np.int64)
        slots, found = self.index.get_many(tags)
        return slots[found]

    def _not_held_by_pins(self, candidates: np.ndarray) -> np.ndarray:
        """The candidates whose pinned blocks one reclaim can copy forward. Where pins
        hold back a region a by-age policy would take, the others are taken from the
        crash-ordering rule's own list (regions.py), as for any non-FIFO order."""
        slots = self._pinned_slots()
        if not len(slots):
            return candidates
        regions = self.index.locs[slots].astype(np.int64) // self.upr
        pinned = np.bincount(regions, weights=entry_bytes(self.index.metas[slots]),
                             minlength=self.regions.n)
        limit = self.sb.region_size * self.policy.copy_fraction
        if self.policy.by_age and (pinned[candidates] > limit).any():
            candidates = self.regions.reclaimable(False)
        return candidates[pinned[candidates] <= limit]

    def _free_region(self) -> int | None:
        free = np.flatnonzero(self.regions.state == FREE)
        if not len(free):
            return None
        if not self._quarantine:
            return int(free[0])
        now = time.monotonic()
        for region in free.tolist():
            if self._quarantine.get(region, 0.0) <= now:
                self._quarantine.pop(region, None)
                return region
        return None

    # ---- preparing: a new header, then into the clean pool ----------------------------

    def _prepare(self, region: int) -> None:
        r = self.regions
        assert r.state[region] == FREE
        gen = self.allocator.next_seq()
        r.state[region] = PREPARING
        r.gen[region] = gen
        buf = self.pool.acquire(UNIT)
        buf.view[:UNIT] = fmt.pack_region_header(fmt.RegionHeader(region, gen, self.sb.uuid))
        entry = [region, False, False]
        self._preparing.append(entry)
        self.ring.writev(self.sb.region_offset(region), [(buf.addr, UNIT)], self._prepared,
                         (entry, buf), self.sync)

    def _prepared(self, arg: tuple[list, IoBuffer], res: int) -> None:
        entry, buf = arg
        self.pool.release(buf)
        entry[1], entry[2] = True, res == UNIT
        if res == UNIT:
            self.stats.written_bytes += UNIT
        else:
            self.last_error = describe_io_result("write", res)
            log.error("writing the header of region %d failed: %s; retrying in %.0fs",
                      entry[0], self.last_error, RETRY_AFTER_S)
        while self._preparing and self._preparing[0][1]:
            region, _, ok = self._preparing.popleft()
            if ok:
                self.regions.prepared(region)
            else:
                self.regions.state[region] = FREE
                self._quarantine[region] = time.monotonic() + RETRY_AFTER_S

    # ---- reclaiming --------------------------------------------------------------------

    def _reclaim(self, victim: int) -> None:
        r = self.regions
        assert r.state[victim] == SEALED and r.inflight[victim] == 0
        wanted = self._keep(victim)
        self._reclaiming += 1
        if not wanted:
            self._drop(victim, [], None)
            return
        # Read the region back while its entries are still indexed (and readable).
        r.state[victim] = RECLAIMING
        image = self.pool.acquire(self.sb.region_size)
        self.ring.read(self.sb.region_offset(victim), image.addr, self.sb.region_size,
                       self._image_read, (victim, wanted, image))

    def _keep(self, victim: int) -> list[int]:
        """Locations of the victim's entries the policy copies forward, within the
        reinsertion budget."""
        budget = int(self.sb.region_size * self.policy.copy_fraction)
        slots = self._slots(victim)
        keep: list[int] = []
        if len(self.pins) and len(slots):
            pinned = np.isin(self.index.tags[slots], np.array(self.pins.live(), dtype=np.uint64))
            pinned &= (self.index.metas[slots] & np.uint32(META_HEAD)) == 0
            if pinned.any():
                keep = slots[pinned].tolist()
                budget -= int(entry_bytes(self.index.metas[slots[pinned]]).sum())
                slots = slots[~pinned]
        keep += self.policy.keep(slots, max(budget, 0))
        return self.index.locs[keep].tolist()

    def _slots(self, region: int) -> np.ndarray:
        lo = region * self.upr
        return self.index.slots_at(self.regions.written_tags(region), lo, lo + self.upr)

    def _image_read(self, arg: tuple[int, list[int], IoBuffer], res: int) -> None:
        victim, wanted, image = arg
        if res != self.sb.region_size:
            log.warning("reading region %d back for reinsertion failed: %s; evicting it whole",
                        victim, describe_io_result("read", res))
            wanted = []
        self._drop(victim, wanted, image)

    def _drop(self, victim: int, wanted: list[int], image: IoBuffer | None) -> None:
        """Drop the victim's index entries, free it, and copy its wanted blocks forward."""
        r = self.regions
        slots = self._slots(victim)
        # Where each entry is now, its stamp and whether it was read (reads may have come
        # in meanwhile).
        index = self.index
        still = dict(zip(index.locs[slots].tolist(),
                         zip(index.stamps[slots].tolist(),
                             ((index.metas[slots] & np.uint32(META_HIT)) != 0).tolist()))) \
            if wanted else {}
        gen = int(r.gen[victim])
        base = victim * self.upr
        blocks = []
        if image is not None:
            for loc in sorted(wanted):
                if loc not in still:
                    continue  # rewritten or deleted meanwhile
                entry = parse_entry(image.view[: self.sb.region_size], (loc - base) * UNIT,
                                    gen, copy=False)
                if entry is not None and not entry[0].flags:
                    blocks.append((entry, still[loc]))
        self.index.remove_slots(slots)
        r.free(victim)
        self.stats.evicted_blocks += len(slots)
        self.stats.evicted_regions += 1
        self._reclaiming -= 1
        keeps_hits = self.policy.copies_keep_hit_mark
        for (header, payload), (stamp, hit) in blocks:
            op = self.writer.stage(header.block_id, len(payload), REINSERT)
            op.pieces[0].payload[:] = payload
            op.stamp = stamp
            op.hit = hit and keeps_hits
            self.writer.reinserting[block_tag(header.block_id)] = op
            self.writer.commit(op, None)
        if image is not None:
            self.pool.release(image)
        self._prepare(victim)

