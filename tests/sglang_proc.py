"""SGLang's HiCache on the CPU, with WQS as its L3 storage, for
tests/test_integration_sglang.py -- in the test process or in a process of its own:

    python -m tests.sglang_proc      # JSON commands on stdin, one per line

A `HiCacheNode` is what an SGLang scheduler holds for one model shard: SGLang's own
device KV pool (``MHATokenToKVPool`` / ``MLATokenToKVPool`` on the CPU), its host pool
(``MHATokenToKVPoolHost`` / ``MLATokenToKVPoolHost``, in the layout asked) and its
``HiCacheController`` with the storage backend attached by SGLang's own
``attach_storage_backend`` -- ``StorageBackendFactory``, the ``dynamic`` backend from the
extra config the docs give, the zero-copy calls selected by ``interface_v1``. The
controller is built the way SGLang's own backend tests build it (``object.__new__`` and
the attributes attach reads; no CUDA streams, no scheduler threads), and pages move
through its own batch loops: ``_page_backup`` (writes, STORAGE_BATCH_SIZE pages per
call), ``_storage_hit_query`` (page hashes and the existence query) and
``_page_transfer`` (reads into host memory SGLang allocated).

Each answer of the command loop is one stdout line ``@@ {json}``:

* ``{"op": "store", "servers": [...], "layout": L, "pages": N, "seed": S}`` ->
  ``{"stored_pages": k}``;
* ``{"op": "load", ...same...}`` -> ``{"found_pages", "loaded_pages", "exact"}`` from a
  node whose host pool is empty.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
from typing import Any, Optional

import torch
from sglang.srt.managers.cache_controller import (HiCacheController, PrefetchOperation,
                                                  StorageOperation)
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost
from sglang.srt.mem_cache.utils import get_storage_hash_str
from sglang.srt.runtime_context import get_parallel

LAYERS, HEADS, HEAD_DIM, PAGE = 4, 2, 64, 16
KV_LORA_RANK, ROPE_DIM = 64, 16  # MLA: one latent vector per token and layer
DTYPE = torch.bfloat16
DEVICE_TOKENS = 1024  # the host pool gets twice that (SGLang's default hicache ratio)
TOKEN_BASE = 1000
MODEL = "tiny-llama"


def extra_config(servers: list[str], namespace: str = "t", **more: Any) -> dict:
    """What wqs/integrations/README.md tells a user to pass as
    --hicache-storage-backend-extra-config (as a dict)."""
    return {"backend_name": "wqs", "module_path": "wqs.integrations.sglang",
            "class_name": "WQSHiCacheStorage", "interface_v1": 1,
            "servers": ",".join(servers), "namespace": namespace, "timeout_s": 1.0, **more}


def tokens_of(pages: int, seed: int) -> list[int]:
    start = TOKEN_BASE + seed * 100_000
    return list(range(start, start + pages * PAGE))


def page_values(host: Any, page: int, seed: int) -> torch.Tensor:
    """The KV a writer puts in page `page` of request `seed` (in the host pool's own page
    shape, so any layout can be filled and checked): a function of the two."""
    shape = host.get_data_page(0, flat=False).shape
    g = torch.Generator().manual_seed(seed * 10_000 + page)
    return torch.randn(shape, generator=g).to(host.dtype)


class HiCacheNode:
    """One SGLang model shard's HiCache (device pool, host pool, controller) with WQS."""

    def __init__(self, config: dict, *, layout: str = "page_first", mla: bool = False,
                 tp_rank: int = 0, tp_size: int = 1, model: str = MODEL) -> None:
        if mla:
            self.device = MLATokenToKVPool(
                size=DEVICE_TOKENS, page_size=PAGE, dtype=DTYPE, kv_lora_rank=KV_LORA_RANK,
                qk_rope_head_dim=ROPE_DIM, layer_num=LAYERS, device="cpu",
                enable_memory_saver=False, start_layer=0, end_layer=LAYERS)
        else:
            self.device = MHATokenToKVPool(
                size=DEVICE_TOKENS, page_size=PAGE, dtype=DTYPE, head_num=HEADS,
                head_dim=HEAD_DIM, layer_num=LAYERS, device="cpu", enable_memory_saver=False,
                start_layer=0, end_layer=LAYERS)
        info = self.device.get_device_pool_infos()[0].buffer_info
        common = dict(pin_memory=False, device="cpu", device_capacity_tokens=self.device.size,
                      start_layer=0, end_layer=LAYERS)
        if mla:
            self.host = MLATokenToKVPoolHost(info, 2.0, 0, PAGE, layout, **common,
                                             target_layer_num=LAYERS)
        else:
            self.host = MHATokenToKVPoolHost(info, 2.0, 0, PAGE, layout, **common)
        c = object.__new__(HiCacheController)
        c.enable_storage = False
        c.storage_stop_event = threading.Event()
        c.storage_host_pool = c.mem_pool_host = self.host
        c.mem_pool_device = self.device
        c.host_memory_mode = "cache"
        c.page_size = PAGE
        c.enable_storage_metrics = False
        c.tp_group = c.attn_cp_group = c.attn_tp_group = c.pp_group = None
        c._stop_storage_threads = lambda: None  # no prefetch/backup threads: calls come
        c._start_storage_threads = lambda: None  # from this one, through the same code
        c.prefetch_sync_queue = queue.Queue()
        c.prefetch_hits_sync_groups, c.prefetch_completion_sync_groups = [], []
        # This process's place in tensor parallelism, as SGLang's scheduler publishes it.
        with get_parallel().override(tp_rank=tp_rank, tp_size=tp_size, attn_tp_rank=tp_rank,
                                     attn_tp_size=tp_size, pp_rank=0, pp_size=1,
                                     attn_dcp_size=1, attn_dcp_rank=0):
            c.attach_storage_backend("dynamic", model_name=model,
                                     storage_backend_extra_config=dict(config))
        self.controller = c
        self.backend = c.storage_backend

    def close(self) -> None:
        self.controller.detach_storage_backend()

    # ---- what SGLang's HiRadixCache does with it -----------------------------------

    def fill(self, pages: int, seed: int) -> torch.Tensor:
        """Host memory for `pages` pages, holding request `seed`'s KV (as if written back
        from the GPU); the host indices."""
        indices = self.host.alloc(pages * PAGE)
        assert indices is not None, "host pool full"
        for p in range(pages):
            self.host.get_data_page(int(indices[p * PAGE]), flat=False).copy_(
                page_values(self.host, p, seed))
        return indices

    def store(self, pages: int, seed: int) -> int:
        """Write-back of a request's pages to L3 (SGLang's backup path); pages stored."""
        tokens = tokens_of(pages, seed)
        indices = self.fill(pages, seed)
        op = StorageOperation(indices, tokens,
                              hash_value=get_storage_hash_str(tokens, None, page_size=PAGE))
        self.controller._page_backup(op)
        self.host.free(indices)
        return op.completed_tokens // PAGE

    def query(self, pages: int, seed: int) -> PrefetchOperation:
        """SGLang's prefetch hit query for a request's tokens (one batch_exists)."""
        op = PrefetchOperation(f"req-{seed}", tokens_of(pages, seed))
        op.hash_value, op.storage_hit_count = self.controller._storage_hit_query(op)
        return op

    def prefetch(self, op: PrefetchOperation) -> int:
        """SGLang's prefetch IO for the pages its query found: host memory allocated by
        SGLang, filled by the backend; the pages SGLang counts as loaded."""
        op.host_indices = self.host.alloc(op.storage_hit_count)
        assert op.host_indices is not None, "host pool full"
        return self.controller._page_transfer(op)

    def exact(self, op: PrefetchOperation, pages: int, seed: int) -> bool:
        """Whether the first `pages` pages prefetched hold the writer's bytes exactly."""
        return all(torch.equal(self.host.get_data_page(int(op.host_indices[p * PAGE]),
                                                       flat=False),
                               page_values(self.host, p, seed))
                   for p in range(pages))

    def load(self, pages: int, seed: int) -> dict:
        op = self.query(pages, seed)
        found = op.storage_hit_count // PAGE
        loaded = self.prefetch(op) if found else 0
        return {"found_pages": found, "loaded_pages": loaded,
                "exact": self.exact(op, loaded, seed)}


def main() -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
    nodes: dict[tuple, HiCacheNode] = {}
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            key = (tuple(cmd["servers"]), cmd["layout"], cmd["op"])
            node: Optional[HiCacheNode] = nodes.get(key)
            if node is None:  # a reader's node starts with an empty host pool
                node = nodes[key] = HiCacheNode(extra_config(cmd["servers"]),
                                                layout=cmd["layout"])
            if cmd["op"] == "store":
                answer = {"stored_pages": node.store(cmd["pages"], cmd["seed"])}
            else:
                answer = node.load(cmd["pages"], cmd["seed"])
            print("@@ " + json.dumps(answer), flush=True)
    finally:
        for node in nodes.values():
            node.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
