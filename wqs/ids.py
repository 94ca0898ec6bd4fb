"""Block IDs: 128-bit keys, and the chained prefix IDs engines use for KV-cache blocks.

A block ID is a 128-bit unsigned integer. Its canonical form, used on the wire, on the
device and in every API, is 16 bytes, big-endian (most significant byte first).

Prefix chains
-------------
An engine cuts a prompt into blocks of ``block_tokens`` tokens. Block ``i``'s ID is::

    id[i] = XXH3_128( parent[i] || namespace || tokens[i*B : (i+1)*B] )

    parent[0] = the ``parent`` argument, or 16 zero bytes when it is None
    parent[i] = id[i-1]                       (i >= 1)

with these byte layouts (``||`` is concatenation, nothing between the parts):

* ``parent[i]``: 16 bytes, the previous ID in canonical big-endian form.
* ``namespace``: raw bytes as given (a ``str`` is encoded UTF-8); no length, no padding.
  Use it to separate models, tokenizers, dtypes or tensor-parallel layouts.
* tokens: each token as a two's-complement **little-endian** integer of ``token_bytes``
  bytes (4 = int32, the default; 8 = int64), tokens in prompt order.
* XXH3_128: xxHash3 128-bit, seed 0. Its 128-bit result is the ID; the canonical bytes
  are its big-endian encoding (what ``xxhash.xxh3_128_digest`` returns, and what
  ``XXH128_canonicalFromHash`` writes in C).

So two prompts that share their first ``k`` full blocks share the first ``k`` IDs, and a
change in block ``j`` changes every ID from ``j`` on. Known answer (token_bytes=4, empty
namespace, no parent): tokens ``range(16)`` with ``block_tokens=8`` give
``2ee69744743d87e98383d8fc652dba7f`` then ``beea9db531a10d45042c01cf4fd5d039`` (hex);
``tests/test_ids.py`` freezes these.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np
import xxhash

BLOCK_ID_BYTES = 16
ZERO_ID = bytes(BLOCK_ID_BYTES)
_MAX_ID = 1 << 128

BlockIdLike = Union[int, bytes, bytearray, memoryview]


def to_block_id(x: BlockIdLike) -> bytes:
    """Return the canonical 16-byte big-endian form of a block ID.

    Accepts an int in ``[0, 2**128)`` or 16 bytes (bytes, bytearray, memoryview).
    """
    if isinstance(x, bytes):
        if len(x) != BLOCK_ID_BYTES:
            raise ValueError(f"block ID must be {BLOCK_ID_BYTES} bytes, got {len(x)}")
        return x
    if isinstance(x, (bytearray, memoryview)):
        b = bytes(x)  # a memoryview of a non-byte format still yields its raw bytes
        if len(b) != BLOCK_ID_BYTES:
            raise ValueError(f"block ID must be {BLOCK_ID_BYTES} bytes, got {len(b)}")
        return b
    if isinstance(x, bool):  # bool is an int subclass; True as an ID is surely a bug
        raise TypeError("block ID must be an int or 16 bytes, got bool")
    if isinstance(x, (int, np.integer)):
        v = int(x)
        if not 0 <= v < _MAX_ID:
            raise ValueError(f"block ID int must be in [0, 2**128), got {v}")
        return v.to_bytes(BLOCK_ID_BYTES, "big")
    raise TypeError(f"block ID must be an int or 16 bytes, got {type(x).__name__}")


def block_id_to_int(block_id: BlockIdLike) -> int:
    """The integer value of a block ID (accepts anything `to_block_id` accepts)."""
    return int.from_bytes(to_block_id(block_id), "big")


def block_id_hex(block_id: BlockIdLike) -> str:
    """32 lowercase hex digits, for logs and CLIs."""
    return to_block_id(block_id).hex()


def _token_bytes(token_ids: Sequence[int] | np.ndarray, width: int) -> bytes:
    """Tokens as contiguous little-endian signed integers of ``width`` bytes."""
    dtype = np.dtype("<i4" if width == 4 else "<i8")
    # No dtype= here: it would silently truncate floats. Python ints beyond int64 come
    # back as an object array.
    if not isinstance(token_ids, (np.ndarray, Sequence)):
        token_ids = list(token_ids)
    arr = np.asarray(token_ids)
    if arr.ndim != 1:
        raise ValueError(f"token_ids must be one-dimensional, got shape {arr.shape}")
    if arr.size and arr.dtype.kind == "O" and all(isinstance(t, int) for t in arr):
        raise ValueError(f"token id out of range for {width}-byte tokens")
    if arr.size and arr.dtype.kind not in "iu":
        raise TypeError(f"token_ids must be integers, got {arr.dtype} values")
    if arr.size and arr.dtype != dtype:
        info = np.iinfo(dtype)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < info.min or hi > info.max:
            raise ValueError(
                f"token id out of range for {width}-byte tokens: min {lo}, max {hi}"
            )
    return np.ascontiguousarray(arr, dtype=dtype).tobytes()


def prefix_block_ids(
    token_ids: Sequence[int] | np.ndarray,
    block_tokens: int,
    namespace: bytes | str = b"",
    parent: bytes | None = None,
    include_partial: bool = False,
    token_bytes: int = 4,
) -> list[bytes]:
    """Chained IDs of the consecutive blocks of ``block_tokens`` tokens (layout: module doc).

    Only full blocks get an ID unless ``include_partial``, in which case a trailing
    shorter block gets one too (hashed the same way over its fewer tokens). ``parent``
    continues a chain: pass the last ID of the preceding blocks.
    """
    if isinstance(block_tokens, bool) or not isinstance(block_tokens, (int, np.integer)):
        raise TypeError(f"block_tokens must be an int, got {type(block_tokens).__name__}")
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
    if token_bytes not in (4, 8):
        raise ValueError(f"token_bytes must be 4 or 8, got {token_bytes}")
    ns = namespace.encode("utf-8") if isinstance(namespace, str) else bytes(namespace)
    prev = ZERO_ID if parent is None else to_block_id(parent)

    buf = _token_bytes(token_ids, token_bytes)
    step = block_tokens * token_bytes
    end = len(buf) if include_partial else len(buf) - len(buf) % step
    digest = xxhash.xxh3_128_digest
    ids: list[bytes] = []
    for off in range(0, end, step):
        prev = digest(b"".join((prev, ns, buf[off : off + step])))
        ids.append(prev)
    return ids
