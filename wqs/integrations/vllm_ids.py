"""Block IDs of the vLLM connector, without importing vLLM.

A request's tokens are cut into vLLM blocks and chained with `wqs.prefix_block_ids`
under the namespace `chain_namespace` returns; chain position i holds, per (PP rank, TP
rank), one WQS block per attention layer (`layer_block_id`) and a commit marker
(`marker_block_id`) written after every layer's block was stored. Everything here is a
pure function of its arguments: prefill and decode hosts compute the same IDs.

`examples/pd_handoff.py` uses these to hand a request's KV from one process to another
without vLLM; `wqs.integrations.vllm.WQSConnector` uses them inside vLLM.
"""

from __future__ import annotations

import json
import struct
from typing import Sequence

from wqs.ids import prefix_block_ids
from wqs.integrations.common import derive_id

LAYER_DOMAIN = b"wqs/vllm/layer/1\x00"
MARKER_DOMAIN = b"wqs/vllm/commit/1\x00"
MARKER_MAGIC = b"WQSVLLM\x01"
MARKER = struct.Struct("<8sIIQ")  # magic, layers, reserved (0), bytes per layer block


def chain_namespace(model_id: str, block_size: int, kv_dtype: str, tp_size: int = 1,
                    pp_size: int = 1, *, lora: str | None = None,
                    cache_salt: str | None = None, mm_hashes: Sequence[str] = (),
                    namespace: str = "") -> str:
    """The `prefix_block_ids` namespace of one request: everything besides its tokens
    that decides the bytes of its KV blocks, and nothing about the host.

    A JSON list, so no value (a cache_salt, say) can pose as another field.
    """
    return json.dumps(["wqs-vllm/1", model_id, int(block_size), kv_dtype, int(tp_size),
                       int(pp_size), lora or "", cache_salt or "", list(mm_hashes),
                       namespace], separators=(",", ":"))


def chain_ids(token_ids: Sequence[int], block_size: int, namespace: str) -> list[bytes]:
    """The chain IDs of the full blocks of `token_ids` (a trailing partial block has none)."""
    return prefix_block_ids(token_ids, block_size, namespace)


def rank_tag(pp_rank: int = 0, tp_rank: int = 0) -> str:
    return f"pp{pp_rank}/tp{tp_rank}"


def layer_block_id(chain_id: bytes, rank: str, layer_name: str) -> bytes:
    """The WQS block holding one attention layer's slice of one vLLM block, one rank."""
    return derive_id(LAYER_DOMAIN, chain_id, rank, layer_name)


def marker_block_id(chain_id: bytes, rank: str) -> bytes:
    """The commit marker of one chain position for one rank (written last)."""
    return derive_id(MARKER_DOMAIN, chain_id, rank)


def marker_bytes(num_layers: int, bytes_per_layer_block: int) -> bytes:
    return MARKER.pack(MARKER_MAGIC, num_layers, 0, bytes_per_layer_block)


def parse_marker(data: bytes) -> tuple[int, int] | None:
    """(layers, bytes per layer block) of a marker; None if it is not one."""
    if len(data) != MARKER.size:
        return None
    magic, layers, _, per_block = MARKER.unpack(bytes(data))
    return (layers, per_block) if magic == MARKER_MAGIC else None
