"""Formatting and opening a device, and `Engine`: the synchronous facade over the core.

The data path runs the engine core (core.py) on a shard's event loop. Tools, tests,
benchmarks and anything else that wants plain calls use `Engine`: each call takes the
facade's lock, starts the work on the core, and turns the facade's own private loop
until that work has completed. Calls from many threads are therefore served one at a
time; what batches is a single call's own batch (put_many, get_many).

See FORMAT.md beside this file for the on-device layout and recovery.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import threading
import time
import uuid as uuidlib
from typing import Any, Callable, Iterable, Sequence

from wqs.config import EngineConfig
from wqs.engine import format as fmt
from wqs.engine import recovery
from wqs.engine.core import EngineCore, as_byte_view
from wqs.engine.index import Index
from wqs.engine.reader import GetOp
from wqs.engine.regions import RegionTable
from wqs.engine.stats import EngineStats
from wqs.engine.writer import PutOp
from wqs.errors import DeviceError, FormatError, NoSpace
from wqs.loop.reactor import Reactor
from wqs.nvme.buffers import aligned_buffer
from wqs.nvme.device import BlockDevice
from wqs.nvme.spdk_target import is_spdk_device

log = logging.getLogger("wqs.engine")

UNIT = fmt.UNIT
MIN_REGIONS = 3  # one open, one clean, one being reclaimed
MIN_REGION_SIZE = 1024 * 1024
# put_many stages at most this many bytes of blocks before it waits for them to be
# written, and get_many reads at most this many blocks at once, so a huge batch does
# not need its whole size in IO buffers at once.
FACADE_WINDOW = 64 << 20
READ_WINDOW_BLOCKS = 512

Buffer = bytes | bytearray | memoryview


def check_formattable(device: BlockDevice, force: bool) -> None:
    """Refuse a device that carries a filesystem, a partition table or a WQS format."""
    if force:
        return
    view = recovery.read_unit(device, 0)
    sb = fmt.unpack_superblock(view)
    table = fmt.unpack_shard_table(view)
    if sb is not None or table is not None or fmt.has_superblock_magic(view) \
            or bytes(view[:8]) == fmt.SHARDS_MAGIC:
        ident = (sb.uuid_str() if sb else table.uuid_str() if table else
                 "damaged superblock")
        raise FormatError(
            f"{device.path} already holds a WQS device ({ident}); pass force to reformat"
        )
    # libblkid knows every filesystem and partition-table signature; ask it rather than
    # keep our own list. blkid -p exits 2 when it finds nothing.
    if not os.path.exists(device.path):  # a device the kernel does not see (SPDK)
        with tempfile.TemporaryDirectory() as tmp:
            return _check_signatures(device, _head_and_tail_image(device, tmp))
    _check_signatures(device, device.path)


def _head_and_tail_image(device: BlockDevice, directory: str) -> str:
    """A sparse file as large as the device holding its first and last MiB, where
    filesystems and partition tables keep their signatures, for blkid to look at."""
    path = os.path.join(directory, "head-and-tail")
    span = min(device.size, 1 << 20) // UNIT * UNIT
    with open(path, "wb") as f:
        f.truncate(device.size)
        for offset in sorted({0, device.size // UNIT * UNIT - span}):
            buf = memoryview(aligned_buffer(span))
            device.read_into(offset, buf)
            f.seek(offset)
            f.write(buf)
    return path


def _check_signatures(device: BlockDevice, path: str) -> None:
    try:
        probe = subprocess.run(
            ["blkid", "-p", "-o", "export", path],
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


def format_device(device: BlockDevice, config: EngineConfig, *,
                  force: bool = False) -> fmt.Superblock:
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
    body = recovery.checkpoint_body(RegionTable(n), Index())
    header = fmt.CheckpointHeader(
        seq=1, next_seq=2, index_capacity=Index().capacity, index_count=0,
        body_len=len(body), body_checksum=fmt.checksum(body), flags=fmt.CKP_SUPERSEDED,
    )
    recovery.write_padded(device, meta_off, fmt.pack_checkpoint_header(header) + body)
    device.flush()
    recovery.write_padded(device, 0, fmt.pack_superblock(sb))
    device.flush()
    log.info("formatted %s: uuid %s, %d regions of %d B", device.path, sb.uuid_str(), n,
             sb.region_size)
    return sb


def open_core(device: BlockDevice, config: EngineConfig, reactor: Reactor) -> EngineCore:
    """Open a formatted device on `reactor`, recovering its index (checkpoint or scan)."""
    sb = fmt.unpack_superblock(recovery.read_unit(device, 0))
    if sb is None:
        raise FormatError(f"{device.path} is not a WQS device (no valid superblock); "
                          "run `wqs format` first")
    if sb.data_offset + sb.num_regions * sb.region_size > device.size:
        raise FormatError(f"{device.path} is smaller than its superblock says "
                          f"({device.size} < {sb.device_size})")
    if config.io_engine not in ("auto", device.io_engine) and device.io_engine != "memory":
        raise DeviceError(f"{device.path} was opened with io_engine {device.io_engine}, "
                          f"the configuration asks for {config.io_engine}")
    return EngineCore(device, recovery.recover(device, sb), config, reactor)


class Engine:
    """A WQS device, open for puts and gets through plain calls. Thread-safe."""

    format = staticmethod(format_device)

    @classmethod
    def open(cls, device: BlockDevice, config: EngineConfig) -> "Engine":
        """Open a formatted device, recovering its index from the checkpoint or a scan."""
        reactor = Reactor()
        try:
            core = open_core(device, config, reactor)
        except Exception:
            reactor.close()
            raise
        return cls(core, reactor)

    def __init__(self, core: EngineCore, reactor: Reactor) -> None:
        self.core = core
        self._reactor = reactor
        self._lock = threading.Lock()
        self._closed = False

    # The core's parts, for tools and tests that look inside.
    device = property(lambda self: self.core.device)
    sb = property(lambda self: self.core.sb)
    config = property(lambda self: self.core.config)
    max_block_size = property(lambda self: self.core.max_block_size)
    index = property(lambda self: self.core.index)
    regions = property(lambda self: self.core.regions)
    dram = property(lambda self: self.core.dram)
    units_per_region = property(lambda self: self.core.sb.region_size // UNIT)

    def _drive(self, done: Callable[[], bool]) -> None:
        """Turn the private loop until done() and the core is idle (called with the lock
        held): a call returns with nothing of its own or of the engine's still running,
        such as the burial of a corrupt entry it found."""
        core = self.core
        self._reactor.run_until(lambda: done() and core.idle)

    # ---- writes -------------------------------------------------------------------

    def put(self, block_id: bytes, data: Buffer) -> None:
        """Store a block. Returns once its bytes are on the device."""
        self.put_many([(block_id, data)])

    def put_many(self, items: Sequence[tuple[bytes, Buffer]]) -> None:
        """Store many blocks; neighbours are written together. Raises BlockTooLarge
        (before anything is written) if a block is too large, DeviceError if a write
        failed (the blocks of the failed group are not stored), NoSpace if the device is
        full and every region that could be evicted is held by pinned blocks."""
        views = [(block_id, as_byte_view(data)) for block_id, data in items]
        with self._lock:
            self._check_open()
            for _, view in views:  # before anything is written
                self.core.writer.check(view.nbytes)
            errors: list[PutOp] = []
            pending = [0]

            def done(op: PutOp) -> None:
                pending[0] -= 1
                if op.error is not None:
                    errors.append(op)

            staged = 0
            for block_id, view in views:
                if staged >= FACADE_WINDOW:
                    self._drive(lambda: pending[0] == 0)
                    staged = 0
                pending[0] += 1
                self.core.put(block_id, view, done)
                staged += view.nbytes
            self._drive(lambda: pending[0] == 0)
            if errors:
                raise (NoSpace if errors[0].no_space else DeviceError)(errors[0].error)

    def delete(self, block_id: bytes) -> bool:
        """Remove a block; True if it was present. Durable: it stays deleted after a crash."""
        return self.delete_many([block_id])[0]

    def delete_many(self, block_ids: Sequence[bytes]) -> list[bool]:
        with self._lock:
            self._check_open()
            out: list[list[bool]] = []
            self.core.delete_many(list(block_ids), out.append)
            self._drive(lambda: bool(out))
            return out[0]

    # ---- reads --------------------------------------------------------------------

    def _get_many(self, block_ids: list[bytes], take: Callable[[Any], Any]) -> list[Any]:
        """take(result) for each hit (None stays None), then the hit's buffers go back."""
        out = []
        with self._lock:
            self._check_open()
            for start in range(0, max(len(block_ids), 1), READ_WINDOW_BLOCKS):
                ops: list[GetOp] = []
                self.core.get(block_ids[start : start + READ_WINDOW_BLOCKS], ops.append)
                self._drive(lambda: bool(ops))
                results = ops[0].results
                try:
                    for result in results:
                        out.append(None if result is None else take(result))
                finally:
                    for result in results:
                        if result is not None:
                            self.core.release(result)
        return out

    def get(self, block_id: bytes) -> bytes | None:
        """The block's bytes, or None on a miss (absent, evicted or failing its checksum)."""
        return self._get_many([block_id], lambda r: r.tobytes())[0]

    def get_many(self, block_ids: Sequence[bytes]) -> list[bytes | None]:
        """get() for a batch, in the order of block_ids: one index lookup each, then one
        device batch for every block not in the DRAM tier."""
        return self._get_many(list(block_ids), lambda r: r.tobytes())

    def get_into(self, block_id: bytes, out: Buffer) -> int | None:
        """Copy the block into `out` (any writable contiguous buffer: bytearray, numpy
        array, pinned host memory); its length, or None on a miss.

        An SSD hit is copied once, from the read buffer straight into `out`. Raises
        ValueError (and copies nothing) if `out` is read-only or too small.
        """
        target = as_byte_view(out)
        if target.readonly:
            raise ValueError("out buffer is read-only")

        def copy_in(result: Any) -> int:
            n = result.nbytes
            if target.nbytes < n:
                raise ValueError(f"out buffer holds {target.nbytes} B, block is {n} B")
            pos = 0
            for v in result.views:
                target[pos : pos + len(v)] = v
                pos += len(v)
            return n

        return self._get_many([block_id], copy_in)[0]

    def exists(self, block_id: bytes) -> bool:
        """Whether the index holds the block. No IO: a later get may still miss."""
        return self.exists_many([block_id])[0]

    def exists_many(self, block_ids: Iterable[bytes]) -> list[bool]:
        with self._lock:
            return self.core.exists_many(list(block_ids))

    def lookup_prefix(self, block_ids: Iterable[bytes]) -> int:
        """How many leading block IDs are present (prefix-cache hit length, in blocks)."""
        with self._lock:
            return self.core.lookup_prefix(list(block_ids))

    def pin_many(self, block_ids: Iterable[bytes], seconds: float) -> list[bool]:
        """Pin the stored blocks among block_ids for `seconds` (0 releases them); per
        block, whether it is pinned now (EngineCore.pin_many, pins.py)."""
        with self._lock:
            self._check_open()
            return self.core.pin_many(list(block_ids), seconds)[1]

    # ---- administration -----------------------------------------------------------

    def _quiesce(self) -> None:
        quiet: list[bool] = []
        self.core.quiesce(lambda: quiet.append(True))
        self._drive(lambda: bool(quiet))

    def evict_all(self) -> int:
        """Drop every block (admin call). Returns how many index entries were dropped."""
        with self._lock:
            self._check_open()
            self._quiesce()
            return self.core.evict_all()

    def stats(self) -> EngineStats:
        with self._lock:
            return self.core.stats()

    def info(self) -> dict[str, object]:
        return self.core.info()

    def close(self) -> None:
        """Clean shutdown: wait for writes, persist the index, mark the superblock clean."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._quiesce()
                self.core.close()
            finally:
                self._reactor.close()
                self.device.close()

    def abandon(self) -> None:
        """Let go of the device as a killed process would: no checkpoint, nothing more
        written (IOs in flight finish first). For crash tests; a restart scans."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.core.ring.close()
            self._reactor.close()
            self.device.close()

    def _check_open(self) -> None:
        if self._closed:
            raise DeviceError("engine is closed")

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_or_create_device(path: str, size: int, config: EngineConfig, *,
                          lock: bool = True) -> BlockDevice:
    """The embedded default: the device at `path`, creating and formatting a file of
    `size` bytes there first if nothing exists yet (an SPDK device: opened as it is)."""
    from wqs.nvme.device import DirectDevice

    if is_spdk_device(path):  # a namespace behind SPDK: formatted with `wqs format`
        from wqs.nvme.spdk import SpdkDevice

        return SpdkDevice(path, config.spdk, lock=lock)
    engine, threads = config.io_engine, config.io_threads
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        device = DirectDevice.create_file(path, size, io_engine=engine, io_threads=threads,
                                          lock=lock)
        try:
            format_device(device, config, force=True)  # a file we just created holds nothing
        except Exception:
            device.close()
            raise
        return device
    return DirectDevice(path, io_engine=engine, io_threads=threads, lock=lock)


def open_or_create(path: str, size: int, config: EngineConfig) -> Engine:
    """open_or_create_device, then the synchronous facade over it."""
    device = open_or_create_device(path, size, config)
    try:
        return Engine.open(device, config)
    except Exception:
        device.close()
        raise
