"""The engine core: one device's index, regions, DRAM tier and IO, driven by one loop.

Everything here is owned by the thread running the loop it was built on (a shard's,
or the synchronous facade's in engine.py): no locks, no threads, nothing blocks. Calls
start work and return; results come back through callbacks from the loop: a write's
when its group is published, a read's when its entries are verified. At the end of
each turn the loop calls `flush`, which buries corrupt entries, forms write groups,
lets the reclaimer refill the clean pool, and submits all of the turn's IO at once.

Parts, each in its own module: regions.py (region table, clean pool, crash-ordering
rule), allocator.py (space in the open region), policy.py (victim ranking), writer.py
(staging, group commit, publishing), reader.py (lookup, read, verify), reclaim.py
(victim to clean region), recovery.py (checkpoint, scan, the shared apply step).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from wqs.config import EngineConfig
from wqs.engine import format as fmt
from wqs.engine import recovery
from wqs.engine.allocator import Allocator
from wqs.engine.dram import make_dram_tier
from wqs.engine.index import META_HEAD, META_LEN_MASK, block_tag
from wqs.engine.pins import PinTable
from wqs.engine.policy import make_policy
from wqs.engine.reader import DEFERRED, GetOp, Reader, ReadResult  # noqa: F401 - DEFERRED: re-exported
from wqs.engine.recency import RecencyClock
from wqs.engine.reclaim import Reclaimer
from wqs.engine.regions import CLEAN, FREE, PREPARING
from wqs.engine.stats import EngineStats
from wqs.engine.writer import BURY, DELETE, PutOp, Writer
from wqs.errors import DeviceError
from wqs.loop.reactor import Reactor
from wqs.nvme.buffers import BufferPool, IoBuffer
from wqs.nvme.device import BlockDevice, unwatch_ring, watch_ring

log = logging.getLogger("wqs.engine")

UNIT = fmt.UNIT
_UNUSED = (FREE, PREPARING, CLEAN)  # regions holding no entries
Buffer = bytes | bytearray | memoryview


def as_byte_view(data: Any) -> memoryview:
    """A flat byte view of any C-contiguous buffer."""
    view = memoryview(data)
    if view.ndim != 1 or view.format not in ("B", "b", "c") or not view.c_contiguous:
        view = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
    return view


class EngineCore:
    """A recovered device, open for IO on `reactor`."""

    def __init__(self, device: BlockDevice, rec: recovery.Recovered, config: EngineConfig,
                 reactor: Reactor) -> None:
        if device.align > UNIT or UNIT % device.align:
            raise ValueError(f"device alignment {device.align} does not divide {UNIT}")
        sb = rec.sb
        self.device = device
        self.sb = sb
        self.config = config
        self.reactor = reactor
        self.max_block_size = min(config.max_block_size, sb.max_block_size)
        self.stats_counters = EngineStats(recovered_blocks=rec.index.count)
        self.regions = rec.regions
        self.index = rec.index
        # The device's own IO memory where it has some (SPDK: DMA buffers, which the
        # sockets then read into and send from directly).
        self.pool = BufferPool(allocate=getattr(device, "alloc_buffer", IoBuffer))
        self.dram = make_dram_tier(config.dram_cache_bytes, config.dram_policy)
        self.ring = device.open_ring()
        self.allocator = Allocator(self.regions, sb.region_size, rec.next_seq)
        self.clock = RecencyClock()
        self.policy = make_policy(config.eviction, self.index, sb, self.clock,
                                  reinsert_hits=config.reinsert_hits)
        self.writer = Writer(sb, self.regions, self.index, self.allocator, self.ring,
                             self.pool, self.dram, self.stats_counters, self.clock,
                             max_block_size=self.max_block_size, sync=config.sync)
        self.reader = Reader(sb, self.regions, self.index, self.ring, self.pool, self.dram,
                             self.stats_counters, self.clock, self.writer.reinserting,
                             stamp_dram_hits=self.policy.name == "block-lru")
        usable = max(1, sb.num_regions - 2) * (sb.region_size - UNIT)
        self.pins = PinTable(config.max_pin_s, int(usable * config.max_pinned_share))
        self.reclaimer = Reclaimer(sb, self.regions, self.index, self.allocator,
                                   self.policy, self.writer, self.ring, self.pool,
                                   self.stats_counters, self.pins, sync=config.sync)
        self._quiesced: list[Callable[[], None]] = []
        self._closed = False
        watch_ring(reactor, self.ring)
        reactor.on_turn_end(self.flush)

    # ---- writes -------------------------------------------------------------------

    def stage(self, block_id: bytes, nbytes: int) -> PutOp:
        """Buffers for a put of nbytes: fill op.targets with the payload, then commit.
        Raises BlockTooLarge if the engine cannot hold a block that large."""
        self.reactor.assert_owner()
        self._check_open()
        return self.writer.stage(block_id, nbytes)

    def commit(self, op: PutOp, callback: Callable[[PutOp], None] | None,
               arg: Any = None) -> None:
        """Write a staged put at the end of this turn; callback(op) once it is published
        (op.error None) or has failed (op.error says why; nothing was published)."""
        self._check_open()
        self.writer.commit(op, callback, arg)

    def discard(self, op: PutOp) -> None:
        """A staged put whose payload will never come: give its buffers back."""
        self.writer.discard(op)

    def put(self, block_id: bytes, data: Buffer, callback: Callable[[PutOp], None] | None,
            arg: Any = None) -> PutOp:
        """stage, copy data in, commit."""
        view = as_byte_view(data)
        op = self.stage(block_id, view.nbytes)
        pos = 0
        for target in op.targets:
            target[:] = view[pos : pos + len(target)]
            pos += len(target)
        self.commit(op, callback, arg)
        return op

    def delete_many(self, ids: list[bytes],
                    callback: Callable[[list[bool]], None]) -> None:
        """Delete blocks; callback(found) once each delete is durable (a tombstone is on
        the device, so a crash scan cannot bring the block back)."""
        self.reactor.assert_owner()
        self._check_open()
        found, pending = [], [0]
        results_ready = [False]

        def one_done(op: PutOp) -> None:
            if op.error is not None:
                log.error("delete of %s failed: %s", op.block_id.hex(), op.error)
            pending[0] -= 1
            if not pending[0] and results_ready[0]:
                callback(found)

        for block_id in ids:
            assert len(block_id) == 16, "block IDs are 16 bytes"
            hot = self.dram is not None and block_id in self.dram
            if hot:
                self.dram.remove(block_id)
            tag = block_tag(block_id)
            self.pins.unpin(tag)
            # A block being copied forward by the reclaimer is present too: its copy
            # may already be on the device, and a crash scan would find it without a
            # tombstone after it.
            present = tag in self.index or tag in self.writer.reinserting
            self.writer.reinserting.pop(tag, None)
            if present:
                pending[0] += 1
                self.writer.commit(self.writer.stage_tombstone(block_id, b"", DELETE), one_done)
            found.append(present or hot)
        results_ready[0] = True
        if not pending[0]:
            callback(found)

    # ---- reads --------------------------------------------------------------------

    def get(self, ids: list[bytes], callback: Callable[[GetOp], None] | None,
            arg: Any = None, max_bytes: int | None = None) -> GetOp:
        """Read a batch; callback(op) with op.results (ReadResult or None per ID; DEFERRED
        past max_bytes) once all are verified. Give each hit back with release() after
        using its views."""
        self.reactor.assert_owner()
        self._check_open()
        return self.reader.get(ids, callback, arg, max_bytes)

    def release(self, result: ReadResult) -> None:
        self.reader.release(result)

    def exists_many(self, ids: list[bytes]) -> list[bool]:
        return self.reader.exists_many(ids)

    def lookup_prefix(self, ids: list[bytes]) -> int:
        return self.reader.lookup_prefix(ids)

    def pin_many(self, ids: list[bytes], seconds: float) -> tuple[list[bool], list[bool]]:
        """Pin the stored blocks among ids for `seconds` (0: release their pins); per ID,
        whether it is stored (as exists_many says) and whether it is pinned now. See
        pins.py for the limits; a pin refused (the cap on pinned bytes, a segmented
        block, one held only by the DRAM tier) leaves the block stored, not pinned."""
        self.reactor.assert_owner()
        found = self.reader.exists_many(ids)
        pinned = [False] * len(ids)
        index, pins, moving = self.index, self.pins, self.writer.reinserting
        for i, block_id in enumerate(ids):
            if not found[i]:
                continue
            tag = block_tag(block_id)
            if seconds <= 0:
                pins.unpin(tag)
                continue
            slot = index.slot_of(tag)
            if slot is not None:
                meta = int(index.metas[slot])
                if meta & META_HEAD:
                    continue
                nbytes = fmt.entry_len(meta & META_LEN_MASK)
            elif tag in moving:  # being copied forward: the copy is what gets pinned
                nbytes = moving[tag].elen_total
            else:
                continue
            pinned[i] = pins.pin(tag, nbytes, seconds)
        return found, pinned

    # ---- the turn's end --------------------------------------------------------------

    def flush(self) -> None:
        """Bury, group, reclaim, submit: everything this turn prepared goes out at once."""
        if self._closed:
            return
        if self.reader.corrupt:
            self._bury()
        self.writer.flush()
        if self.clock.clamp_due():
            self.clock.clamp(self.index)
        self.reclaimer.step()
        self.writer.flush()  # the reclaimer may have opened room at once (a free region)
        self.ring.submit()
        if self._quiesced and self.idle:
            waiting, self._quiesced = self._quiesced, []
            for cb in waiting:
                cb()

    def _bury(self) -> None:
        """Write a tombstone for each entry that reads found corrupt.

        Dropping it from the index serves this run; but a crash scan later would skip
        the corrupt entry and find an older, intact version of the block with nothing
        newer to hide it. The tombstone names the corrupt entry's position, so it hides
        that version and older ones only, not one written since. A failed write is
        logged: the reads were answered right, only that protection is missing.
        """
        corrupt, self.reader.corrupt = self.reader.corrupt, []
        for entry_id, gen, loc in corrupt:
            hides = fmt.TOMBSTONE_HIDES.pack(gen, loc)
            self.writer.commit(self.writer.stage_tombstone(entry_id, hides, BURY),
                               self._buried, loc)

    @staticmethod
    def _buried(op: PutOp) -> None:
        if op.error is not None:
            log.error("could not write the tombstone of a corrupt entry at loc %d: %s",
                      op.arg, op.error)

    @property
    def idle(self) -> bool:
        """Nothing queued, in flight or being reclaimed."""
        return (self.writer.idle and self.reclaimer.idle and not self.ring.pending
                and not self.reader.reads_in_flight and not self.reader.corrupt)

    def quiesce(self, callback: Callable[[], None]) -> None:
        """callback() once everything started so far has completed (run from flush)."""
        self._quiesced.append(callback)

    # ---- administration (call once quiesced) ------------------------------------------

    def evict_all(self) -> int:
        """Drop every block; how many index entries were dropped. Needs idle()."""
        assert self.idle, "evict_all needs a quiesced engine"
        n = self.index.count
        self.index.clear()
        if self.dram is not None:
            self.dram.clear()
        self.allocator.reset()
        self.regions.reset()
        self.writer.reinserting.clear()
        self.pins.clear()
        self.stats_counters.evicted_blocks += n
        # Invalidate region headers so a crash-recovery scan cannot bring them back.
        with self.pool.borrow(UNIT) as buf:
            buf.view[:UNIT] = bytes(UNIT)
            for r in range(self.sb.num_regions):
                self.device.write(self.sb.region_offset(r), buf.view[:UNIT])
        self.device.flush()
        return n

    def close(self) -> None:
        """Clean shutdown, once idle: persist the index, mark the superblock clean."""
        if self._closed:
            return
        assert self.idle, "close needs a quiesced engine"
        self._closed = True
        self.allocator.seal()
        self.sb = recovery.write_checkpoint(self.device, self.sb, self.regions, self.index,
                                            self.allocator.next_seq())
        unwatch_ring(self.reactor, self.ring)
        self.ring.close()
        self.pool.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise DeviceError("engine is closed")

    # ---- status -------------------------------------------------------------------

    def stats(self) -> EngineStats:
        s = EngineStats(**self.stats_counters.as_dict())
        r = self.regions
        s.regions_total = self.sb.num_regions
        s.regions_free = int(np.count_nonzero(np.isin(r.state, _UNUSED)))
        s.regions_used = s.regions_total - s.regions_free
        s.used_bytes = int(r.write_ptr[~np.isin(r.state, _UNUSED)].sum())
        s.capacity_bytes = self.sb.num_regions * self.sb.region_size
        s.index_entries = self.index.count
        s.index_bytes = self.index.nbytes
        self.pins.purge()
        s.pinned_blocks = len(self.pins)
        s.pinned_bytes = self.pins.nbytes
        s.pins_granted = self.pins.granted
        s.pins_refused = self.pins.refused
        if self.dram is not None:
            s.dram_entries = len(self.dram)
            s.dram_bytes = self.dram.used
        return s

    def info(self) -> dict[str, object]:
        return {
            "uuid": self.sb.uuid_str(),
            "device": self.device.path,
            "format_version": self.sb.version,
            "capacity_bytes": self.sb.num_regions * self.sb.region_size,
            "device_size": self.sb.device_size,
            "region_size": self.sb.region_size,
            "num_regions": self.sb.num_regions,
            "max_block_size": self.max_block_size,
            "io_engine": self.device.io_engine,
        }

