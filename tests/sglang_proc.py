"""SGLang's HiCache on the CPU, with WQS as its L3 storage, for
tests/test_integration_sglang.py -- in the test process or in a process of its own:

    python -m tests.sglang_proc      # JSON commands on stdin, one per line

A `HiCacheNode` (bench.sglang_compare's, which the benchmark uses too) is what an SGLang
scheduler holds for one model shard: SGLang's own device KV pool (``MHATokenToKVPool`` /
``MLATokenToKVPool`` on the CPU), its host pool (``MHATokenToKVPoolHost`` /
``MLATokenToKVPoolHost``, in the layout asked) and its ``HiCacheController`` with the
storage backend attached by SGLang's own ``attach_storage_backend`` --
``StorageBackendFactory``, the ``dynamic`` backend from the extra config the docs give,
the zero-copy calls selected by ``interface_v1``. The controller is built the way
SGLang's own backend tests build it (``object.__new__`` and the attributes attach reads;
no CUDA streams, no scheduler threads), and pages move through its own batch loops:
``_page_backup`` (writes, STORAGE_BATCH_SIZE pages per call), ``_storage_hit_query``
(page hashes and the existence query) and ``_page_transfer`` (reads into host memory
SGLang allocated).

Each answer of the command loop is one stdout line ``@@ {json}``:

* ``{"op": "store", "servers": [...], "layout": L, "pages": N, "seed": S}`` ->
  ``{"stored_pages": k}``;
* ``{"op": "load", ...same...}`` -> ``{"found_pages", "loaded_pages", "exact"}`` from a
  node whose host pool is empty.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Optional

import torch
from sglang.srt.managers.cache_controller import PrefetchOperation

from bench.sglang_compare import Geometry
from bench.sglang_compare import HiCacheNode as _HiCacheNode

GEOMETRY = Geometry(layers=4, heads=2, head_dim=64, page_size=16, device_tokens=1024,
                    kv_lora_rank=64, rope_dim=16)
PAGE = GEOMETRY.page_size
TOKEN_BASE = 1000


def extra_config(servers: list[str], namespace: str = "t", **more) -> dict:
    """What wqs/integrations/README.md tells a user to pass as
    --hicache-storage-backend-extra-config (as a dict)."""
    return {"backend_name": "wqs", "module_path": "wqs.integrations.sglang",
            "class_name": "WQSHiCacheStorage", "interface_v1": 1,
            "servers": ",".join(servers), "namespace": namespace, "timeout_s": 1.0, **more}


def tokens_of(pages: int, seed: int) -> list[int]:
    start = TOKEN_BASE + seed * 100_000
    return list(range(start, start + pages * PAGE))


def page_values(host, page: int, seed: int) -> torch.Tensor:
    """The KV a writer puts in page `page` of request `seed` (in the host pool's own page
    shape, so any layout can be filled and checked): a function of the two."""
    shape = host.get_data_page(0, flat=False).shape
    g = torch.Generator().manual_seed(seed * 10_000 + page)
    return torch.randn(shape, generator=g).to(host.dtype)


class HiCacheNode(_HiCacheNode):
    """bench.sglang_compare's node (SGLang's pools and controller) with WQS attached as
    the docs say, small, and the requests the tests write and read."""

    def __init__(self, config: dict, **kw) -> None:
        super().__init__("dynamic", config, GEOMETRY, **kw)

    def store(self, pages: int, seed: int) -> int:
        """Request `seed`'s KV in host memory (as if written back from the GPU), then
        SGLang's write-back of it to L3; the pages stored."""
        indices = self.alloc(pages)
        for p in range(pages):
            self.page(indices, p).copy_(page_values(self.host, p, seed))
        stored = self.backup(indices, tokens_of(pages, seed))
        self.host.free(indices)
        return stored

    def ask(self, pages: int, seed: int) -> PrefetchOperation:
        """SGLang's prefetch hit query for request `seed` (one batch_exists)."""
        return self.query(tokens_of(pages, seed), f"req-{seed}")

    def exact(self, op: PrefetchOperation, pages: int, seed: int) -> bool:
        """Whether the first `pages` pages prefetched hold the writer's bytes exactly."""
        return all(torch.equal(self.page(op.host_indices, p), page_values(self.host, p, seed))
                   for p in range(pages))

    def load(self, pages: int, seed: int) -> dict:
        op = self.ask(pages, seed)
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
