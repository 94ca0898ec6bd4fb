"""The read path: DRAM tier, index lookup, device reads, verification.

`get` looks every ID of a batch up at once and prepares one device read per entry (the
loop's turn end submits them with everything else read or written in that turn). As
each read completes its entry is verified where it landed (header checksum, block ID,
region generation, payload checksum) and the answer is a view into that buffer: the
daemon sends it with sendmsg from there, so an SSD hit is never copied by the CPU.
The caller gives the buffers back with `release` once it is done with the views.

Anything that fails verification is a miss. If the index still points at the entry it
is corrupt: it leaves the index and is buried (a tombstone naming its position is
written, so a later crash scan cannot serve an older, intact version); otherwise the
region was reclaimed under the read, which is only a stale read.

A segmented block (larger than a region) is read in two steps: the head's header for
the IDs of its segments, then the head and all segments together.

Owned by the engine core's loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from wqs.engine import format as fmt
from wqs.engine.dram import DramTier
from wqs.engine.index import META_HEAD, META_LEN_MASK, Index, block_tag
from wqs.engine.recency import RecencyClock
from wqs.engine.regions import RegionTable
from wqs.engine.stats import EngineStats
from wqs.nvme.buffers import BufferPool, IoBuffer
from wqs.nvme.device import IoRing, describe_io_result

log = logging.getLogger("wqs.engine")

UNIT = fmt.UNIT
HEADER = fmt.ENTRY_HEADER_SIZE


class ReadResult:
    """A hit: its payload as views (one; several for a segmented block) into `bufs`,
    which stay out of the pool until Reader.release. A DRAM hit has no bufs.
    `DEFERRED` (nbytes -1) marks a hit not read because the batch's byte limit was
    reached: the caller asks for it again."""

    __slots__ = ("views", "bufs", "nbytes")

    def __init__(self, views: list[memoryview], bufs: list[IoBuffer], nbytes: int) -> None:
        self.views = views
        self.bufs = bufs
        self.nbytes = nbytes

    def tobytes(self) -> bytes:
        return bytes(self.views[0]) if len(self.views) == 1 else b"".join(self.views)


DEFERRED = ReadResult([], [], -1)


class GetOp:
    """One get batch: results[i] is a ReadResult or None; callback(op) once all are in."""

    __slots__ = ("ids", "results", "callback", "arg", "remaining", "reserved", "deferred",
                 "dram_hits", "ssd_hits", "nbytes")

    def __init__(self, ids: list[bytes], callback: Callable[["GetOp"], None] | None,
                 arg: Any = None) -> None:
        self.ids = ids
        self.results: list[ReadResult | None] = [None] * len(ids)
        self.callback = callback
        self.arg = arg
        self.remaining = 0  # reads (and segmented blocks) still outstanding
        self.reserved = 0  # payload bytes of the hits being served (what max_bytes bounds)
        self.deferred = 0
        self.dram_hits = 0
        self.ssd_hits = 0
        self.nbytes = 0


@dataclass(eq=False)
class _Segmented:
    """A segmented block being read: the head's header, then every piece."""

    op: GetOp
    i: int
    block_id: bytes
    loc: int
    plen: int
    gen: int
    unit: IoBuffer | None = None
    pieces: list[tuple[bytes, int, int, int, IoBuffer]] = field(default_factory=list)
    remaining: int = 0
    failed: bool = False


class Reader:
    def __init__(self, sb: fmt.Superblock, regions: RegionTable, index: Index, ring: IoRing,
                 pool: BufferPool, dram: DramTier | None, stats: EngineStats,
                 clock: RecencyClock, reinserting: dict[int, Any], *,
                 stamp_dram_hits: bool = False) -> None:
        self.sb = sb
        self.regions = regions
        self.index = index
        self.ring = ring
        self.pool = pool
        self.dram = dram
        self.stats = stats
        self.clock = clock
        # Blocks being copied forward (the writer's: tag -> PutOp), out of the index
        # until their copy is published: found here meanwhile, so that neither a pinned
        # block nor a hot one is ever missing while it moves.
        self.reinserting = reinserting
        # Whether a DRAM-tier hit stamps the block's index entry too (a policy that
        # ranks blocks by their stamps must see every use; it costs a probe per hit).
        self.stamp_dram_hits = stamp_dram_hits
        self.now = 0  # this read call's tick
        self.upr = sb.region_size // UNIT
        # (entry ID, gen, loc) of entries found corrupt, for the core to bury.
        self.corrupt: list[tuple[bytes, int, int]] = []
        self.reads_in_flight = 0

    def device_offset(self, loc: int) -> int:
        region, unit = divmod(loc, self.upr)
        return self.sb.region_offset(region) + unit * UNIT

    # ---- lookups (no IO) ------------------------------------------------------------

    def exists_many(self, ids: list[bytes]) -> list[bool]:
        """Whether the index (or the DRAM tier) holds each block. A probe is not a read:
        it marks nothing, so it can never keep a block from eviction."""
        index, dram, moving = self.index, self.dram, self.reinserting
        if moving:
            return [(dram is not None and b in dram) or (t := block_tag(b)) in index
                    or t in moving for b in ids]
        if dram is None:
            return [block_tag(b) in index for b in ids]
        return [b in dram or block_tag(b) in index for b in ids]

    def lookup_prefix(self, ids: list[bytes]) -> int:
        """How many leading IDs are all present (prefix-cache hit length, in blocks)."""
        index, dram, moving = self.index, self.dram, self.reinserting
        for i, b in enumerate(ids):
            if not ((dram is not None and b in dram) or (t := block_tag(b)) in index
                    or (moving and t in moving)):
                return i
        return len(ids)

    def _moving(self, block_id: bytes) -> bytes | None:
        """The payload of a block being copied forward (a copy of it: the copy's buffer
        goes back to the pool once published), or None. A read is a use: the copy
        takes this read's stamp and the mark of a block read."""
        op = self.reinserting.get(block_tag(block_id))
        if op is None:
            return None
        op.stamp = self.now
        op.hit = True
        return bytes(op.pieces[0].payload)

    def _lookup(self, entry_id: bytes) -> tuple[int, int, int, bool] | None:
        """(loc, payload_len, region gen, is_head) of an entry, marking it read."""
        found = self.index.mark_hit_raw(block_tag(entry_id), self.now)
        if found is None:
            return None
        loc, meta = found
        region = loc // self.upr
        self.regions.touch(region)
        return loc, meta & META_LEN_MASK, int(self.regions.gen[region]), bool(meta & META_HEAD)

    # ---- get --------------------------------------------------------------------------

    def get(self, ids: list[bytes], callback: Callable[[GetOp], None] | None,
            arg: Any = None, max_bytes: int | None = None) -> GetOp:
        """Start reading a batch; callback(op) runs once every result is in (at once,
        before this returns, if nothing needed the device). With max_bytes, hits past
        that many payload bytes (the first always goes) come back DEFERRED, unread."""
        op = GetOp(ids, callback, arg)
        op.remaining = 1  # held until every read is prepared, so no early finish
        self.now = now = self.clock.tick()
        dram = self.dram
        stamp_dram = self.stamp_dram_hits
        limit = max_bytes if max_bytes is not None else 1 << 62
        lookup, ring, pool, read_done = self._lookup, self.ring, self.pool, self._read_done
        for i, block_id in enumerate(ids):
            assert len(block_id) == 16, "block IDs are 16 bytes"
            if dram is not None:
                value = dram.get(block_id)
                if value is not None:
                    if op.reserved and op.reserved + len(value) > limit:
                        op.results[i] = DEFERRED
                        op.deferred += 1
                        continue
                    op.reserved += len(value)
                    op.results[i] = ReadResult([memoryview(value)], [], len(value))
                    op.dram_hits += 1
                    op.nbytes += len(value)
                    if stamp_dram:
                        self.index.stamp(block_tag(block_id), now)
                    continue
            found = lookup(block_id)
            if found is None:
                if self.reinserting and (value := self._moving(block_id)) is not None:
                    if op.reserved and op.reserved + len(value) > limit:
                        op.results[i] = DEFERRED
                        op.deferred += 1
                        continue
                    op.reserved += len(value)
                    op.results[i] = ReadResult([memoryview(value)], [], len(value))
                    op.ssd_hits += 1
                    op.nbytes += len(value)
                continue
            loc, plen, gen, head = found
            if op.reserved and op.reserved + plen > limit:
                op.results[i] = DEFERRED
                op.deferred += 1
                continue
            op.reserved += plen
            op.remaining += 1
            if head:
                self._start_segmented(_Segmented(op, i, block_id, loc, plen, gen))
                continue
            elen = (HEADER + plen + UNIT - 1) & ~(UNIT - 1)  # fmt.entry_len
            buf = pool.acquire(elen)
            self.reads_in_flight += 1
            ring.read(self.device_offset(loc), buf.addr, elen, read_done,
                      (op, i, block_id, loc, gen, buf, plen, elen))
        self._one_done(op)
        return op

    def _read_done(self, arg: tuple, res: int) -> None:
        op, i, block_id, loc, gen, buf, plen, elen = arg
        self.reads_in_flight -= 1
        view = buf.view
        if res == elen and fmt.entry_matches(view, block_id, gen, plen):
            payload = view[HEADER : HEADER + plen]
            op.results[i] = ReadResult([payload], [buf], plen)
            op.ssd_hits += 1
            op.nbytes += plen
            if self.dram is not None:
                self._admit_to_dram(block_id, loc, payload)
        else:
            if res != elen:
                self._read_failed(loc, res, elen)
            else:
                self._check_entry(block_id, loc, gen, view[:elen], plen)  # why: counted
            self.pool.release(buf)
        self._one_done(op)

    def get_one(self, block_id: bytes, callback: Callable[[Any, ReadResult | None], None],
                arg: Any) -> int:
        """get() of one block, the daemon's most frequent request, without the batch's
        bookkeeping: callback(arg, result or None) once it is verified (at once, before
        this returns, if nothing needs the device). The payload bytes a read in flight
        holds (0 if the callback has run; for a segmented block, its head's: the rest is
        known once the head is read)."""
        s = self.stats
        dram = self.dram
        self.now = self.clock.tick()
        if dram is not None:
            value = dram.get(block_id)
            if value is not None:
                s.gets += 1
                s.hits_dram += 1
                s.get_bytes += len(value)
                if self.stamp_dram_hits:
                    self.index.stamp(block_tag(block_id), self.now)
                callback(arg, ReadResult([memoryview(value)], [], len(value)))
                return 0
        found = self._lookup(block_id)
        if found is None:
            s.gets += 1
            value = self._moving(block_id) if self.reinserting else None
            if value is not None:
                s.hits_ssd += 1
                s.get_bytes += len(value)
                callback(arg, ReadResult([memoryview(value)], [], len(value)))
                return 0
            s.misses += 1
            callback(arg, None)
            return 0
        loc, plen, gen, head = found
        if head:  # a segmented block: the batch path reads its pieces
            self.get([block_id], lambda op: callback(arg, op.results[0]))
            return plen
        elen = (HEADER + plen + UNIT - 1) & ~(UNIT - 1)  # fmt.entry_len
        buf = self.pool.acquire(elen)
        self.reads_in_flight += 1
        self.ring.read(self.device_offset(loc), buf.addr, elen, self._read_one_done,
                       (callback, arg, block_id, loc, gen, buf, plen, elen))
        return plen

    def _read_one_done(self, t: tuple, res: int) -> None:
        callback, arg, block_id, loc, gen, buf, plen, elen = t
        self.reads_in_flight -= 1
        s = self.stats
        s.gets += 1
        view = buf.view
        if res == elen and fmt.entry_matches(view, block_id, gen, plen):
            payload = view[HEADER : HEADER + plen]
            s.hits_ssd += 1
            s.get_bytes += plen
            if self.dram is not None:
                self._admit_to_dram(block_id, loc, payload)
            callback(arg, ReadResult([payload], [buf], plen))
            return
        if res != elen:
            self._read_failed(loc, res, elen)
        else:
            self._check_entry(block_id, loc, gen, view[:elen], plen)  # why: counted
        self.pool.release(buf)
        s.misses += 1
        callback(arg, None)

    def get_into(self, block_id: bytes, slot: memoryview, slot_addr: int,
                 callback: Callable[[Any, ReadResult | None], None], arg: Any) -> bool:
        """Read a block straight into memory the caller does not own (a client's shared
        memory): `slot` is page-aligned and room for the whole entry (its header, the
        payload at slot[64:], padding to the unit). False, with nothing done, if this
        block cannot be read that way (not on the device, segmented, larger than the
        slot): use get_one. Else callback(arg, result) with the payload as a view of
        the slot once verified there.

        What lands in the slot is checked there, but the slot's owner can write it at
        any time: so a hit read this way never fills the DRAM tier, and an entry that
        fails the check there is read again into the engine's own buffer (get_one),
        which alone decides whether the entry on the device is damaged."""
        if not getattr(self.ring, "external_memory", True):
            return False  # a ring that needs its own DMA memory
        if self.dram is not None and block_id in self.dram:
            return False  # a copy from the tier is cheaper than the device
        self.now = self.clock.tick()
        found = self._lookup(block_id)
        if found is None:
            return False
        loc, plen, gen, head = found
        elen = (HEADER + plen + UNIT - 1) & ~(UNIT - 1)  # fmt.entry_len
        if head or elen > len(slot):
            return False
        assert slot_addr % UNIT == 0, "a direct read needs a unit-aligned slot"
        self.reads_in_flight += 1
        self.ring.read(self.device_offset(loc), slot_addr, elen, self._read_into_done,
                       (callback, arg, block_id, slot, gen, plen, elen))
        return True

    def _read_into_done(self, t: tuple, res: int) -> None:
        callback, arg, block_id, slot, gen, plen, elen = t
        self.reads_in_flight -= 1
        if res == elen and fmt.entry_matches(slot[:elen], block_id, gen, plen):
            s = self.stats
            s.gets += 1
            s.hits_ssd += 1
            s.direct_reads += 1
            s.get_bytes += plen
            callback(arg, ReadResult([slot[HEADER : HEADER + plen]], [], plen))
            return
        self.get_one(block_id, callback, arg)  # the authoritative read

    def _one_done(self, op: GetOp) -> None:
        op.remaining -= 1
        if op.remaining:
            return
        s = self.stats
        hits = op.dram_hits + op.ssd_hits
        s.gets += len(op.ids) - op.deferred
        s.hits_dram += op.dram_hits
        s.hits_ssd += op.ssd_hits
        s.misses += len(op.ids) - op.deferred - hits
        s.get_bytes += op.nbytes
        if op.callback is not None:
            op.callback(op)

    def release(self, result: ReadResult) -> None:
        """The caller is done with a hit's views: its buffers go back to the pool."""
        for v in result.views:
            v.release()
        for b in result.bufs:
            self.pool.release(b)
        result.bufs = []

    def _read_failed(self, loc: int, res: int, want: int) -> None:
        self.stats.read_errors += 1
        log.warning("device read of %d B at loc %d failed: %s (served as a miss)", want, loc,
                    describe_io_result("read", res))

    def _check_entry(self, entry_id: bytes, loc: int, gen: int, view: memoryview,
                     plen: int) -> bool:
        """Whether the entry read from `loc` into view is whole and holds entry_id; if not,
        count it as a stale read or as corrupt (then dropped from the index and queued
        for burial)."""
        h = fmt.unpack_entry_header(view)
        if h is not None and h.gen == gen and h.block_id == entry_id and h.payload_len == plen \
                and fmt.checksum(view[HEADER : HEADER + plen]) == h.payload_checksum:
            return True
        tag = block_tag(entry_id)
        current = self.index.get(tag)
        if int(self.regions.gen[loc // self.upr]) != gen or current is None \
                or current.loc != loc:
            self.stats.stale_reads += 1
        else:
            self.stats.checksum_failures += 1
            self.index.remove(tag, loc)
            self.corrupt.append((entry_id, gen, loc))
        return False

    def _admit_to_dram(self, block_id: bytes, loc: int, payload: memoryview) -> None:
        """Offer an SSD hit to the DRAM tier, but only if no newer write (or delete) of
        it was published meanwhile: that writer fills the tier itself."""
        if self.dram is None or not self.dram.admits(len(payload)):
            return
        current = self.index.get(block_tag(block_id))
        if current is not None and current.loc == loc:
            self.dram.put(block_id, bytes(payload))

    # ---- segmented blocks -------------------------------------------------------------

    def _start_segmented(self, seg: _Segmented) -> None:
        seg.unit = self.pool.acquire(UNIT)
        self.reads_in_flight += 1
        self.ring.read(self.device_offset(seg.loc), seg.unit.addr, UNIT, self._head_read, seg)

    def _head_read(self, seg: _Segmented, res: int) -> None:
        self.reads_in_flight -= 1
        unit, seg.unit = seg.unit, None
        head = fmt.unpack_entry_header(unit.view) if res == UNIT else None
        self.pool.release(unit)
        if res != UNIT:
            self._read_failed(seg.loc, res, UNIT)
        if (head is None or head.block_id != seg.block_id or head.gen != seg.gen
                or head.payload_len != seg.plen or not head.flags & fmt.ENTRY_HEAD
                or seg.plen == 0 or head.total_len <= seg.plen):
            if res == UNIT:
                # Read the whole head entry to tell a stale read from a corrupt one.
                seg.pieces = [(seg.block_id, seg.loc, seg.plen, seg.gen,
                               self.pool.acquire(fmt.entry_len(seg.plen)))]
                seg.failed = True
                self._read_pieces(seg)
            else:
                self._segmented_done(seg)
            return
        count = -(-head.total_len // seg.plen)
        seg.pieces.append((seg.block_id, seg.loc, seg.plen, seg.gen,
                           self.pool.acquire(fmt.entry_len(seg.plen))))
        for k in range(1, count):
            sid = fmt.segment_id(seg.block_id, head.seq, k)
            found = self._lookup(sid)
            if found is None or found[3]:
                seg.failed = True
                break
            loc, plen, gen, _ = found
            seg.pieces.append((sid, loc, plen, gen, self.pool.acquire(fmt.entry_len(plen))))
        if not seg.failed and sum(p[2] for p in seg.pieces) != head.total_len:
            seg.failed = True
        if seg.failed:
            for *_, buf in seg.pieces:
                self.pool.release(buf)
            seg.pieces = []
            self._segmented_done(seg)
            return
        self._read_pieces(seg)

    def _read_pieces(self, seg: _Segmented) -> None:
        seg.remaining = len(seg.pieces)
        for k, (_, loc, plen, _, buf) in enumerate(seg.pieces):
            self.reads_in_flight += 1
            self.ring.read(self.device_offset(loc), buf.addr, fmt.entry_len(plen),
                           self._piece_read, (seg, k))
        # Submitted at the end of this turn, with the rest of its reads.

    def _piece_read(self, arg: tuple[_Segmented, int], res: int) -> None:
        seg, k = arg
        self.reads_in_flight -= 1
        entry_id, loc, plen, gen, buf = seg.pieces[k]
        view = buf.view[: fmt.entry_len(plen)]
        if res != len(view):
            self._read_failed(loc, res, len(view))
            seg.failed = True
        elif not self._check_entry(entry_id, loc, gen, view, plen):
            seg.failed = True
        seg.remaining -= 1
        if not seg.remaining:
            self._segmented_done(seg)

    def _segmented_done(self, seg: _Segmented) -> None:
        op = seg.op
        if seg.pieces and not seg.failed:
            views = [buf.view[HEADER : HEADER + plen] for _, _, plen, _, buf in seg.pieces]
            total = sum(len(v) for v in views)
            op.results[seg.i] = ReadResult(views, [p[4] for p in seg.pieces], total)
            op.ssd_hits += 1
            op.nbytes += total
        else:
            for *_, buf in seg.pieces:
                self.pool.release(buf)
        seg.pieces = []
        self._one_done(op)

