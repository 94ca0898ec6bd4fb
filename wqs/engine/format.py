"""The on-device format: superblock, checkpoint header, region header, entry header.

Pure functions from structs to bytes and back; no IO happens here. The layout is
documented in wqs/engine/FORMAT.md, and a change to any struct below must bump
FORMAT_VERSION and update that document.
"""

from __future__ import annotations

import struct
import uuid as uuidlib
from dataclasses import dataclass

import xxhash

from wqs.nvme.device import round_up  # noqa: F401 - also part of this module's vocabulary

FORMAT_VERSION = 1

# The engine's allocation unit: every entry starts on, and is padded to, this boundary.
# At least 4 KiB even on 512 B devices, so the checkpoint area stays under 1 % of the
# device (it reserves 32 B of index per unit).
UNIT = 4096
SUPERBLOCK_SIZE = 4096

SUPERBLOCK_MAGIC = b"WQS-DEV\0"
SHARDS_MAGIC = b"WQS-SHD\0"
CHECKPOINT_MAGIC = b"WQS-CKP\0"
REGION_MAGIC = 0x52535157  # b"WQSR" little-endian
ENTRY_MAGIC = 0x45535157  # b"WQSE" little-endian

# Superblock flags.
SB_CLEAN = 1  # the checkpoint area holds a valid index; no scan needed

# Entry flags.
ENTRY_TOMBSTONE = 1  # removes older versions of the ID during recovery (see TOMBSTONE_HIDES)
ENTRY_HEAD = 2  # first piece of a block split into segments (payload is segment 0)
ENTRY_SEGMENT = 4  # a later segment; its ID is derived from the head's ID and seq

_SUPERBLOCK = struct.Struct("<8sII16sQIIIIQQQQQQ")  # + xxh64 of these bytes
_CHECKPOINT = struct.Struct("<8sIIQQQQQ")  # + xxh64
_REGION = struct.Struct("<IHHI16sQ")  # + xxh64
_ENTRY = struct.Struct("<IBBH16sQQIIQ")  # + xxh64 -> 64 bytes
_CHECKSUM = struct.Struct("<Q")

ENTRY_HEADER_SIZE = _ENTRY.size + _CHECKSUM.size
assert ENTRY_HEADER_SIZE == 64


def checksum(data: bytes | memoryview) -> int:
    """The checksum used everywhere on the device: xxh3-64, seed 0."""
    return xxhash.xxh3_64_intdigest(data)


@dataclass(frozen=True)
class Superblock:
    uuid: bytes  # 16 bytes, identifies this device among all WQS devices
    device_size: int
    region_size: int
    num_regions: int
    max_block_size: int
    meta_offset: int  # start of the checkpoint area
    meta_size: int
    data_offset: int  # start of region 0
    flags: int = 0
    checkpoint_seq: int = 0  # the seq the checkpoint was taken at; 0 = none
    created_unix: int = 0
    version: int = FORMAT_VERSION

    @property
    def clean(self) -> bool:
        return bool(self.flags & SB_CLEAN)

    def region_offset(self, region: int) -> int:
        assert 0 <= region < self.num_regions
        return self.data_offset + region * self.region_size

    def uuid_str(self) -> str:
        return str(uuidlib.UUID(bytes=self.uuid))


def pack_superblock(sb: Superblock) -> bytes:
    body = _SUPERBLOCK.pack(
        SUPERBLOCK_MAGIC, sb.version, sb.flags, sb.uuid, sb.device_size, UNIT,
        sb.region_size, sb.num_regions, sb.max_block_size, sb.meta_offset, sb.meta_size,
        sb.data_offset, sb.checkpoint_seq, sb.created_unix, 0,
    )
    raw = body + _CHECKSUM.pack(checksum(body))
    return raw + b"\0" * (SUPERBLOCK_SIZE - len(raw))


def has_superblock_magic(raw: bytes | memoryview) -> bool:
    return bytes(raw[: len(SUPERBLOCK_MAGIC)]) == SUPERBLOCK_MAGIC


def unpack_superblock(raw: bytes | memoryview) -> Superblock | None:
    """The superblock in `raw`, or None if it is absent or damaged."""
    n = _SUPERBLOCK.size
    if len(raw) < n + 8 or not has_superblock_magic(raw):
        return None
    (stored,) = _CHECKSUM.unpack_from(raw, n)
    if stored != checksum(raw[:n]):
        return None
    (_, version, flags, uid, dev_size, unit, region_size, num_regions, max_block, meta_off,
     meta_size, data_off, ckpt_seq, created, _) = _SUPERBLOCK.unpack_from(raw)
    if version != FORMAT_VERSION or unit != UNIT:
        return None
    return Superblock(
        uuid=uid, device_size=dev_size, region_size=region_size, num_regions=num_regions,
        max_block_size=max_block, meta_offset=meta_off, meta_size=meta_size,
        data_offset=data_off, flags=flags, checkpoint_seq=ckpt_seq, created_unix=created,
        version=version,
    )


# Bytes of checkpoint reserved per unit of data: an index slot is 16 B and the table
# never runs fuller than half, so 32 B per unit always holds the whole table.
CHECKPOINT_BYTES_PER_UNIT = 32
REGION_RECORD_SIZE = 16  # gen u64, write_ptr u32, state u8, pad

# Checkpoint header flags. CKP_SUPERSEDED: a region's state byte carries
# STATE_SUPERSEDED where some of its entries were superseded by later writes (without
# the flag, an older checkpoint, that is unknown).
CKP_SUPERSEDED = 1
STATE_SUPERSEDED = 0x80


def compute_geometry(device_size: int, region_size: int) -> tuple[int, int, int, int]:
    """(meta_offset, meta_size, data_offset, num_regions) for a device, or num_regions 0."""
    assert region_size % UNIT == 0 and region_size > 0
    meta_offset = SUPERBLOCK_SIZE
    num_regions = max(0, (device_size - meta_offset) // region_size)
    while num_regions > 0:
        data_units = num_regions * region_size // UNIT
        meta_size = round_up(
            2 * UNIT + num_regions * REGION_RECORD_SIZE + data_units * CHECKPOINT_BYTES_PER_UNIT,
            UNIT,
        )
        data_offset = meta_offset + meta_size
        if data_offset + num_regions * region_size <= device_size:
            return meta_offset, meta_size, data_offset, num_regions
        num_regions -= 1
    return meta_offset, 0, meta_offset, 0


@dataclass(frozen=True)
class CheckpointHeader:
    seq: int  # must equal Superblock.checkpoint_seq
    next_seq: int  # the engine's sequence counter when the checkpoint was taken
    index_capacity: int  # slots in the dumped index table
    index_count: int
    body_len: int
    body_checksum: int
    flags: int = 0  # CKP_*


def pack_checkpoint_header(h: CheckpointHeader) -> bytes:
    body = _CHECKPOINT.pack(
        CHECKPOINT_MAGIC, FORMAT_VERSION, h.flags, h.seq, h.next_seq, h.index_capacity,
        h.index_count, h.body_len,
    ) + _CHECKSUM.pack(h.body_checksum)
    raw = body + _CHECKSUM.pack(checksum(body))
    return raw + b"\0" * (UNIT - len(raw))


def unpack_checkpoint_header(raw: bytes | memoryview) -> CheckpointHeader | None:
    n = _CHECKPOINT.size + 8
    if len(raw) < n + 8 or bytes(raw[:8]) != CHECKPOINT_MAGIC:
        return None
    if _CHECKSUM.unpack_from(raw, n)[0] != checksum(raw[:n]):
        return None
    _, version, flags, seq, next_seq, cap, count, body_len = _CHECKPOINT.unpack_from(raw)
    if version != FORMAT_VERSION:
        return None
    (body_sum,) = _CHECKSUM.unpack_from(raw, _CHECKPOINT.size)
    return CheckpointHeader(seq, next_seq, cap, count, body_len, body_sum, flags)


@dataclass(frozen=True)
class RegionHeader:
    region: int
    gen: int  # the engine seq when the region was opened; entries carry it too
    uuid: bytes  # the device's UUID, so a reformatted device ignores old regions


def pack_region_header(h: RegionHeader) -> bytes:
    body = _REGION.pack(REGION_MAGIC, FORMAT_VERSION, 0, h.region, h.uuid, h.gen)
    raw = body + _CHECKSUM.pack(checksum(body))
    return raw + b"\0" * (UNIT - len(raw))


def unpack_region_header(raw: bytes | memoryview) -> RegionHeader | None:
    n = _REGION.size
    if len(raw) < n + 8:
        return None
    magic, version, _, region, uid, gen = _REGION.unpack_from(raw)
    if magic != REGION_MAGIC or version != FORMAT_VERSION:
        return None
    if _CHECKSUM.unpack_from(raw, n)[0] != checksum(raw[:n]):
        return None
    return RegionHeader(region=region, gen=gen, uuid=uid)


@dataclass(frozen=True)
class EntryHeader:
    block_id: bytes  # 16 bytes
    gen: int  # generation of the region the entry was written into
    seq: int  # global write order; newest wins
    payload_len: int  # bytes of payload stored in this entry
    payload_checksum: int
    flags: int = 0
    total_len: int = 0  # ENTRY_HEAD only: length of the whole block across segments

    @property
    def entry_len(self) -> int:
        return entry_len(self.payload_len)


def entry_len(payload_len: int) -> int:
    """Bytes an entry with this payload occupies on the device, header and padding included."""
    return round_up(ENTRY_HEADER_SIZE + payload_len, UNIT)


def pack_entry_header(block_id: bytes, gen: int, seq: int, payload_len: int,
                      payload_checksum: int, flags: int = 0, total_len: int = 0) -> bytes:
    """An entry header's bytes, from EntryHeader's fields (the write path has them loose;
    building the dataclass first cost more than the packing)."""
    body = _ENTRY.pack(ENTRY_MAGIC, FORMAT_VERSION, flags, 0, block_id, gen, seq, payload_len,
                       total_len, payload_checksum)
    return body + _CHECKSUM.pack(checksum(body))


def entry_matches(raw: bytes | memoryview, block_id: bytes, gen: int, payload_len: int) -> bool:
    """Whether raw holds a whole, intact entry of block_id written in region generation
    gen with payload_len bytes: the header's magic, version, fields and checksum, and the
    payload's checksum. (What every read verifies; unpack_entry_header's checks, without
    building the header object.)"""
    if len(raw) < ENTRY_HEADER_SIZE + payload_len:
        return False
    magic, version, _, _, bid, egen, _, plen, _, psum = _ENTRY.unpack_from(raw)
    return (magic == ENTRY_MAGIC and version == FORMAT_VERSION and bid == block_id
            and egen == gen and plen == payload_len
            and _CHECKSUM.unpack_from(raw, _ENTRY.size)[0] == checksum(raw[:_ENTRY.size])
            and checksum(raw[ENTRY_HEADER_SIZE : ENTRY_HEADER_SIZE + plen]) == psum)


def unpack_entry_header(raw: bytes | memoryview, offset: int = 0) -> EntryHeader | None:
    """The entry header at raw[offset:], or None if it is not one (bad magic or checksum)."""
    if len(raw) - offset < ENTRY_HEADER_SIZE:
        return None
    magic, version, flags, _, block_id, gen, seq, plen, total, psum = _ENTRY.unpack_from(
        raw, offset
    )
    if magic != ENTRY_MAGIC or version != FORMAT_VERSION:
        return None
    body = raw[offset : offset + _ENTRY.size]
    if _CHECKSUM.unpack_from(raw, offset + _ENTRY.size)[0] != checksum(body):
        return None
    return EntryHeader(block_id, gen, seq, plen, psum, flags, total)


# A tombstone's payload: empty for a delete, which hides every older version of its ID;
# or the position (region gen, loc in units) of the newest version it hides, for one
# written after a read found that version corrupt, so that versions written between
# the two survive it.
TOMBSTONE_HIDES = struct.Struct("<QQ")


def tombstone_hides(payload: bytes | memoryview) -> tuple[int, int] | None:
    """The position a tombstone's payload names, or None: it hides every older version
    (also for a payload of any other length, which this version never writes: hiding
    too much costs misses, never wrong bytes)."""
    if len(payload) != TOMBSTONE_HIDES.size:
        return None
    gen, loc = TOMBSTONE_HIDES.unpack(payload)
    return gen, loc


def segment_id(head_id: bytes, head_seq: int, index: int) -> bytes:
    """The ID a segment of a large block is stored under.

    It includes the head's seq so that a rewrite of the block never mixes segments of
    two versions: the old segments simply become unreachable.
    """
    return xxhash.xxh3_128_digest(head_id + struct.pack("<QI", head_seq, index))


# ---- the shard table: one device cut into independent engine partitions --------------

# A daemon with N shards keeps one engine per shard, each on its own byte range of the
# device. The table sits in the device's first unit; every partition is a whole engine
# layout of its own (superblock at its start). A device whose first unit is an engine
# superblock instead is one partition spanning the device (as formatted before shards).
_SHARDS = struct.Struct("<8sIHH16sQ")  # magic version count reserved uuid created_unix
_SHARD_ENTRY = struct.Struct("<QQ")  # offset size
SHARD_ALIGN = 1 << 20  # partitions start on 1 MiB boundaries (the table's unit before)
MAX_SHARDS = (UNIT - _SHARDS.size - _CHECKSUM.size) // _SHARD_ENTRY.size  # 253


@dataclass(frozen=True)
class ShardTable:
    uuid: bytes  # of the node's device (each partition's superblock has its own too)
    partitions: tuple[tuple[int, int], ...]  # (offset, size) per shard
    created_unix: int = 0

    def uuid_str(self) -> str:
        return str(uuidlib.UUID(bytes=self.uuid))


def pack_shard_table(t: ShardTable) -> bytes:
    assert 1 <= len(t.partitions) <= MAX_SHARDS
    body = _SHARDS.pack(SHARDS_MAGIC, FORMAT_VERSION, len(t.partitions), 0, t.uuid,
                        t.created_unix)
    body += b"".join(_SHARD_ENTRY.pack(o, n) for o, n in t.partitions)
    raw = body + _CHECKSUM.pack(checksum(body))
    return raw + b"\0" * (UNIT - len(raw))


def unpack_shard_table(raw: bytes | memoryview) -> ShardTable | None:
    """The shard table in `raw`, or None if it is absent or damaged."""
    if len(raw) < _SHARDS.size or bytes(raw[:8]) != SHARDS_MAGIC:
        return None
    _, version, count, _, uid, created = _SHARDS.unpack_from(raw)
    if version != FORMAT_VERSION or not 1 <= count <= MAX_SHARDS:
        return None
    end = _SHARDS.size + count * _SHARD_ENTRY.size
    if _CHECKSUM.unpack_from(raw, end)[0] != checksum(raw[:end]):
        return None
    parts = tuple(_SHARD_ENTRY.unpack_from(raw, _SHARDS.size + i * _SHARD_ENTRY.size)
                  for i in range(count))
    return ShardTable(uid, parts, created)


def split_device(device_size: int, shards: int) -> tuple[tuple[int, int], ...]:
    """Equal partitions after the table's first SHARD_ALIGN bytes, each aligned."""
    assert shards >= 1
    each = (device_size - SHARD_ALIGN) // shards // SHARD_ALIGN * SHARD_ALIGN
    return tuple((SHARD_ALIGN + k * each, each) for k in range(shards))
