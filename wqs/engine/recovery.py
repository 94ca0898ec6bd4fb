"""Start-up and shutdown: the checkpoint, the device scan, and the one apply step they share
with live publishing.

A clean shutdown writes the index and region table as a checkpoint and marks the
superblock clean; the next start loads it. Anything else (a crash, a lost or damaged
checkpoint) rebuilds the index by scanning every region's entries in write order. The
rule that decides what one entry does to the index (`apply_entry`) is the same for a
put being published and for an entry found by the scan, as LevelDB's one Builder serves
both LogAndApply and Recover.

Everything here is synchronous IO on the calling thread: it runs before the loop starts
or after it stopped. See FORMAT.md for the layout.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np

from wqs.engine import format as fmt
from wqs.engine.index import META_HEAD, META_HIT, Index, block_tag
from wqs.engine.regions import FREE, SEALED, RegionTable
from wqs.nvme.buffers import aligned_buffer
from wqs.nvme.device import BlockDevice

log = logging.getLogger("wqs.engine")

UNIT = fmt.UNIT
Buffer = bytes | bytearray | memoryview


# ---- the apply step ----------------------------------------------------------------

def hides(regions: RegionTable, upr: int, tombstone: Buffer, loc: int) -> bool:
    """Whether a tombstone with this payload hides the version at `loc`."""
    hidden = fmt.tombstone_hides(tombstone)
    return hidden is None or (int(regions.gen[loc // upr]), loc) <= hidden


def apply_entry(index: Index, regions: RegionTable, upr: int, tag: int,
                older: int | None, flags: int, loc: int, payload_len: int,
                tombstone: Buffer = b"", stamp: int | None = None, hit: bool = False) -> bool:
    """Let the entry at `loc` replace the version the index holds now, at `older`: point
    the index at it (with `stamp`, when given: see Index.put; `hit`: already read, a
    copy forward keeping its mark), or for a tombstone (whose
    payload is `tombstone`) drop that version if it hides it. The version made obsolete
    is counted against its region. Whether the index now points at the new entry."""
    if flags & fmt.ENTRY_TOMBSTONE:
        if older is not None and hides(regions, upr, tombstone, older):
            regions.supersede(older // upr)
            index.remove(tag)
        return False
    if older is not None:
        regions.supersede(older // upr)
    index.put(tag, loc, payload_len,
              (META_HEAD if flags & fmt.ENTRY_HEAD else 0) | (META_HIT if hit else 0), stamp)
    return True


# ---- parsing entries ------------------------------------------------------------------

def parse_entry(buf: memoryview, pos: int, gen: int,
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


@dataclass
class RegionScan:
    """The valid entries of one region image, in write order: (offset, header, the
    payload if the entry is a tombstone, else b""), and how many were torn."""

    entries: list[tuple[int, fmt.EntryHeader, bytes]]
    torn: int = 0


def scan_region(buf: memoryview, gen: int) -> RegionScan:
    """Follow entry lengths from the first unit; where a header is torn or stale (a
    crash left a hole, or the region was being rewritten), resynchronise on the next
    unit that starts with a valid header of this generation. Payloads are verified, so
    only entries whose whole write completed come back; the others are counted as torn.
    """
    words = np.frombuffer(buf, dtype="<u4")
    stride = UNIT // 4
    candidates = (np.nonzero(words[stride::stride] == fmt.ENTRY_MAGIC)[0] + 1) * UNIT
    out = RegionScan([])
    next_free = UNIT
    for pos in candidates.tolist():
        if pos < next_free:
            continue
        h = fmt.unpack_entry_header(buf, pos)
        if h is None or h.gen != gen or pos + h.entry_len > len(buf):
            continue
        start = pos + fmt.ENTRY_HEADER_SIZE
        if fmt.checksum(buf[start : start + h.payload_len]) != h.payload_checksum:
            out.torn += 1
            next_free = pos + h.entry_len  # the header is sound, so its length is too
            continue
        tombstone = b""
        if h.flags & fmt.ENTRY_TOMBSTONE:
            tombstone = bytes(buf[start : start + h.payload_len])
        out.entries.append((pos, h, tombstone))
        next_free = pos + h.entry_len
    return out


# ---- recovery -------------------------------------------------------------------------

@dataclass
class Recovered:
    """What start-up rebuilt: the tables, the next sequence number, and how."""

    sb: fmt.Superblock
    regions: RegionTable
    index: Index
    next_seq: int
    how: str  # "checkpoint" or "scan"
    torn_entries: int = 0  # entries the scan found with a bad payload (not acknowledged)


def new_index(sb: fmt.Superblock) -> Index:
    return Index(max_capacity=2 * sb.num_regions * (sb.region_size // UNIT) + 1)


def recover(device: BlockDevice, sb: fmt.Superblock) -> Recovered:
    """Rebuild the index from the checkpoint if the last stop was clean, else by scanning;
    then mark the superblock unclean, so a crash from here on leads to a scan."""
    started = time.monotonic()
    regions, index = RegionTable(sb.num_regions), new_index(sb)
    upr = sb.region_size // UNIT
    loaded = load_checkpoint(device, sb, regions, index) if sb.clean else None
    if loaded is not None:
        rec = Recovered(sb, regions, index, loaded, "checkpoint")
    else:
        regions, index = RegionTable(sb.num_regions), new_index(sb)
        next_seq, torn = scan(device, sb, regions, index)
        rec = Recovered(sb, regions, index, next_seq, "scan", torn)
    regions.rebuild_tags(index, upr)
    rec.sb = dataclasses.replace(sb, flags=sb.flags & ~fmt.SB_CLEAN, checkpoint_seq=0)
    write_padded(device, 0, fmt.pack_superblock(rec.sb))
    device.flush()
    log.info("recovered %d blocks from %s in %.2fs (uuid %s, io_engine %s%s)",
             index.count, rec.how, time.monotonic() - started, sb.uuid_str(),
             device.io_engine, f", {rec.torn_entries} torn entries dropped"
             if rec.torn_entries else "")
    return rec


def load_checkpoint(device: BlockDevice, sb: fmt.Superblock, regions: RegionTable,
                    index: Index) -> int | None:
    """Fill regions and index from the checkpoint; the next seq, or None if unusable."""
    unit = memoryview(aligned_buffer(UNIT))
    device.read_into(sb.meta_offset, unit)
    header = fmt.unpack_checkpoint_header(unit)
    if header is None or header.seq != sb.checkpoint_seq:
        log.warning("checkpoint missing or stale; scanning the device")
        return None
    if header.body_len > sb.meta_size - UNIT:
        return None
    raw = memoryview(aligned_buffer(fmt.round_up(header.body_len, UNIT)))
    device.read_into(sb.meta_offset + UNIT, raw[: fmt.round_up(header.body_len, UNIT)])
    body = raw[: header.body_len]
    if fmt.checksum(body) != header.body_checksum:
        log.warning("checkpoint checksum mismatch; scanning the device")
        return None
    arrays = _split_body(body, sb.num_regions, header.index_capacity)
    if arrays is None:
        return None
    gen, write_ptr, state, tags, locs, metas = arrays
    regions.gen[:] = gen
    regions.write_ptr[:] = write_ptr
    if header.flags & fmt.CKP_SUPERSEDED:  # only whether there are any, not how many
        regions.superseded[:] = (state & fmt.STATE_SUPERSEDED) != 0
    else:  # a checkpoint from before they were kept: assume every region has some
        regions.superseded[:] = 1
    state = state & ~np.uint8(fmt.STATE_SUPERSEDED)
    regions.state[:] = np.where(state == FREE, FREE, SEALED)
    regions.last_access[:] = gen
    regions.clock = int(gen.max(initial=0))
    index.load(tags, locs, metas)
    return header.next_seq


def scan(device: BlockDevice, sb: fmt.Superblock, regions: RegionTable,
         index: Index) -> tuple[int, int]:
    """Rebuild the index from region and entry headers (after an unclean stop); the
    next seq and the number of torn entries dropped."""
    found: list[tuple[int, int, list[tuple[int, fmt.EntryHeader, bytes]]]] = []
    max_seq = torn = 0
    upr = sb.region_size // UNIT
    buf = memoryview(aligned_buffer(sb.region_size))
    for region in range(sb.num_regions):
        device.read_into(sb.region_offset(region), buf)
        rh = fmt.unpack_region_header(buf)
        if rh is None or rh.uuid != sb.uuid or rh.region != region:
            continue
        result = scan_region(buf, rh.gen)
        torn += result.torn
        max_seq = max([max_seq, rh.gen] + [h.seq for _, h, _ in result.entries])
        if result.entries:
            found.append((rh.gen, region, result.entries))
    # Replaying in write order makes the newest version of every ID win.
    found.sort()
    for gen, region, entries in found:
        regions.gen[region] = gen
        regions.last_access[region] = gen
        regions.state[region] = SEALED
        regions.write_ptr[region] = entries[-1][0] + entries[-1][1].entry_len
        for offset, h, tombstone in entries:
            tag = block_tag(h.block_id)
            loc = region * upr + offset // UNIT
            apply_entry(index, regions, upr, tag, index.loc_of(tag), h.flags, loc,
                        h.payload_len, tombstone)
    regions.clock = max_seq
    return max_seq + 1, torn


# ---- checkpoint ------------------------------------------------------------------------

def write_checkpoint(device: BlockDevice, sb: fmt.Superblock, regions: RegionTable,
                     index: Index, seq: int) -> fmt.Superblock:
    """Persist the index and the region table as checkpoint `seq` and mark the
    superblock clean; the new superblock. The caller has no writes in flight."""
    body = checkpoint_body(regions, index)
    limit = sb.meta_size - UNIT
    assert len(body) <= limit, f"checkpoint of {len(body)} B exceeds its area of {limit} B"
    header = fmt.CheckpointHeader(
        seq=seq, next_seq=seq + 1, index_capacity=index.capacity, index_count=index.count,
        body_len=len(body), body_checksum=fmt.checksum(body), flags=fmt.CKP_SUPERSEDED,
    )
    write_padded(device, sb.meta_offset, fmt.pack_checkpoint_header(header) + body)
    device.flush()
    sb = dataclasses.replace(sb, flags=sb.flags | fmt.SB_CLEAN, checkpoint_seq=seq)
    write_padded(device, 0, fmt.pack_superblock(sb))
    device.flush()
    return sb


def checkpoint_body(regions: RegionTable, index: Index) -> bytes:
    return b"".join(
        a.tobytes()
        for a in (regions.gen, regions.write_ptr, regions.saved_states(),
                  index.tags, index.locs, index.metas)
    )


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


def read_unit(device: BlockDevice, offset: int) -> memoryview:
    """One UNIT of the device (superblock, headers), outside the hot path."""
    buf = memoryview(aligned_buffer(UNIT))
    device.read_into(offset, buf)
    return buf


def write_padded(device: BlockDevice, offset: int, data: bytes) -> None:
    buf = memoryview(aligned_buffer(fmt.round_up(len(data), UNIT)))
    buf[: len(data)] = data  # the rest is already zero
    device.write(offset, buf)
