"""Block IDs and verifiable block contents for wqs-bench.

IDs
---
fio reads and writes offsets in a file named ``jobname.jobnum.filenum`` (or
``filename=``). wqs-bench does the same with block IDs: the block at ``offset`` of a job's
data set is::

    XXH3_128( b"wqs-bench\\0" || namespace || b"\\0" || u64le(offset) || u64le(slot_size) )

with ``namespace`` = ``filename`` if given, else ``"<jobname>.<clone>.0"``, exactly
fio's default file name. So a read job named like the write job before it (or sharing
its ``--filename``) reads the blocks that job wrote, at the same block size.

Contents
--------
Layout and ``--verify`` writes give every block deterministic bytes::

    | "WQSBENCH" (8) | block id (16) | u64le length (8) | body ... |

where the body word *i* (u64le) is ``(i + seed) * 0x9E3779B97F4A7C15 ^ seed`` with
``seed = XXH3_64(block id)``, cut to the block's length. A check rebuilds the expected
bytes from the ID and the stored length, so a block that comes back with another ID's
bytes, a wrong length or any flipped bit fails, and a miss of a block that was written
fails too (the store turned a corruption into a miss, or lost the block).
"""

from __future__ import annotations

import struct

import numpy as np
import xxhash

MAGIC = b"WQSBENCH"
HEADER = struct.Struct("<8s16sQ")
GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def block_id(namespace: str, offset: int, slot_size: int) -> bytes:
    key = b"wqs-bench\0" + namespace.encode() + b"\0" + struct.pack("<QQ", offset, slot_size)
    return xxhash.xxh3_128_digest(key)


def content(bid: bytes, length: int) -> bytearray:
    """The verifiable contents of block `bid` at `length` bytes."""
    seed = np.uint64(xxhash.xxh3_64_intdigest(bid))
    words = (length + 7) // 8
    with np.errstate(over="ignore"):
        body = ((np.arange(words, dtype=np.uint64) + seed) * GOLDEN) ^ seed
    out = bytearray(body.tobytes()[:length])
    head = HEADER.pack(MAGIC, bid, length)
    n = min(len(head), length)
    out[:n] = head[:n]
    return out


def check(bid: bytes, data: bytes | memoryview | None) -> str | None:
    """None if `data` is exactly block `bid`'s verifiable contents, else what is wrong."""
    if data is None:
        return "missing (the store answered a miss for a block that was written)"
    view = memoryview(data).cast("B")
    n = view.nbytes
    if n >= HEADER.size:
        magic, got_id, length = HEADER.unpack_from(view, 0)
        if magic != MAGIC:
            return f"bad magic header {bytes(magic)!r}, wanted {MAGIC!r}"
        if got_id != bid:
            return f"header holds block {got_id.hex()}, wanted {bid.hex()}"
        if length != n:
            return f"header says {length} bytes, got {n}"
    if view != memoryview(content(bid, n)):
        expected = content(bid, n)
        at = next(i for i in range(n) if view[i] != expected[i])
        return f"content mismatch at byte {at} of {n}"
    return None
