"""The write path: staging, per-turn group commit, and publishing on completion.

A put is *staged* first: its entry buffers are taken from the pool and the payload's
bytes go straight into them, past the room left for the entry header (the daemon
receives them there with recv_into; the facade copies them in). *Committing* queues it.
At the end of the loop's turn `flush` makes groups of what is queued, reserves their
space in the open region, writes each entry's header in place, and submits every run of
back-to-back entries as one vectored write: no byte of payload is copied on the way to
the device. When all of a group's writes have completed it is *published* (the index
points at its entries, the DRAM tier takes its blocks) and its puts are answered.
Groups publish in the order they were reserved, so a put acknowledged later is never
older on the device than one acknowledged earlier, and a region's first entries are
never acknowledged before the ones reserved ahead of them.

Group growth (LevelDB's BuildBatchGroup): a group takes the queue's head and what
follows up to COMMIT_GROUP_BYTES; a put that needs more clean regions than the pool has
waits at the head, and so does everything behind it, until the reclaimer refills it.

Owned by the engine core's loop.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from wqs.engine import format as fmt
from wqs.engine import recovery
from wqs.engine.allocator import Allocator, Slot
from wqs.engine.dram import DramTier
from wqs.engine.index import META_HEAD, Index, block_tag
from wqs.engine.recency import RecencyClock
from wqs.engine.regions import RegionTable
from wqs.engine.stats import EngineStats
from wqs.errors import BlockTooLarge
from wqs.nvme.aio import IOV_MAX
from wqs.nvme.buffers import BufferPool, IoBuffer
from wqs.nvme.device import IoRing, describe_io_result

log = logging.getLogger("wqs.engine")

UNIT = fmt.UNIT
HEADER = fmt.ENTRY_HEADER_SIZE
# The most bytes one group takes from the queue, and how many groups may be in flight:
# more groups keep the device busy while earlier ones complete; the cap bounds what
# one turn may hold pinned.
COMMIT_GROUP_BYTES = 4 << 20
MAX_GROUPS_IN_FLIGHT = 8
# A run of entries goes to the device in writes of at most this many bytes: one huge
# write at a time would leave a device's queue mostly idle.
WRITE_CHUNK = 512 << 10
# Up to this many entries are published one by one: below it, numpy's cost per call
# exceeds what its batch operations save (measured: 2.9 against 4.7 µs per entry at 32,
# 2.9 against 2.7 at 128).
SCALAR_PUBLISH_MAX = 96
_ZEROS = memoryview(bytes(UNIT))  # padding source: an entry pads less than one unit

# What a put is, for publishing.
PUT, DELETE, BURY, REINSERT = range(4)


class ExternalBuffer:
    """Memory the engine writes an entry from but does not own (a client's shared
    memory, already laid out as an entry: header room, payload, padding): never
    returned to the pool."""

    __slots__ = ("view", "addr", "size")

    def __init__(self, view: memoryview, addr: int) -> None:
        assert addr % UNIT == 0 and len(view) % UNIT == 0, "an entry-shaped slot"
        self.view = view
        self.addr = addr
        self.size = len(view)


@dataclass(slots=True, eq=False)
class Piece:
    """One entry to append: a whole block, the head of a segmented one, or a segment."""

    entry_id: bytes  # the block ID; a segment's own ID once its head's seq is known
    buf: IoBuffer | ExternalBuffer | None  # header room, then payload, then padding
    plen: int
    elen: int
    flags: int = 0
    total_len: int = 0  # ENTRY_HEAD: the whole block's length
    segment_index: int = 0  # ENTRY_SEGMENT: which one (1..n-1)
    slot: Slot | None = None
    payload: memoryview = _ZEROS  # where the payload goes: the buffer past the header room

    def __post_init__(self) -> None:
        if self.buf is not None:
            self.payload = self.buf.view[HEADER : HEADER + self.plen]


@dataclass(slots=True, eq=False)
class PutOp:
    """A put (or tombstone) from staging to its answer: callback(op) with op.error None
    once it is on the device and published, else why it failed."""

    block_id: bytes
    nbytes: int
    pieces: list[Piece]
    kind: int = PUT
    callback: Callable[["PutOp"], None] | None = None
    arg: Any = None  # the caller's
    error: str | None = None
    elen_total: int = 0
    stamp: int | None = None  # REINSERT: the policy stamp the copy keeps (recency.py)
    hit: bool = False  # REINSERT: the copy keeps the mark of a block read (META_HIT)
    no_space: bool = False  # error: nothing could be evicted to make room (NO_SPACE)

    @property
    def targets(self) -> list[memoryview]:
        """Where the payload goes, in order: fill these, then commit."""
        return [p.payload for p in self.pieces]


@dataclass(eq=False)
class _Group:
    ops: list[PutOp]
    pieces: list[Piece]
    pending: int = 0  # writes in flight
    reinserts: bool = False  # holds blocks copied forward by the reclaimer
    done: bool = False
    error: str | None = None
    keep: list[Any] = field(default_factory=list)


class Writer:
    def __init__(self, sb: fmt.Superblock, regions: RegionTable, index: Index,
                 allocator: Allocator, ring: IoRing, pool: BufferPool,
                 dram: DramTier | None, stats: EngineStats, clock: RecencyClock, *,
                 max_block_size: int, sync: bool) -> None:
        self.sb = sb
        self.regions = regions
        self.index = index
        self.allocator = allocator
        self.ring = ring
        self.pool = pool
        self.dram = dram
        self.stats = stats
        self.clock = clock
        self.max_block_size = max_block_size
        self.sync = sync
        self.upr = sb.region_size // UNIT
        # The largest payload one entry holds: a region less its header unit.
        self.segment_max = sb.region_size - UNIT - HEADER
        # A put may use all regions but two (one being reclaimed, one to reclaim next).
        self.max_put_regions = max(1, sb.num_regions - 2)
        self.group_limit = min(COMMIT_GROUP_BYTES,
                               max(1, sb.num_regions // 4) * (sb.region_size - UNIT))
        self.queue: deque[PutOp] = deque()
        self.groups: deque[_Group] = deque()
        self.want_regions = 0  # clean regions the queue's head waits for
        # Blocks the reclaimer is copying forward, by tag: publish a copy only if no put
        # or delete of the same ID came in meanwhile (which removes the tag here). Until
        # it is published, reads and probes find the block here (reader.py).
        self.reinserting: dict[int, PutOp] = {}

    # ---- staging ---------------------------------------------------------------------

    def check(self, nbytes: int) -> None:
        """Raise BlockTooLarge if a block of nbytes cannot be stored (what stage checks)."""
        if nbytes > self.max_block_size:
            raise BlockTooLarge(f"block of {nbytes} B exceeds max_block_size "
                                f"{self.max_block_size}")
        m = self.segment_max
        if nbytes > m:
            elens = [fmt.entry_len(min(m, nbytes - k * m)) for k in range(-(-nbytes // m))]
            if self.allocator.place(0, 0, elens)[1] > self.max_put_regions:
                raise BlockTooLarge(
                    f"a block of {nbytes} B needs more regions than the device can give one "
                    f"write ({self.sb.num_regions} regions of {self.sb.region_size} B, all "
                    "but two usable)")

    def stage(self, block_id: bytes, nbytes: int, kind: int = PUT) -> PutOp:
        """Buffers for a put of nbytes; raises BlockTooLarge if the engine cannot hold it."""
        assert len(block_id) == 16, "block IDs are 16 bytes"
        if nbytes > self.max_block_size:
            raise BlockTooLarge(f"block of {nbytes} B exceeds max_block_size "
                                f"{self.max_block_size}")
        m = self.segment_max
        if nbytes <= m:  # one entry: it always fits a region, nothing more to check
            elen = (HEADER + nbytes + UNIT - 1) & ~(UNIT - 1)  # fmt.entry_len
            op = PutOp(block_id, nbytes, [Piece(block_id, self.pool.acquire(elen), nbytes,
                                                elen)], kind, elen_total=elen)
            return op
        else:
            n = -(-nbytes // m)
            pieces = []
            for k in range(n):
                plen = min(m, nbytes - k * m)
                elen = fmt.entry_len(plen)
                flags = fmt.ENTRY_HEAD if k == 0 else fmt.ENTRY_SEGMENT
                pieces.append(Piece(block_id, self.pool.acquire(elen), plen, elen, flags,
                                    total_len=nbytes if k == 0 else 0, segment_index=k))
        op = PutOp(block_id, nbytes, pieces, kind, elen_total=sum(p.elen for p in pieces))
        try:
            self.check(nbytes)
        except BlockTooLarge:
            self.discard(op)
            raise
        return op

    def stage_into(self, block_id: bytes, nbytes: int, slot: memoryview,
                   slot_addr: int) -> PutOp | None:
        """A put written to the device straight from `slot`, memory the caller keeps
        (its payload already at slot[64:], room for the header before it and padding
        after it), so no byte of it is copied; None if this block cannot be written that
        way (segmented, too large, a ring that needs its own DMA memory): use stage.
        The slot must stay mapped, and unchanged, until the put's callback."""
        elen = (HEADER + nbytes + UNIT - 1) & ~(UNIT - 1)  # fmt.entry_len
        if nbytes > self.segment_max or nbytes > self.max_block_size or elen > len(slot) \
                or not getattr(self.ring, "external_memory", True):
            return None
        buf = ExternalBuffer(slot[:elen], slot_addr)
        return PutOp(block_id, nbytes, [Piece(block_id, buf, nbytes, elen)], PUT,
                     elen_total=elen)

    def stage_tombstone(self, block_id: bytes, hides: bytes, kind: int) -> PutOp:
        op = self.stage(block_id, len(hides), kind)
        piece = op.pieces[0]
        piece.flags = fmt.ENTRY_TOMBSTONE
        piece.payload[:] = hides
        return op

    def discard(self, op: PutOp) -> None:
        """Give back a staged put's buffers (its payload never arrived, or is written)."""
        for p in op.pieces:
            if p.buf is not None:
                if type(p.buf) is not ExternalBuffer:
                    self.pool.release(p.buf)
                p.buf = None
                p.payload = _ZEROS

    def commit(self, op: PutOp, callback: Callable[[PutOp], None] | None,
               arg: Any = None) -> None:
        """Queue a staged put whose payload is in place; it is written at turn end."""
        op.callback, op.arg = callback, arg
        if op.kind != REINSERT and self.reinserting:
            self.reinserting.pop(block_tag(op.block_id), None)  # a newer write wins
        self.queue.append(op)

    @property
    def idle(self) -> bool:
        return not self.queue and not self.groups

    def fail_queued(self, reason: str, *, no_space: bool = False) -> None:
        """Fail every put still waiting in the queue (the device cannot take them;
        `no_space`: because nothing may be evicted now, not because a write failed; then
        the reclaimer's copies stay queued: they may carry pinned blocks, and they go
        once a pin ends)."""
        queue, self.queue = self.queue, deque()
        self.want_regions = 0
        if no_space:
            self.queue = deque(op for op in queue if op.kind == REINSERT)
            queue = deque(op for op in queue if op.kind != REINSERT)
        for op in queue:
            op.error = reason
            op.no_space = no_space
            if op.kind == PUT:
                if no_space:
                    self.stats.no_space_puts += 1
                else:
                    self.stats.write_errors += 1
            elif op.kind == REINSERT:
                self._drop_reinsert(op)
            self.discard(op)
            if op.callback is not None:
                op.callback(op)

    # ---- group commit ---------------------------------------------------------------

    def flush(self) -> None:
        """Make groups of the queue and submit their writes (the loop's turn end)."""
        self.want_regions = 0
        while self.queue and len(self.groups) < MAX_GROUPS_IN_FLIGHT:
            ops: list[PutOp] = []
            nbytes = 0
            room, need = self.allocator.room(), 0
            clean = len(self.regions.clean)
            region_room = self.allocator.region_size - UNIT
            while self.queue:
                op = self.queue[0]
                if ops and nbytes + op.elen_total > self.group_limit:
                    break
                if len(op.pieces) == 1:  # allocator.place for one entry
                    elen = op.elen_total
                    op_room, op_need = (room - elen, need) if elen <= room else \
                        (region_room - elen, need + 1)
                else:
                    op_room, op_need = self.allocator.place(room, need,
                                                            [p.elen for p in op.pieces])
                if op_need > clean:
                    if not ops:
                        self.want_regions = op_need
                    break
                room, need = op_room, op_need
                self.queue.popleft()
                ops.append(op)
                nbytes += op.elen_total
            if not ops:
                return
            self._submit_group(ops)

    def _submit_group(self, ops: list[PutOp]) -> None:
        pieces: list[Piece] = []
        for op in ops:
            head_seq = 0
            for p in op.pieces:
                slot = self.allocator.reserve(p.elen)
                assert slot is not None, "flush counted the clean regions"
                p.slot = slot
                if p.flags & fmt.ENTRY_HEAD:
                    head_seq = slot.seq
                elif p.flags & fmt.ENTRY_SEGMENT:
                    p.entry_id = fmt.segment_id(op.block_id, head_seq, p.segment_index)
                self._fill_header(p)
                pieces.append(p)
        group = _Group(ops, pieces, reinserts=any(op.kind == REINSERT for op in ops))
        self.groups.append(group)
        region_offset = self.sb.region_offset
        run: list[Piece] = []
        run_bytes = 0
        for p in pieces:
            s = p.slot
            if run:
                last = run[-1].slot
                if (s.region != last.region or s.offset != last.offset + run[-1].elen
                        or run_bytes + p.elen > WRITE_CHUNK or len(run) == IOV_MAX):
                    self._write_run(group, run, run_bytes, region_offset)
                    run, run_bytes = [], 0
            run.append(p)
            run_bytes += p.elen
        self._write_run(group, run, run_bytes, region_offset)

    def _write_run(self, group: _Group, run: list[Piece], nbytes: int,
                   region_offset: Callable[[int], int]) -> None:
        first = run[0].slot
        iov = [(p.buf.addr, p.elen) for p in run]
        group.pending += 1
        self.ring.writev(region_offset(first.region) + first.offset, iov, self._written,
                         (group, nbytes), self.sync)

    @staticmethod
    def _fill_header(p: Piece) -> None:
        """The entry header in front of the payload, and zeros after it up to the unit."""
        view, n = p.buf.view, p.plen
        s = p.slot
        end = HEADER + n
        view[:HEADER] = fmt.pack_entry_header(p.entry_id, s.gen, s.seq, n,
                                              fmt.checksum(view[HEADER:end]), p.flags,
                                              p.total_len)
        view[end : p.elen] = _ZEROS[: p.elen - end]  # stale bytes must never look like data

    def _written(self, arg: tuple[_Group, int], res: int) -> None:
        group, nbytes = arg
        if res == nbytes:
            self.stats.written_bytes += nbytes
        elif group.error is None:
            group.error = f"device write failed: {describe_io_result('write', res)}"
            log.error("%s (%d B at once)", group.error, nbytes)
        group.pending -= 1
        if group.pending:
            return
        group.done = True
        while self.groups and self.groups[0].done:
            self._publish(self.groups.popleft())

    # ---- publishing -----------------------------------------------------------------

    def _publish(self, group: _Group) -> None:
        inflight = self.regions.inflight
        for p in group.pieces:
            inflight[p.slot.region] -= 1
        assert all(inflight[p.slot.region] >= 0 for p in group.pieces), "unpinned twice"
        if group.error is None:
            now = self.clock.tick()  # the puts' use of their blocks
            keep = stamps = hits = None
            if group.reinserts:
                keep = self._reinsertions(group)
                stamps = [now if op.stamp is None else op.stamp
                          for op in group.ops for _ in op.pieces]
                hits = [op.hit for op in group.ops for _ in op.pieces]
            published = self._apply(group.pieces, keep, now, stamps, hits)
            self._after_publish(group, published)
        else:
            self.stats.write_errors += sum(op.kind == PUT for op in group.ops)
            for op in group.ops:
                if op.kind == REINSERT:
                    self._drop_reinsert(op)
        for op in group.ops:
            op.error = group.error
            self.discard(op)
            if op.callback is not None:
                op.callback(op)

    def _reinsertions(self, group: _Group) -> list[bool]:
        """Per piece, whether it may publish: a copied-forward block only if nothing
        newer of its ID came in while it was being copied."""
        keep = []
        for op in group.ops:
            ok = True
            if op.kind == REINSERT:
                tag = block_tag(op.block_id)
                ok = self.reinserting.get(tag) is op and tag not in self.index
                self._drop_reinsert(op)
                if ok:
                    self.stats.reinserted_blocks += 1
                self.stats.reinserted_bytes += op.elen_total  # written, published or not
            keep += [ok] * len(op.pieces)
        return keep

    def _drop_reinsert(self, op: PutOp) -> None:
        """The copy `op` is done (published, superseded or failed): reads stop finding
        it among the copies in flight."""
        tag = block_tag(op.block_id)
        if self.reinserting.get(tag) is op:
            del self.reinserting[tag]

    def _after_publish(self, group: _Group, published: list[bool]) -> None:
        """Answer for what was published: the DRAM tier and the counters follow it."""
        k = 0
        for op in group.ops:
            head = published[k]
            k += len(op.pieces)
            if op.kind == PUT:
                self.stats.puts += 1
                self.stats.put_bytes += op.nbytes
                if type(op.pieces[0].buf) is ExternalBuffer:
                    self.stats.direct_writes += 1
            elif op.kind == DELETE:
                self.stats.deletes += 1
            if self.dram is None:
                continue
            if op.kind in (DELETE, BURY):
                self.dram.remove(op.block_id)
            elif head and op.kind == PUT:
                # A block enters the tier only while this write is its newest version;
                # one too large for it must still push out an older version there.
                if not self.dram.admits(op.nbytes):
                    self.dram.remove(op.block_id)
                elif len(op.pieces) == 1:
                    self.dram.put(op.block_id, bytes(op.pieces[0].payload))
                else:
                    self.dram.put(op.block_id, b"".join(p.payload for p in op.pieces))

    def _apply(self, pieces: list[Piece], keep: list[bool] | None, now: int,
               stamps: list[int] | None = None, hits: list[bool] | None = None) -> list[bool]:
        """Point the index at the written entries, except where a newer version is there
        already; per piece, whether it was published. Each published entry's stamp is
        stamps[i], or `now`; hits[i] marks it read (a copy of a block read before).
        Readers see all of a group or none of it: the loop runs nothing else meanwhile."""
        if keep is None and len(pieces) > SCALAR_PUBLISH_MAX and \
                not any(p.flags & fmt.ENTRY_TOMBSTONE for p in pieces):
            return self._apply_batch(pieces, now)
        out = []
        upr, regions, index = self.upr, self.regions, self.index
        for i, p in enumerate(pieces):
            s = p.slot
            if keep is not None and not keep[i]:
                regions.supersede(s.region)  # obsolete on arrival
                out.append(False)
                continue
            tag = block_tag(p.entry_id)
            current = index.loc_of(tag)
            loc = s.region * upr + s.offset // UNIT
            if current is not None and \
                    (int(regions.gen[current // upr]), current) > (s.gen, loc):
                regions.supersede(s.region)
                out.append(False)
                continue
            tomb = p.payload if p.flags & fmt.ENTRY_TOMBSTONE else b""
            if recovery.apply_entry(index, regions, upr, tag, current, p.flags, loc, p.plen,
                                    tomb, now if stamps is None else stamps[i],
                                    hits is not None and hits[i]):
                regions.record_one(s.region, tag)
            out.append(not p.flags & fmt.ENTRY_TOMBSTONE)
        return out

    def _apply_batch(self, pieces: list[Piece], now: int) -> list[bool]:
        """_apply in numpy operations over the whole batch (no tombstones in it)."""
        n, upr = len(pieces), self.upr
        tags = np.fromiter((block_tag(p.entry_id) for p in pieces), dtype=np.uint64, count=n)
        locs = np.fromiter((p.slot.region * upr + p.slot.offset // UNIT for p in pieces),
                           dtype=np.int64, count=n)
        gens = np.fromiter((p.slot.gen for p in pieces), dtype=np.uint64, count=n)
        metas = np.fromiter(
            (p.plen | (META_HEAD if p.flags & fmt.ENTRY_HEAD else 0) for p in pieces),
            dtype=np.uint32, count=n)
        held, found = self.index.get_many(tags)
        cur_locs = self.index.locs[held].astype(np.int64)
        cur_gens = self.regions.gen[cur_locs // upr]
        newer = found & ((cur_gens > gens) | ((cur_gens == gens) & (cur_locs > locs)))
        publish = ~newer
        regions = locs // upr
        # Obsolete: what this batch overwrites, what arrived after a newer version, and
        # all but the last of an ID the batch itself holds twice (the last one wins).
        _, last = np.unique(tags[::-1], return_index=True)
        repeated = np.ones(n, dtype=bool)
        repeated[n - 1 - last] = False
        self.regions.supersede(np.concatenate(
            [cur_locs[found & publish & ~repeated] // upr, regions[newer | (publish & repeated)]]))
        final = publish & ~repeated  # distinct tags: put_many can use the slots found above
        self.index.put_many(tags[final], locs[final].astype(np.uint32), metas[final],
                            held[final], now)
        for region in np.unique(regions[final]).tolist():
            self.regions.record(region, tags[final & (regions == region)])
        return publish.tolist()
