"""Reclaim: keeps the pool of clean regions full, off the allocation path.

A region becomes clean when its new header (with a fresh generation) is on the device.
The reclaimer prepares FREE regions that way; when none is free it reclaims the
policy's victim among the regions the crash-ordering rule allows:

    victim -> (its recently read blocks read back, while still indexed)
           -> its index entries dropped -> FREE -> new header written -> clean pool
           -> the read-back blocks copied forward through the writer (reinsertion)

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
from wqs.engine.index import META_HEAD, META_HIT, META_LEN_MASK, Index, block_tag
from wqs.engine.policy import EvictionPolicy
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
REINSERT_FRACTION = 0.5  # at most this share of a region is copied forward per reclaim
RETRY_AFTER_S = 1.0  # a region whose header write failed is not tried again before this


class Reclaimer:
    def __init__(self, sb: fmt.Superblock, regions: RegionTable, index: Index,
                 allocator: Allocator, policy: EvictionPolicy, writer: Writer, ring: IoRing,
                 pool: BufferPool, stats: EngineStats, *, reinsert_hits: bool,
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
        self.reinsert_hits = reinsert_hits
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
        while supply < want:
            region = self._free_region()
            if region is not None:
                self._prepare(region)
            elif self._reclaiming:
                break  # one reclaim at a time: its image read is a whole region
            else:
                candidates = r.reclaimable(self.policy.by_age)
                if not len(candidates):
                    break
                self._reclaim(self.policy.victim(r, candidates))
            supply += 1
        if self.writer.want_regions and not supply and self._quarantine:
            # Nothing clean, nothing on the way, and the free regions are those whose
            # header writes just failed: the device is refusing writes. Fail the waiting
            # puts now rather than hold them until it recovers, if ever.
            self.writer.fail_queued("device write failed: no region could be prepared "
                                    f"({self.last_error})")

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
        if res != UNIT:
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
        wanted = self._hits(victim) if self.reinsert_hits else []
        self._reclaiming += 1
        if not wanted:
            self._drop(victim, [], None)
            return
        # Read the region back while its entries are still indexed (and readable).
        r.state[victim] = RECLAIMING
        image = self.pool.acquire(self.sb.region_size)
        self.ring.read(self.sb.region_offset(victim), image.addr, self.sb.region_size,
                       self._image_read, (victim, wanted, image))

    def _hits(self, victim: int) -> list[int]:
        """Locations of the recently read, unsegmented entries of the victim, up to the
        reinsertion budget: what is copied forward."""
        budget = int(self.sb.region_size * REINSERT_FRACTION)
        wanted = []
        for s in self._slots(victim).tolist():
            meta = int(self.index.metas[s])
            if not meta & META_HIT or meta & META_HEAD:
                continue
            elen = fmt.entry_len(meta & META_LEN_MASK)
            if elen <= budget:
                wanted.append(int(self.index.locs[s]))
                budget -= elen
        return wanted

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
        still = set(self.index.locs[slots].tolist()) if wanted else set()
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
                    blocks.append(entry)
        self.index.remove_slots(slots)
        r.free(victim)
        self.stats.evicted_blocks += len(slots)
        self.stats.evicted_regions += 1
        self._reclaiming -= 1
        for header, payload in blocks:
            op = self.writer.stage(header.block_id, len(payload), REINSERT)
            op.pieces[0].payload[:] = payload
            self.writer.reinserting.add(block_tag(header.block_id))
            self.writer.commit(op, None)
        if image is not None:
            self.pool.release(image)
        self._prepare(victim)

