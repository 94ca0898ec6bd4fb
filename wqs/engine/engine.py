"""The storage engine: KV blocks appended into fixed-size regions of a raw device.

Write path: a put reserves space at the head of the open region under the lock, then
writes header and payload with O_DIRECT writes outside the lock, then publishes the
new location in the index. Concurrent puts are group-committed, as LevelDB's writer
queue does: they queue, and the thread at the front writes the whole queue as one
reservation and a few large writes while the others sleep until theirs is done. The
writes of a group go to the device as one batch (native AIO where available), each
chunk submitted as soon as it is laid out. When no region is free, the oldest sealed
region (FIFO) or the least recently read one (LRU, but never ahead of an older region
holding versions that newer writes superseded) is reclaimed whole, after its recently
read blocks have been copied forward (reinsertion).

Read path: look up the location, read the entry outside the lock, and return the
payload only if the header checksum, the block ID, the region generation and the
payload checksum all match. Anything else is a miss. get_many looks a batch up under
one lock and reads it as one device batch, verifying each entry as its read completes.

See FORMAT.md beside this file for the on-device layout and recovery.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import threading
import time
import uuid as uuidlib
from array import array
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np

from wqs.config import EngineConfig
from wqs.engine import format as fmt
from wqs.engine.dram import DramTier, make_dram_tier
from wqs.engine.index import META_HEAD, META_HIT, META_LEN_MASK, Index, Location, block_tag
from wqs.engine.stats import EngineStats
from wqs.errors import BlockTooLarge, DeviceError, FormatError
from wqs.nvme.buffers import BufferPool
from wqs.nvme.device import BlockDevice, aligned_buffer

log = logging.getLogger("wqs.engine")

UNIT = fmt.UNIT
FREE, OPEN, SEALED = 0, 1, 2
MIN_REGIONS = 3  # one open, one being reclaimed, one sealed
MIN_REGION_SIZE = 1024 * 1024
REINSERT_FRACTION = 0.5  # at most this share of a new region is filled by reinsertion
# Group commit: how many groups may be written at once (so one group's copies overlap
# another's IO), and the most bytes one group takes from the queue.
MAX_COMMITTERS = 2
COMMIT_GROUP_BYTES = 4 * 1024 * 1024
# A run of entries is written in chunks of at most this many bytes, up to WRITE_WINDOW
# of them in one device batch: one large write at a time leaves a device's queue mostly
# idle, and the window bounds the buffer memory one group holds.
WRITE_CHUNK = 512 * 1024
WRITE_WINDOW = 16
# A segmented block's segments are read this many at a time, and get_many reads at
# most this many bytes per device batch (both bound the buffer memory a read holds).
SEGMENT_WINDOW = 8
READ_WINDOW = 32 * 1024 * 1024
# Up to this many entries are published one by one: below it, numpy's cost per call
# exceeds what its batch operations save (measured: 2.9 against 4.7 µs per entry at 32,
# 2.9 against 2.7 at 128).
SCALAR_PUBLISH_MAX = 96

Buffer = bytes | bytearray | memoryview
T = TypeVar("T")
_ZEROS = memoryview(bytes(UNIT))  # padding source: an entry pads less than one unit


@dataclass(slots=True)
class _Piece:
    """One entry to append: a whole block, the head of a segmented one, or a segment."""

    block_id: bytes
    payload: memoryview
    flags: int = 0
    total_len: int = 0
    segment_index: int = 0  # for ENTRY_SEGMENT: which one (1..n-1)
    elen: int = 0  # bytes on the device, header and padding included

    def __post_init__(self) -> None:
        self.elen = fmt.entry_len(self.payload.nbytes)


@dataclass(slots=True)
class _Slot:
    """Space reserved for a piece: where it goes and the seq/gen it is written with."""

    region: int
    offset: int  # within the region
    gen: int
    seq: int


@dataclass(eq=False)
class _PendingWrite:
    """Pieces of one put_many group waiting in the commit queue, and how it ended."""

    pieces: list[_Piece]
    nbytes: int  # on the device
    puts: int
    put_bytes: int
    hot: dict[bytes, bytes]
    done: bool = False
    error: BaseException | None = None
    # Handed over with the wake-up when this write's thread is to commit a group.
    group: "list[_PendingWrite] | None" = None
    # Held until the write's thread is to wake: its own lock, so that finishing a
    # group wakes exactly the threads it concerns, not every waiting writer.
    wake: threading.Lock = dataclasses.field(default_factory=threading.Lock)


def _as_view(data: Buffer) -> memoryview:
    view = memoryview(data)
    if view.ndim != 1 or view.format not in ("B", "b", "c") or not view.c_contiguous:
        view = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
    return view


def check_formattable(device: BlockDevice, force: bool) -> None:
    """Refuse a device that carries a filesystem, a partition table or a WQS format."""
    if force:
        return
    view = _read_unit(device, 0)
    sb = fmt.unpack_superblock(view)
    if sb is not None or fmt.has_superblock_magic(view):
        ident = sb.uuid_str() if sb else "damaged superblock"
        raise FormatError(
            f"{device.path} already holds a WQS device ({ident}); pass force to reformat"
        )
    # libblkid knows every filesystem and partition-table signature; ask it rather than
    # keep our own list. blkid -p exits 2 when it finds nothing.
    try:
        probe = subprocess.run(
            ["blkid", "-p", "-o", "export", device.path],
            capture_output=True, text=True, timeout=30,
        )
    except FileNotFoundError:
        raise FormatError(
            "blkid (util-linux) is needed to check the device for existing filesystems; "
            "install it or pass force"
        ) from None
    if probe.returncode == 0:
        found = " ".join(
            line for line in probe.stdout.splitlines() if line.startswith(("TYPE=", "PTTYPE="))
        )
        raise FormatError(f"{device.path} carries a signature ({found}); pass force to overwrite")
    if probe.returncode != 2:
        raise FormatError(f"blkid could not probe {device.path}: {probe.stderr.strip()}")


class Engine:
    """A WQS device, open for puts and gets. Thread-safe."""

    # ---- formatting and opening ------------------------------------------------------

    @staticmethod
    def format(device: BlockDevice, config: EngineConfig, *, force: bool = False) -> fmt.Superblock:
        """Write a fresh superblock and an empty checkpoint. Destroys what the device held."""
        if config.region_size % UNIT or config.region_size < MIN_REGION_SIZE:
            raise FormatError(
                f"region_size {config.region_size} must be a multiple of {UNIT} and >= 1 MiB"
            )
        check_formattable(device, force)
        meta_off, meta_size, data_off, n = fmt.compute_geometry(device.size, config.region_size)
        if n < MIN_REGIONS:
            raise FormatError(
                f"{device.path}: {device.size} bytes hold {n} regions of {config.region_size}; "
                f"need at least {MIN_REGIONS} (use a bigger device or a smaller region_size)"
            )
        sb = fmt.Superblock(
            uuid=uuidlib.uuid4().bytes, device_size=device.size,
            region_size=config.region_size, num_regions=n,
            max_block_size=config.max_block_size, meta_offset=meta_off, meta_size=meta_size,
            data_offset=data_off, flags=fmt.SB_CLEAN, checkpoint_seq=1,
            created_unix=int(time.time()),
        )
        # An empty checkpoint: every region free, an empty index.
        regions = _RegionTable(n)
        index = Index()
        body = _checkpoint_body(regions, index)
        header = fmt.CheckpointHeader(
            seq=1, next_seq=2, index_capacity=index.capacity, index_count=0,
            body_len=len(body), body_checksum=fmt.checksum(body), flags=fmt.CKP_SUPERSEDED,
        )
        _write_padded(device, meta_off, fmt.pack_checkpoint_header(header) + body)
        device.flush()
        _write_padded(device, 0, fmt.pack_superblock(sb))
        device.flush()
        log.info("formatted %s: uuid %s, %d regions of %d B", device.path, sb.uuid_str(), n,
                 sb.region_size)
        return sb

    @classmethod
    def open(cls, device: BlockDevice, config: EngineConfig) -> "Engine":
        """Open a formatted device, recovering its index from the checkpoint or a scan."""
        sb = fmt.unpack_superblock(_read_unit(device, 0))
        if sb is None:
            raise FormatError(f"{device.path} is not a WQS device (no valid superblock); "
                              "run `wqs format` first")
        if sb.data_offset + sb.num_regions * sb.region_size > device.size:
            raise FormatError(f"{device.path} is smaller than its superblock says "
                              f"({device.size} < {sb.device_size})")
        engine = cls(device, sb, config)
        engine._recover()
        return engine

    def __init__(self, device: BlockDevice, sb: fmt.Superblock, config: EngineConfig) -> None:
        if device.align > UNIT or UNIT % device.align:
            raise DeviceError(f"device alignment {device.align} does not divide {UNIT}")
        if config.io_engine not in ("auto", device.io_engine):
            raise DeviceError(f"{device.path} was opened with io_engine {device.io_engine}, "
                              f"the configuration asks for {config.io_engine}")
        self.device = device
        self.sb = sb
        self.config = config
        self.max_block_size = min(config.max_block_size, sb.max_block_size)
        # The largest payload one entry holds: a region less its header unit.
        self.segment_max = sb.region_size - UNIT - fmt.ENTRY_HEADER_SIZE
        self.units_per_region = sb.region_size // UNIT
        data_units = sb.num_regions * self.units_per_region
        self.stats_counters = EngineStats()
        self.regions = _RegionTable(sb.num_regions)
        self.index = Index(max_capacity=2 * data_units + 1)
        self.dram: DramTier | None = make_dram_tier(config.dram_cache_bytes, config.dram_policy)
        self.buffers = BufferPool()
        # Group commit state. Invariant: the queue is empty unless MAX_COMMITTERS
        # threads are committing, so a put never waits while a committer slot is free.
        self._commit_mutex = threading.Lock()
        self._commit_queue: deque[_PendingWrite] = deque()
        self._committers = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # signalled when in-flight writes end
        self._seq = 1
        self._active = -1
        self._active_ptr = 0
        self._access_clock = 0
        self._waiting_idle = 0  # threads in _wait_idle: only then is notify worth its cost
        # (entry ID, gen, loc) of entries reads found corrupt, to be buried (_bury_corrupt).
        self._corrupt: list[tuple[bytes, int, int]] = []
        self._closed = False

    # ---- public API ------------------------------------------------------------------

    def put(self, block_id: bytes, data: Buffer) -> None:
        """Store a block. Returns once its bytes are on the device."""
        self.put_many([(block_id, data)])

    def put_many(self, items: Sequence[tuple[bytes, Buffer]]) -> None:
        """Store many blocks; neighbours are coalesced into large writes.

        A batch is written in groups of at most a quarter of the device's regions, so
        concurrent large batches can always make room by evicting.
        """
        views = []
        for block_id, data in items:
            assert len(block_id) == 16, "block IDs are 16 bytes"
            view = _as_view(data)
            if view.nbytes > self.max_block_size:
                raise BlockTooLarge(
                    f"block of {view.nbytes} B exceeds max_block_size {self.max_block_size}"
                )
            views.append((block_id, view))
        group_limit = max(1, self.sb.num_regions // 4) * (self.sb.region_size - UNIT)
        group: list[_Piece] = []
        hot: dict[bytes, bytes] = {}
        group_bytes = group_puts = group_payload = 0
        for block_id, view in views:
            pieces = self._split(block_id, view)
            size = sum(p.elen for p in pieces)
            if group and group_bytes + size > group_limit:
                self._group_commit(_PendingWrite(group, group_bytes, group_puts, group_payload,
                                                 hot))
                group, hot, group_bytes, group_puts, group_payload = [], {}, 0, 0, 0
            group.extend(pieces)
            if self.dram is not None:
                hot[block_id] = view.tobytes()  # copied now: the caller may reuse its buffer
            group_bytes += size
            group_puts += 1
            group_payload += view.nbytes
        if group:
            self._group_commit(_PendingWrite(group, group_bytes, group_puts, group_payload, hot))

    def get(self, block_id: bytes) -> bytes | None:
        """The block's bytes, or None on a miss (absent, evicted or failing its checksum)."""
        return self._get(block_id, bytes)

    def get_into(self, block_id: bytes, out: Buffer) -> int | None:
        """Copy the block into `out` (any writable contiguous buffer: bytearray, numpy
        array, pinned host memory); its length, or None on a miss.

        An SSD hit is copied once, from the read buffer straight into `out`. Raises
        ValueError (and copies nothing) if `out` is read-only or too small.
        """
        target = _as_view(out)
        if target.readonly:
            raise ValueError("out buffer is read-only")

        def copy_in(payload: Buffer) -> int:
            n = len(payload)
            if target.nbytes < n:
                raise ValueError(f"out buffer holds {target.nbytes} B, block is {n} B")
            target[:n] = payload
            return n

        return self._get(block_id, copy_in)

    def _get(self, block_id: bytes, take: Callable[[Buffer], T]) -> T | None:
        """get() and get_into(): take(payload) for a hit, while an SSD hit's payload is
        still a view into the read buffer; None, counted as a miss, otherwise."""
        assert len(block_id) == 16, "block IDs are 16 bytes"
        if self.dram is not None:
            value = self.dram.get(block_id)
            if value is not None:
                result = take(value)
                self._count_hit(dram=True, nbytes=len(value))
                return result
        found = self._lookup(block_id)
        if found is not None:
            loc, plen, gen, is_head = found
            if is_head:
                value = self._read_segmented(block_id, loc, plen, gen)
                if value is not None:
                    return self._take_ssd_hit(block_id, loc, value, take)
            else:
                with self.buffers.borrow(fmt.entry_len(plen)) as buf:
                    self.device.read_into(self._device_offset(loc), buf)
                    entry = self._check_entry(block_id, loc, gen, buf, copy=False)
                    if entry is not None:
                        return self._take_ssd_hit(block_id, loc, entry[1], take)
        with self._lock:
            self.stats_counters.gets += 1
            self.stats_counters.misses += 1
        self._bury_corrupt()
        return None

    def _take_ssd_hit(self, block_id: bytes, loc: int, payload: Buffer,
                      take: Callable[[Buffer], T]) -> T:
        """take(payload) for a block read from `loc`, counted and offered to the DRAM tier."""
        result = take(payload)
        self._count_hit(dram=False, nbytes=len(payload))
        if self.dram is not None:
            # get()'s own copy serves the tier too; get_into's target is the caller's.
            value = result if type(result) is bytes else bytes(payload)
            with self._lock:
                self._admit_to_dram(block_id, value, loc)
        return result

    def _admit_to_dram(self, block_id: bytes, value: bytes, loc: int) -> None:
        """Put a block read from `loc` into the DRAM tier (lock held), but only if no newer
        write (or delete) of it was published meanwhile: that writer fills the tier
        itself, and must not be overtaken."""
        assert self.dram is not None
        current = self.index.get(block_tag(block_id))
        if current is not None and current.loc == loc:
            self.dram.put(block_id, value)

    def get_many(self, block_ids: Sequence[bytes]) -> list[bytes | None]:
        """get() for a batch, results in the order of block_ids: one index lookup under
        one lock, then one device batch for every block not in the DRAM tier."""
        if len(block_ids) == 1:
            return [self.get(block_ids[0])]  # a batch of one costs more than a get
        values: list[bytes | None] = [None] * len(block_ids)
        todo = []
        dram_hits = dram_bytes = 0
        for i, block_id in enumerate(block_ids):
            assert len(block_id) == 16, "block IDs are 16 bytes"
            value = self.dram.get(block_id) if self.dram is not None else None
            if value is None:
                todo.append(i)
            else:
                values[i] = value
                dram_hits += 1
                dram_bytes += len(value)
        found = self._lookup_many([block_ids[i] for i in todo])
        reads = [(i, f) for i, f in zip(todo, found) if f is not None and not f[3]]
        heads = [(i, f) for i, f in zip(todo, found) if f is not None and f[3]]
        entries = self._read_entries([(block_ids[i], f[0], f[1], f[2]) for i, f in reads])
        read_locs = []
        ssd_bytes = 0
        got = [(i, f, None if e is None else e[1]) for (i, f), e in zip(reads, entries)]
        # Segmented blocks one at a time, each with its segments in parallel.
        got += [(i, f, self._read_segmented(block_ids[i], f[0], f[1], f[2])) for i, f in heads]
        for i, f, value in got:
            if value is not None:
                values[i] = value
                read_locs.append((i, f[0], value))
                ssd_bytes += len(value)
        with self._lock:
            c = self.stats_counters
            c.gets += len(block_ids)
            c.hits_dram += dram_hits
            c.hits_ssd += len(read_locs)
            c.misses += len(todo) - len(read_locs)
            c.get_bytes += dram_bytes + ssd_bytes
            if self.dram is not None:
                for i, loc, value in read_locs:
                    self._admit_to_dram(block_ids[i], value, loc)
        self._bury_corrupt()
        return values

    def exists(self, block_id: bytes) -> bool:
        """Whether the index holds the block. No IO: a later get may still miss."""
        if self.dram is not None and block_id in self.dram:
            return True
        with self._lock:
            return block_tag(block_id) in self.index

    def exists_many(self, block_ids: Iterable[bytes]) -> list[bool]:
        ids = list(block_ids)
        hot = [self.dram is not None and b in self.dram for b in ids]
        with self._lock:  # once for the batch, not once per ID
            return [h or block_tag(b) in self.index for b, h in zip(ids, hot)]

    def lookup_prefix(self, block_ids: Iterable[bytes]) -> int:
        """How many leading block IDs are present (prefix-cache hit length, in blocks)."""
        found = self.exists_many(block_ids)
        return next((i for i, hit in enumerate(found) if not hit), len(found))

    def delete(self, block_id: bytes) -> bool:
        """Remove a block; True if it was present. Durable: it stays deleted after a crash."""
        hot = False
        if self.dram is not None:
            hot = block_id in self.dram
            self.dram.remove(block_id)
        with self._lock:
            present = block_tag(block_id) in self.index
        if not present:
            return hot
        # The tombstone makes the delete survive a scan-based recovery.
        self._append([_Piece(block_id, memoryview(b""), flags=fmt.ENTRY_TOMBSTONE)])
        with self._lock:
            self.stats_counters.deletes += 1
            if self.dram is not None:
                self.dram.remove(block_id)  # again: a get may have refilled it meanwhile
        return True

    def evict_all(self) -> int:
        """Drop every block (admin call). Returns how many index entries were dropped."""
        with self._lock:
            self._wait_idle()
            n = self.index.count
            self.index.clear()
            if self.dram is not None:
                self.dram.clear()
            self.regions.reset()
            self._active = -1
            self.stats_counters.evicted_blocks += n
            # Invalidate region headers so a crash-recovery scan cannot bring them back.
            with self.buffers.borrow(UNIT) as view:
                view[:] = bytes(UNIT)
                for r in range(self.sb.num_regions):
                    self.device.write(self.sb.region_offset(r), view)
            self.device.flush()
            return n

    def stats(self) -> EngineStats:
        with self._lock:
            s = EngineStats(**self.stats_counters.as_dict())
            s.regions_total = self.sb.num_regions
            s.regions_free = int(np.count_nonzero(self.regions.state == FREE))
            s.regions_used = s.regions_total - s.regions_free
            s.used_bytes = int(self.regions.write_ptr[self.regions.state != FREE].sum())
            s.capacity_bytes = self.sb.num_regions * self.sb.region_size
            s.index_entries = self.index.count
            s.index_bytes = self.index.nbytes
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

    def close(self) -> None:
        """Clean shutdown: wait for writes, persist the index, mark the superblock clean."""
        if not self._closed:
            self._bury_corrupt()  # before the checkpoint: the index already lacks them
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wait_idle()
            if self._active >= 0:
                self.regions.state[self._active] = SEALED
                self._active = -1
            self._write_checkpoint()
        self.device.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- write path ------------------------------------------------------------------

    def _split(self, block_id: bytes, view: memoryview) -> list[_Piece]:
        """A block as entries: one if it fits in a region, else a head plus segments."""
        if view.nbytes <= self.segment_max:
            return [_Piece(block_id, view)]
        m = self.segment_max
        n = (view.nbytes + m - 1) // m
        pieces = [_Piece(block_id, view[:m], fmt.ENTRY_HEAD, total_len=view.nbytes)]
        for k in range(1, n):
            pieces.append(_Piece(block_id, view[k * m : (k + 1) * m], fmt.ENTRY_SEGMENT,
                                 segment_index=k))
        return pieces

    def _group_commit(self, write: _PendingWrite) -> None:
        """Queue a write and return once it is on the device (or raise why not).

        As in LevelDB's writer queue: a put that finds a committer slot free writes at
        once. Otherwise it sleeps on its own lock until a committer either finishes it
        or, finishing its own group, hands it the slot together with the next group
        (the queue's front, up to COMMIT_GROUP_BYTES). A failure fails every write of
        its group, none of which was published.
        """
        write.wake.acquire()
        with self._commit_mutex:
            if self._committers < MAX_COMMITTERS:
                assert not self._commit_queue
                self._committers += 1
                group: list[_PendingWrite] | None = [write]
            else:
                self._commit_queue.append(write)
                group = None
        if group is None:
            write.wake.acquire()  # released by the committer that finished or chose us
            group = write.group
        if group is not None:  # our group always holds our own write
            error: BaseException | None = None
            try:
                self._append([p for w in group for p in w.pieces],
                             puts=sum(w.puts for w in group),
                             put_bytes=sum(w.put_bytes for w in group),
                             hot={k: v for w in group for k, v in w.hot.items()})
            except BaseException as e:  # handed to every writer of the group
                error = e
            with self._commit_mutex:
                for w in group:
                    w.done, w.error = True, error
                    if w is not write:
                        w.wake.release()
                if self._commit_queue:  # hand our slot to the next group's first write
                    leader = self._commit_queue.popleft()
                    leader.group = self._take_group(leader)
                    leader.wake.release()
                else:
                    self._committers -= 1
        assert write.done
        if write.error is not None:
            raise write.error

    def _take_group(self, leader: _PendingWrite) -> list[_PendingWrite]:
        """The leader and the queued writes after it, up to COMMIT_GROUP_BYTES in all."""
        group, nbytes = [leader], leader.nbytes
        queue = self._commit_queue
        while queue and nbytes + queue[0].nbytes <= COMMIT_GROUP_BYTES:
            nbytes += queue[0].nbytes
            group.append(queue.popleft())
        return group

    def _append(self, pieces: list[_Piece], puts: int = 0, put_bytes: int = 0,
                hot: dict[bytes, bytes] | None = None) -> None:
        """Reserve, write, publish: the engine lock is taken twice, never during IO."""
        need = sum(p.elen for p in pieces)
        per_region = self.sb.region_size - UNIT
        if -(-need // per_region) > max(1, self.sb.num_regions - 2):
            raise BlockTooLarge(
                f"a write of {need} B needs {-(-need // per_region)} regions; this device "
                f"has {self.sb.num_regions}, and one write may use all but two of them")
        with self._lock:
            if self._closed:
                raise DeviceError("engine is closed")
            # Wait, holding nothing, until enough regions are free or evictable: writes
            # in flight pin their regions, and reserving into them would deadlock.
            while self._available_regions() < self._regions_needed(need):
                self._waiting_idle += 1
                try:
                    self._idle.wait(1.0)
                finally:
                    self._waiting_idle -= 1
            slots = [self._reserve(p.elen) for p in pieces]
        written = False
        try:
            ids = self._entry_ids(pieces, slots)
            self._write_runs(_contiguous_runs(pieces, slots), ids)
            if self.config.sync:
                self.device.flush()
            written = True
        finally:
            with self._lock:
                for s in slots:
                    self.regions.inflight[s.region] -= 1
                if written:
                    current = self._publish(ids, pieces, slots)
                    # The DRAM tier follows the index: a block enters it only while
                    # this write is the newest, under the same lock.
                    if hot:
                        for entry_id, ok in zip(ids, current):
                            if ok and entry_id in hot:
                                self.dram.put(entry_id, hot[entry_id])
                    self.stats_counters.puts += puts
                    self.stats_counters.put_bytes += put_bytes
                if self._waiting_idle:
                    self._idle.notify_all()

    @staticmethod
    def _entry_ids(pieces: list[_Piece], slots: list[_Slot]) -> list[bytes]:
        ids = []
        head_seq = 0
        for p, s in zip(pieces, slots):
            if p.flags & fmt.ENTRY_HEAD:
                head_seq = s.seq
            if p.flags & fmt.ENTRY_SEGMENT:
                ids.append(fmt.segment_id(p.block_id, head_seq, p.segment_index))
            else:
                ids.append(p.block_id)
        return ids

    def _write_runs(self, runs: list[list[tuple[int, _Piece, _Slot]]], ids: list[bytes]) -> None:
        """Write runs as chunks of at most WRITE_CHUNK bytes, WRITE_WINDOW chunks per
        device batch; returns when every write has ended, raises if any failed."""
        chunks = [chunk for run in runs for chunk in _split_run(run, WRITE_CHUNK)]
        for start in range(0, len(chunks), WRITE_WINDOW):
            with ExitStack() as borrowed:

                def filled() -> Iterator[tuple[int, memoryview]]:
                    # Lazily: the device starts each chunk's write while the next one
                    # is being filled.
                    for chunk in chunks[start : start + WRITE_WINDOW]:
                        buf = borrowed.enter_context(
                            self.buffers.borrow(sum(p.elen for _, p, _ in chunk)))
                        self._fill_chunk(buf, chunk, ids)
                        first = chunk[0][2]
                        yield self.sb.region_offset(first.region) + first.offset, buf

                self.device.write_many(filled())

    @staticmethod
    def _fill_chunk(buf: memoryview, run: list[tuple[int, _Piece, _Slot]],
                    ids: list[bytes]) -> None:
        """Lay out entries that sit back to back in one region, as the device keeps them."""
        pos = 0
        for i, p, s in run:
            n = p.payload.nbytes
            end = pos + fmt.ENTRY_HEADER_SIZE
            buf[pos:end] = fmt.pack_entry_header(ids[i], s.gen, s.seq, n, fmt.checksum(p.payload),
                                                 p.flags, p.total_len)
            buf[end : end + n] = p.payload
            # Zero the padding so stale bytes never look like data.
            buf[end + n : pos + p.elen] = _ZEROS[: pos + p.elen - end - n]
            pos += p.elen
        assert pos == len(buf)

    def _publish(self, ids: list[bytes], pieces: list[_Piece],
                 slots: list[_Slot]) -> list[bool]:
        """Point the index at written entries, except where a newer version is already
        there (a concurrent put of the same ID that reserved later space wins). Returns
        which entries it published. Called with the lock held, so readers see all of
        a batch or none of it.
        """
        if len(pieces) > SCALAR_PUBLISH_MAX:
            return self._publish_batch(ids, pieces, slots)
        published = []
        for entry_id, piece, slot in zip(ids, pieces, slots):
            tag = block_tag(entry_id)
            current = self.index.get(tag)
            if current is not None and self._newer_than(current.loc, slot):
                self.regions.supersede(slot.region)  # obsolete on arrival
                published.append(False)
                continue
            loc = slot.region * self.units_per_region + slot.offset // UNIT
            if self._index_entry(tag, current, piece.flags, loc, piece.payload.nbytes,
                                 piece.payload):
                self.regions.record_one(slot.region, tag)
            published.append(True)
        return published

    def _index_entry(self, tag: int, older: Location | None, flags: int, loc: int,
                     payload_len: int, tombstone: Buffer = b"") -> bool:
        """Let the entry at `loc` replace `older`, the version the index holds now: point
        the index at it, or for a tombstone (whose payload is `tombstone`) drop `older`
        if it hides it. The version made obsolete is counted. Publishing and the
        recovery scan both come through here. Whether the index now points at the new
        entry."""
        if flags & fmt.ENTRY_TOMBSTONE:
            if older is not None and self._hides(tombstone, older.loc):
                self.regions.supersede(older.loc // self.units_per_region)
                self.index.remove(tag)
            return False
        if older is not None:
            self.regions.supersede(older.loc // self.units_per_region)
        self.index.put(tag, loc, payload_len, META_HEAD if flags & fmt.ENTRY_HEAD else 0)
        return True

    def _publish_batch(self, ids: list[bytes], pieces: list[_Piece],
                       slots: list[_Slot]) -> list[bool]:
        """_publish in numpy operations over the whole batch."""
        assert not any(p.flags & fmt.ENTRY_TOMBSTONE for p in pieces), "deletes come alone"
        n, upr = len(pieces), self.units_per_region
        tags = np.fromiter((block_tag(i) for i in ids), dtype=np.uint64, count=n)
        locs = np.fromiter((s.region * upr + s.offset // UNIT for s in slots), dtype=np.int64,
                           count=n)
        gens = np.fromiter((s.gen for s in slots), dtype=np.uint64, count=n)
        metas = np.fromiter(
            (p.payload.nbytes | (META_HEAD if p.flags & fmt.ENTRY_HEAD else 0) for p in pieces),
            dtype=np.uint32, count=n)
        held, found = self.index.get_many(tags)
        cur_locs = self.index.locs[held].astype(np.int64)
        cur_gens = self.regions.gen[cur_locs // upr]
        newer = found & ((cur_gens > gens) | ((cur_gens == gens) & (cur_locs > locs)))
        publish = ~newer
        regions = locs // upr
        # Obsolete: what this batch overwrites, what arrived after a newer version, and
        # all but the last of an ID the batch itself holds twice (put_many keeps the last).
        _, last = np.unique(tags[::-1], return_index=True)
        repeated = np.ones(n, dtype=bool)
        repeated[n - 1 - last] = False
        self.regions.supersede(np.concatenate(
            [cur_locs[found & publish & ~repeated] // upr, regions[newer | (publish & repeated)]]))
        final = publish & ~repeated  # distinct tags: put_many can use the slots found above
        self.index.put_many(tags[final], locs[final].astype(np.uint32), metas[final],
                            held[final])
        for region in np.unique(regions[final]).tolist():
            self.regions.record(region, tags[final & (regions == region)])
        return publish.tolist()

    def _hides(self, tombstone: Buffer, loc: int) -> bool:
        """Whether a tombstone with this payload hides the version at `loc`."""
        hides = fmt.tombstone_hides(tombstone)
        return hides is None or (int(self.regions.gen[loc // self.units_per_region]), loc) <= hides

    def _newer_than(self, loc: int, slot: _Slot) -> bool:
        region = loc // self.units_per_region
        return (int(self.regions.gen[region]), loc) > (
            slot.gen, slot.region * self.units_per_region + slot.offset // UNIT
        )

    def _reserve(self, elen: int) -> _Slot:
        """Space for one entry at the head of the open region. Called with the lock held."""
        assert elen <= self.sb.region_size - UNIT
        if self._active < 0 or self._active_ptr + elen > self.sb.region_size:
            self._open_new_region()
        slot = _Slot(self._active, self._active_ptr, int(self.regions.gen[self._active]),
                     self._next_seq())
        # Pinned from now on: a region with writes in flight is never reclaimed, not even
        # for the rest of this same batch.
        self.regions.inflight[self._active] += 1
        self._active_ptr += elen
        self.regions.write_ptr[self._active] = self._active_ptr
        return slot

    def _regions_needed(self, nbytes: int) -> int:
        """New regions a write of nbytes may open, beyond the room left in the open one."""
        room = self.sb.region_size - self._active_ptr if self._active >= 0 else 0
        if nbytes <= room:
            return 0
        # +1: entries do not split, so each region may end with an unusable tail.
        return -(-(nbytes - room) // (self.sb.region_size - UNIT)) + 1

    def _available_regions(self) -> int:
        """Regions a new reservation could use without waiting: free ones, and those
        _reclaim can take one after another."""
        free = int(np.count_nonzero(self.regions.state == FREE))
        return free + len(self._reclaimable(in_turn=True))

    def _reclaimable(self, *, in_turn: bool = False) -> np.ndarray:
        """The sealed regions _reclaim may take now, not pinned by writes in flight; with
        in_turn, also those it may take once the ones before them are gone.

        FIFO takes them in write order. LRU may not: where a region holds entries that a
        later write superseded, reclaiming the later write's region first would let a
        crash scan find the old version with nothing newer to hide it. So under LRU, no
        region newer than the oldest one holding superseded entries goes before it (in
        turn, only a pinned one holds the rest back). Where blocks are rarely rewritten
        (KV blocks named by their content), that leaves LRU free; with many rewrites it
        tends to FIFO.
        """
        r = self.regions
        usable = (r.state == SEALED) & (r.inflight == 0)
        if self.config.eviction == "lru":
            holders = (r.state != FREE) & (r.superseded > 0)
            if in_turn:
                holders &= r.inflight > 0
            if holders.any():
                usable &= r.gen <= r.gen[holders].min()
        return np.flatnonzero(usable)

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq += 1
        return seq

    def _open_new_region(self) -> None:
        if self._active >= 0:
            self.regions.state[self._active] = SEALED
            self._active = -1
        free = np.nonzero(self.regions.state == FREE)[0]
        reinsert: list[tuple[bytes, bytes]] = []
        if len(free) == 0:
            region, reinsert = self._reclaim()
        else:
            region = int(free[0])
        gen = self._next_seq()
        with self.buffers.borrow(UNIT) as view:
            view[:] = fmt.pack_region_header(fmt.RegionHeader(region, gen, self.sb.uuid))
            self.device.write(self.sb.region_offset(region), view)
        self.regions.open(region, gen, self._tick())
        self._active, self._active_ptr = region, UNIT
        if reinsert:
            self._reinsert(reinsert)

    def _reclaim(self) -> tuple[int, list[tuple[bytes, bytes]]]:
        """Evict a whole sealed region; returns it and the hit blocks to copy forward."""
        r = self.regions
        candidates = self._reclaimable()
        if len(candidates) == 0:
            raise DeviceError("no region can be reclaimed: every region has writes in flight")
        key = r.last_access if self.config.eviction == "lru" else r.gen
        victim = int(candidates[np.argmin(key[candidates])])
        lo = victim * self.units_per_region
        slots = self.index.slots_at(r.written_tags(victim), lo, lo + self.units_per_region)
        reinsert = self._read_hits(victim, slots) if self.config.reinsert_hits else []
        self.index.remove_slots(slots)
        r.state[victim] = FREE
        r.write_ptr[victim] = 0
        self.stats_counters.evicted_blocks += len(slots)
        self.stats_counters.evicted_regions += 1
        return victim, reinsert

    def _read_hits(self, region: int, slots: np.ndarray) -> list[tuple[bytes, bytes]]:
        """The still-valid, recently read, unsegmented blocks of a region being reclaimed."""
        budget = int(self.sb.region_size * REINSERT_FRACTION)
        wanted = []
        for s in slots:
            meta = int(self.index.metas[s])
            if not meta & META_HIT or meta & META_HEAD:
                continue
            elen = fmt.entry_len(meta & META_LEN_MASK)
            if elen <= budget:
                wanted.append(int(self.index.locs[s]))
                budget -= elen
        if not wanted:
            return []
        gen = int(self.regions.gen[region])
        base = region * self.units_per_region
        out = []
        # This runs under the engine lock: one large read beats many small ones.
        with self.buffers.borrow(self.sb.region_size) as image:
            self.device.read_into(self.sb.region_offset(region), image)
            for loc in sorted(wanted):
                entry = _parse_entry(image, (loc - base) * UNIT, gen)
                if entry is not None and not entry[0].flags:
                    out.append((entry[0].block_id, entry[1]))
        return out

    def _reinsert(self, blocks: list[tuple[bytes, bytes]]) -> None:
        """Append reclaimed hit blocks to the fresh region in one write (lock held)."""
        pieces, slots = [], []
        for block_id, payload in blocks:
            if block_tag(block_id) in self.index:
                continue  # rewritten meanwhile
            pieces.append(_Piece(block_id, memoryview(payload)))
            slots.append(self._reserve(pieces[-1].elen))
            assert slots[-1].region == self._active  # the budget keeps them in one region
        if not pieces:
            return
        ids = [p.block_id for p in pieces]
        try:
            self._write_runs(_contiguous_runs(pieces, slots), ids)
        finally:
            for slot in slots:
                self.regions.inflight[slot.region] -= 1
        self._publish(ids, pieces, slots)
        self.stats_counters.reinserted_blocks += len(pieces)

    def _tick(self) -> int:
        self._access_clock += 1
        return self._access_clock

    def _wait_idle(self) -> None:
        self._waiting_idle += 1
        try:
            while int(self.regions.inflight.sum()) > 0:
                self._idle.wait()
        finally:
            self._waiting_idle -= 1

    # ---- read path -------------------------------------------------------------------

    def _count_hit(self, *, dram: bool, nbytes: int) -> None:
        with self._lock:
            self.stats_counters.gets += 1
            self.stats_counters.get_bytes += nbytes
            if dram:
                self.stats_counters.hits_dram += 1
            else:
                self.stats_counters.hits_ssd += 1

    def _lookup(self, entry_id: bytes) -> tuple[int, int, int, bool] | None:
        """(loc, payload_len, region gen, is_head) for an entry, marking it read."""
        tag = block_tag(entry_id)
        with self._lock:
            found = self.index.mark_hit(tag)
            if found is None:
                return None
            region = found.loc // self.units_per_region
            self.regions.last_access[region] = self._tick()
            return found.loc, found.payload_len, int(self.regions.gen[region]), found.head

    def _lookup_many(self, entry_ids: Sequence[bytes]) -> list[tuple[int, int, int, bool] | None]:
        """_lookup for a batch, under one lock acquisition."""
        n = len(entry_ids)
        if n == 0:
            return []
        tags = np.fromiter((block_tag(e) for e in entry_ids), dtype=np.uint64, count=n)
        with self._lock:
            slots, found = self.index.get_many(tags)
            held = slots[found]
            self.index.metas[held] |= np.uint32(META_HIT)
            locs = self.index.locs[held].astype(np.int64)
            metas = self.index.metas[held]
            regions = locs // self.units_per_region
            self.regions.last_access[regions] = self._tick()
            gens = self.regions.gen[regions]
        it = zip(locs.tolist(), (metas & np.uint32(META_LEN_MASK)).tolist(), gens.tolist(),
                 (metas & np.uint32(META_HEAD) != 0).tolist())
        return [next(it) if hit else None for hit in found.tolist()]

    def _read_segmented(self, block_id: bytes, loc: int, plen: int, gen: int) -> bytes | None:
        """A segmented block whose head entry is at `loc`, or None if any piece is
        missing or damaged.

        The head's header is read first (one unit) for the IDs of the other segments;
        then the head and the segments are read together, SEGMENT_WINDOW at a time. The
        pieces stay in the read buffers until one join copies them out: copying each
        piece out first doubled the copying, the larger cost of a 32 MiB read where
        memory bandwidth is low.
        """
        with self.buffers.borrow(UNIT) as unit:
            self.device.read_into(self._device_offset(loc), unit)
            head = fmt.unpack_entry_header(unit)
        if (head is None or head.block_id != block_id or head.gen != gen
                or head.payload_len != plen or not head.flags & fmt.ENTRY_HEAD
                or plen == 0 or head.total_len <= plen):
            self._read_verified(block_id, loc, plen, gen)  # counts why it is unusable
            return None
        count = -(-head.total_len // plen)
        ids = [block_id] + [fmt.segment_id(block_id, head.seq, k) for k in range(1, count)]
        parts: list[Buffer] = []
        with ExitStack() as keep:
            for start in range(0, count, SEGMENT_WINDOW):
                window = ids[start : start + SEGMENT_WINDOW]
                found = self._lookup_many(window[1:] if start == 0 else window)
                if start == 0:
                    found.insert(0, (loc, plen, gen, True))
                wanted = []
                for k, (entry_id, f) in enumerate(zip(window, found)):
                    if f is None or f[3] != (start + k == 0):
                        return None
                    wanted.append((entry_id, f[0], f[1], f[2]))
                for entry in self._read_entries(wanted, keep):
                    if entry is None:
                        return None
                    parts.append(entry[1])
            if sum(len(p) for p in parts) != head.total_len:
                return None
            return b"".join(parts)

    def _read_verified(self, entry_id: bytes, loc: int, plen: int,
                       gen: int) -> tuple[fmt.EntryHeader, bytes] | None:
        with self.buffers.borrow(fmt.entry_len(plen)) as buf:
            self.device.read_into(self._device_offset(loc), buf)
            return self._check_entry(entry_id, loc, gen, buf)

    def _read_entries(self, wanted: list[tuple[bytes, int, int, int]],
                      keep: ExitStack | None = None) -> list[tuple[fmt.EntryHeader, Buffer] | None]:
        """_read_verified for a batch of (entry_id, loc, payload_len, gen), read as one
        device batch (READ_WINDOW bytes at a time, so a huge batch does not need its
        whole size in buffers at once). With `keep`, payloads are views into a buffer
        that stays borrowed until `keep` closes, instead of copies."""
        sizes = [fmt.entry_len(plen) for _, _, plen, _ in wanted]
        if keep is None and len(wanted) > 1 and sum(sizes) > READ_WINDOW:
            entries: list[tuple[fmt.EntryHeader, Buffer] | None] = []
            start = total = 0
            for end, n in enumerate(sizes):
                if total and total + n > READ_WINDOW:
                    entries += self._read_entries(wanted[start:end])
                    start, total = end, 0
                total += n
            return entries + self._read_entries(wanted[start:])
        entries = [None] * len(wanted)
        if not wanted:
            return entries
        # One buffer for the batch, cut at entry boundaries (multiples of UNIT, so every
        # piece stays aligned for O_DIRECT): one pool round trip instead of one per entry.
        with ExitStack() as local:
            arena = (keep or local).enter_context(self.buffers.borrow(sum(sizes)))
            bufs, pos = [], 0
            for n in sizes:
                bufs.append(arena[pos : pos + n])
                pos += n

            def verify(i: int) -> None:  # runs as each read completes, while others fly
                entry_id, loc, _, gen = wanted[i]
                entries[i] = self._check_entry(entry_id, loc, gen, bufs[i], copy=keep is None)

            try:
                self.device.read_many([(self._device_offset(loc), buf)
                                       for (_, loc, _, _), buf in zip(wanted, bufs)], verify)
            finally:
                for buf in bufs:
                    buf.release()
        return entries

    def _bury_corrupt(self) -> None:
        """Write a tombstone for each entry that reads found corrupt.

        Dropping it from the index serves this run; but a crash scan later would skip
        the corrupt entry and find an older, intact version of the block with nothing
        newer to hide it. The tombstone names the corrupt entry's position, so it hides
        that version and older ones only, not one written since. A failed write is
        logged: the reads were answered right, only that protection is missing.
        """
        if not self._corrupt:  # the common case, read without the lock
            return
        with self._lock:
            corrupt, self._corrupt = self._corrupt, []
        for entry_id, gen, loc in corrupt:
            hides = memoryview(fmt.TOMBSTONE_HIDES.pack(gen, loc))
            try:
                self._append([_Piece(entry_id, hides, flags=fmt.ENTRY_TOMBSTONE)])
            except (DeviceError, BlockTooLarge) as e:
                log.error("could not write the tombstone of a corrupt entry at loc %d: %s",
                          loc, e)

    def _device_offset(self, loc: int) -> int:
        region, unit = divmod(loc, self.units_per_region)
        return self.sb.region_offset(region) + unit * UNIT

    def _check_entry(self, entry_id: bytes, loc: int, gen: int, buf: memoryview,
                     copy: bool = True) -> tuple[fmt.EntryHeader, Buffer] | None:
        """The entry read from `loc` into buf if it is whole and holds entry_id; else
        None, counted as a stale read (the region was reclaimed or the block rewritten
        under the read) or as a checksum failure (then dropped from the index). Its
        payload is a copy, or (copy=False) a view into buf."""
        entry = _parse_entry(buf, 0, gen, copy)
        if entry is not None and entry[0].entry_len == len(buf) and entry[0].block_id == entry_id:
            return entry
        with self._lock:
            current = self.index.get(block_tag(entry_id))
            region_gen = int(self.regions.gen[loc // self.units_per_region])
            if region_gen != gen or current is None or current.loc != loc:
                self.stats_counters.stale_reads += 1
            else:
                self.stats_counters.checksum_failures += 1
                self.index.remove(block_tag(entry_id), loc)
                self._corrupt.append((entry_id, gen, loc))
        return None

    # ---- recovery --------------------------------------------------------------------

    def _recover(self) -> None:
        started = time.monotonic()
        how = "checkpoint"
        if not (self.sb.clean and self._load_checkpoint()):
            how = "scan"
            self._scan()
        self.regions.rebuild_tags(self.index, self.units_per_region)
        self.stats_counters.recovered_blocks = self.index.count
        # From here on the checkpoint is stale: a crash must lead to a scan.
        self.sb = dataclasses.replace(self.sb, flags=self.sb.flags & ~fmt.SB_CLEAN, checkpoint_seq=0)
        _write_padded(self.device, 0, fmt.pack_superblock(self.sb))
        self.device.flush()
        log.info("recovered %d blocks from %s in %.2fs (uuid %s, io_engine %s)",
                 self.index.count, how, time.monotonic() - started, self.sb.uuid_str(),
                 self.device.io_engine)

    def _write_checkpoint(self) -> None:
        self._seq += 1
        body = _checkpoint_body(self.regions, self.index)
        limit = self.sb.meta_size - UNIT
        assert len(body) <= limit, f"checkpoint of {len(body)} B exceeds its area of {limit} B"
        header = fmt.CheckpointHeader(
            seq=self._seq, next_seq=self._seq + 1, index_capacity=self.index.capacity,
            index_count=self.index.count, body_len=len(body), body_checksum=fmt.checksum(body),
            flags=fmt.CKP_SUPERSEDED,
        )
        _write_padded(self.device, self.sb.meta_offset, fmt.pack_checkpoint_header(header) + body)
        self.device.flush()
        self.sb = dataclasses.replace(self.sb, flags=self.sb.flags | fmt.SB_CLEAN,
                              checkpoint_seq=self._seq)
        _write_padded(self.device, 0, fmt.pack_superblock(self.sb))
        self.device.flush()

    def _load_checkpoint(self) -> bool:
        with self.buffers.borrow(UNIT) as view:
            self.device.read_into(self.sb.meta_offset, view)
            header = fmt.unpack_checkpoint_header(view)
        if header is None or header.seq != self.sb.checkpoint_seq:
            log.warning("checkpoint missing or stale; scanning the device")
            return False
        if header.body_len > self.sb.meta_size - UNIT:
            return False
        raw = bytearray(fmt.round_up(header.body_len, UNIT))
        with self.buffers.borrow(len(raw)) as view:
            self.device.read_into(self.sb.meta_offset + UNIT, view)
            raw[:] = view
        body = memoryview(raw)[: header.body_len]
        if fmt.checksum(body) != header.body_checksum:
            log.warning("checkpoint checksum mismatch; scanning the device")
            return False
        n, cap = self.sb.num_regions, header.index_capacity
        arrays = _split_body(body, n, cap)
        if arrays is None:
            return False
        gen, write_ptr, state, tags, locs, metas = arrays
        self.regions.gen[:] = gen
        self.regions.write_ptr[:] = write_ptr
        if header.flags & fmt.CKP_SUPERSEDED:  # only whether there are any, not how many
            self.regions.superseded[:] = (state & fmt.STATE_SUPERSEDED) != 0
        else:  # a checkpoint from before they were kept: assume every region has some
            self.regions.superseded[:] = 1
        state = state & ~np.uint8(fmt.STATE_SUPERSEDED)
        self.regions.state[:] = np.where(state == FREE, FREE, SEALED)
        self.regions.last_access[:] = gen
        self.index.tags, self.index.locs, self.index.metas = tags, locs, metas
        self.index.capacity = cap
        self.index.count = int(np.count_nonzero(tags))
        self._seq = header.next_seq
        self._access_clock = int(gen.max(initial=0))
        return True

    def _scan(self) -> None:
        """Rebuild the index from region and entry headers (after an unclean stop)."""
        found: list[tuple[int, int, list[tuple[int, fmt.EntryHeader]]]] = []
        max_seq = 0
        size = self.sb.region_size
        with self.buffers.borrow(size) as buf:
            for region in range(self.sb.num_regions):
                self.device.read_into(self.sb.region_offset(region), buf)
                rh = fmt.unpack_region_header(buf)
                if rh is None or rh.uuid != self.sb.uuid or rh.region != region:
                    continue
                entries = _scan_region(buf, rh.gen)
                max_seq = max([max_seq, rh.gen] + [h.seq for _, h, _ in entries])
                if entries:
                    found.append((rh.gen, region, entries))
        # Replaying in write order makes the newest version of every ID win.
        found.sort()
        for gen, region, entries in found:
            self.regions.gen[region] = gen
            self.regions.last_access[region] = gen
            self.regions.state[region] = SEALED
            self.regions.write_ptr[region] = entries[-1][0] + entries[-1][1].entry_len
            for offset, h, tombstone in entries:
                tag = block_tag(h.block_id)
                loc = region * self.units_per_region + offset // UNIT
                self._index_entry(tag, self.index.get(tag), h.flags, loc, h.payload_len,
                                  tombstone)
        self._seq = max_seq + 1
        self._access_clock = max_seq


def _parse_entry(buf: memoryview, pos: int, gen: int,
                 copy: bool = True) -> tuple[fmt.EntryHeader, Buffer] | None:
    """The verified entry at buf[pos:] of generation `gen` (its payload copied out, or a
    view into buf), or None."""
    header = fmt.unpack_entry_header(buf, pos)
    if header is None or header.gen != gen or pos + header.entry_len > len(buf):
        return None
    start = pos + fmt.ENTRY_HEADER_SIZE
    payload = buf[start : start + header.payload_len]
    if fmt.checksum(payload) != header.payload_checksum:
        return None
    return header, payload.tobytes() if copy else payload


def _scan_region(buf: memoryview, gen: int) -> list[tuple[int, fmt.EntryHeader, bytes]]:
    """The valid entries of one region image, in write order: (offset, header, the
    payload if the entry is a tombstone, else b"").

    Follows entry lengths from the first unit; where a header is torn or stale (a crash
    left a hole, or the region was being rewritten), it resynchronises on the next unit
    that starts with a valid header of this generation. Payloads are verified, so only
    entries whose whole write completed come back.
    """
    words = np.frombuffer(buf, dtype="<u4")
    stride = UNIT // 4
    candidates = (np.nonzero(words[stride::stride] == fmt.ENTRY_MAGIC)[0] + 1) * UNIT
    entries = []
    next_free = UNIT
    for pos in candidates.tolist():
        if pos < next_free:
            continue
        h = fmt.unpack_entry_header(buf, pos)
        if h is None or h.gen != gen or pos + h.entry_len > len(buf):
            continue
        start = pos + fmt.ENTRY_HEADER_SIZE
        if fmt.checksum(buf[start : start + h.payload_len]) != h.payload_checksum:
            next_free = pos + h.entry_len  # the header is sound, so its length is too
            continue
        tombstone = b""
        if h.flags & fmt.ENTRY_TOMBSTONE:
            tombstone = bytes(buf[start : start + h.payload_len])
        entries.append((pos, h, tombstone))
        next_free = pos + h.entry_len
    return entries


class _RegionTable:
    """Per-region state in numpy arrays (a region is the unit of allocation and eviction).

    Each region also keeps the index tags of the entries published into it (8 B per
    entry), so that reclaiming it finds its index slots by probing for those tags:
    scanning the whole index instead costs time in proportion to the device (30 ms
    per reclaim at 30 M slots, about a terabyte of 64 KiB blocks), under the engine lock.
    """

    def __init__(self, n: int) -> None:
        self.gen = np.zeros(n, dtype=np.uint64)
        self.write_ptr = np.zeros(n, dtype=np.uint32)
        self.state = np.zeros(n, dtype=np.uint8)
        self.last_access = np.zeros(n, dtype=np.uint64)
        self.inflight = np.zeros(n, dtype=np.int64)
        # Entries a later write made obsolete (a newer version, or a tombstone), which
        # a crash scan would bring back if that later write's region went first.
        self.superseded = np.zeros(n, dtype=np.uint32)
        self._tags = [array("Q") for _ in range(n)]

    def open(self, region: int, gen: int, now: int) -> None:
        self.gen[region] = gen
        self.state[region] = OPEN
        self.write_ptr[region] = UNIT
        self.last_access[region] = now
        self.superseded[region] = 0
        self._tags[region] = array("Q")

    def reset(self) -> None:
        self.gen[:] = 0
        self.write_ptr[:] = 0
        self.state[:] = FREE
        self.last_access[:] = 0
        self.superseded[:] = 0
        self._tags = [array("Q") for _ in range(len(self._tags))]

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
        self._tags = [array("Q") for _ in range(len(self._tags))]
        for part in np.split(np.arange(len(tags)), bounds):
            if len(part):
                self.record(int(regions[part[0]]), tags[part])


def _checkpoint_body(regions: _RegionTable, index: Index) -> bytes:
    return b"".join(
        a.tobytes()
        for a in (regions.gen, regions.write_ptr, _states_with_marks(regions),
                  index.tags, index.locs, index.metas)
    )


def _states_with_marks(regions: _RegionTable) -> np.ndarray:
    """Region states as the checkpoint keeps them: STATE_SUPERSEDED on live regions
    holding superseded entries."""
    marked = (regions.superseded > 0) & (regions.state != FREE)
    return regions.state | np.where(marked, fmt.STATE_SUPERSEDED, 0).astype(np.uint8)


def _split_body(body: memoryview, n: int, cap: int) -> tuple[np.ndarray, ...] | None:
    layout = [(np.uint64, n), (np.uint32, n), (np.uint8, n), (np.uint64, cap),
              (np.uint32, cap), (np.uint32, cap)]
    if sum(np.dtype(t).itemsize * k for t, k in layout) != len(body):
        return None
    out, pos = [], 0
    for dtype, count in layout:
        nbytes = np.dtype(dtype).itemsize * count
        out.append(np.frombuffer(body[pos : pos + nbytes], dtype=dtype).copy())
        pos += nbytes
    return tuple(out)


def _contiguous_runs(pieces: list[_Piece],
                     slots: list[_Slot]) -> list[list[tuple[int, _Piece, _Slot]]]:
    """Group pieces whose reserved space is back to back in the same region."""
    runs: list[list[tuple[int, _Piece, _Slot]]] = []
    for i, (p, s) in enumerate(zip(pieces, slots)):
        if runs:
            _, lp, ls = runs[-1][-1]
            if ls.region == s.region and ls.offset + lp.elen == s.offset:
                runs[-1].append((i, p, s))
                continue
        runs.append([(i, p, s)])
    return runs


def _split_run(run: list[tuple[int, _Piece, _Slot]],
               limit: int) -> list[list[tuple[int, _Piece, _Slot]]]:
    """A contiguous run as back-to-back chunks of at most `limit` bytes (or one entry)."""
    chunks: list[list[tuple[int, _Piece, _Slot]]] = [[]]
    size = 0
    for item in run:
        elen = item[1].elen
        if chunks[-1] and size + elen > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += elen
    return chunks


def _read_unit(device: BlockDevice, offset: int) -> memoryview:
    """One UNIT of the device (superblock, headers), outside the hot path."""
    buf = memoryview(aligned_buffer(UNIT))
    device.read_into(offset, buf)
    return buf


def _write_padded(device: BlockDevice, offset: int, data: bytes) -> None:
    buf = memoryview(aligned_buffer(fmt.round_up(len(data), UNIT)))
    buf[: len(data)] = data  # the rest is already zero
    device.write(offset, buf)


def open_or_create(path: str, size: int, config: EngineConfig) -> Engine:
    """The embedded default: open the device at `path`, creating and formatting a file
    of `size` bytes there first if nothing exists yet."""
    from wqs.nvme.device import DirectDevice

    engine, threads = config.io_engine, config.io_threads
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        device = DirectDevice.create_file(path, size, io_engine=engine, io_threads=threads)
        Engine.format(device, config, force=True)  # a file we just created holds nothing
    else:
        device = DirectDevice(path, io_engine=engine, io_threads=threads)
    try:
        return Engine.open(device, config)
    except Exception:
        device.close()
        raise
