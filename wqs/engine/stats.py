"""Engine counters and gauges. Plain integers, owned by the engine core's loop."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class EngineStats:
    puts: int = 0
    put_bytes: int = 0
    gets: int = 0
    get_bytes: int = 0
    hits_dram: int = 0
    hits_ssd: int = 0
    misses: int = 0
    checksum_failures: int = 0  # entry read back with a bad header or payload checksum
    stale_reads: int = 0  # entry overwritten by eviction between lookup and read
    read_errors: int = 0  # device reads that failed (served as misses)
    write_errors: int = 0  # puts that failed because a device write failed
    no_space_puts: int = 0  # puts refused NO_SPACE: every region that could go was pinned
    deletes: int = 0
    evicted_blocks: int = 0
    evicted_regions: int = 0
    reinserted_blocks: int = 0
    # Every byte written to the device (entries, padding, region headers) and the part
    # of it that copied blocks forward: write amplification is written_bytes over the
    # entry bytes of puts (written_bytes - reinserted_bytes), 1.0 without reinsertion.
    written_bytes: int = 0
    reinserted_bytes: int = 0
    # Blocks moved by the device straight into / out of a client's shared memory (also
    # counted as hits_ssd / puts): no copy by the daemon's CPU.
    direct_reads: int = 0
    direct_writes: int = 0
    recovered_blocks: int = 0  # found by the last start-up (checkpoint or scan)
    # Gauges, refreshed by Engine.stats().
    regions_total: int = 0
    regions_free: int = 0
    regions_used: int = 0
    used_bytes: int = 0
    capacity_bytes: int = 0
    index_entries: int = 0
    index_bytes: int = 0
    dram_entries: int = 0
    dram_bytes: int = 0
    pinned_blocks: int = 0
    pinned_bytes: int = 0  # device bytes of the pinned blocks
    pins_granted: int = 0  # counters kept by the pin table (pins.py)
    pins_refused: int = 0  # pins refused: the cap on pinned bytes was reached

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
