"""An LMCache engine in a process of its own, for the cross-process tests of
tests/test_integration_lmcache.py (and the CPU stand-ins those tests share).

    python -m tests.lmcache_proc      # JSON commands on stdin, one per line

Each answer is one stdout line ``@@ {json}`` (LMCache logs to the same streams):

* ``{"op": "engine", "yaml": PATH}`` -> ``{"backends": [...]}``: build an LMCacheEngine
  from LMCache's YAML and list its storage backends (a plugin that refused to start is
  missing: LMCache logs the refusal and runs on without it);
* ``{"op": "store", "yaml": PATH, "tokens": N, "seed": S}`` -> ``{"chunks": k}``: store the
  KV of N tokens (a function of S) and return once WQS holds every chunk;
* ``{"op": "load", "yaml": PATH, "tokens": N, "seed": S}`` -> ``{"lookup", "retrieved",
  "exact", "wqs_hits"}``: a new engine looks the tokens up and retrieves them.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch
from lmcache.v1.cache_engine import LMCacheEngineBuilder
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.gpu_connector.gpu_connectors import GPUConnectorInterface
from lmcache.v1.metadata import LMCacheMetadata

from wqs.integrations.lmcache import key_block_ids

LAYERS, HEADS, HEAD_DIM, CHUNK = 4, 2, 64, 16
KV_SHAPE = (LAYERS, 2, CHUNK, HEADS, HEAD_DIM)
DTYPE = torch.bfloat16
TOKEN_BASE = 1000
STORE_TIMEOUT_S = 30.0


class CPUKVConnector(GPUConnectorInterface):
    """LMCache's GPU-connector interface over a CPU tensor ``kvcaches`` of shape
    [2, layers, tokens, heads*head_dim] (the chunk format KV_2LTD): copies, nothing else."""

    def from_gpu(self, memory_obj, start, end, **kwargs):
        memory_obj.tensor.copy_(kwargs["kvcaches"][:, :, start:end, :])

    def to_gpu(self, memory_obj, start, end, **kwargs):
        kwargs["kvcaches"][:, :, start:end, :] = memory_obj.tensor

    def batched_from_gpu(self, memory_objs, starts, ends, **kwargs):
        for obj, s, e in zip(memory_objs, starts, ends):
            self.from_gpu(obj, s, e, **kwargs)

    def batched_to_gpu(self, memory_objs, starts, ends, **kwargs):
        for obj, s, e in zip(memory_objs, starts, ends):
            self.to_gpu(obj, s, e, **kwargs)

    def get_shape(self, num_tokens):
        return torch.Size([2, LAYERS, num_tokens, HEADS * HEAD_DIM])


def lmcache_metadata() -> LMCacheMetadata:
    return LMCacheMetadata(model_name="tiny-llama", world_size=1, local_world_size=1,
                           worker_id=0, local_worker_id=0, kv_dtype=DTYPE, kv_shape=KV_SHAPE,
                           chunk_size=CHUNK)


def tokens_and_kv(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """N prompt tokens and their "KV" (a function of the seed), as LMCache's store takes them."""
    tokens = torch.arange(TOKEN_BASE + seed * 100_000, TOKEN_BASE + seed * 100_000 + n)
    kv = torch.randn(2, LAYERS, n, HEADS * HEAD_DIM,
                     generator=torch.Generator().manual_seed(seed)).to(DTYPE)
    return tokens, kv


class Engines:
    def __init__(self) -> None:
        self.made: list[str] = []

    def make(self, yaml_path: str) -> Any:
        config = LMCacheEngineConfig.from_file(yaml_path)
        iid = f"wqs-proc-{len(self.made)}"
        config.lmcache_instance_id = iid
        engine = LMCacheEngineBuilder.get_or_create(iid, config, lmcache_metadata(),
                                                    CPUKVConnector(), None, None)
        engine.post_init()
        self.made.append(iid)
        return engine

    def close(self) -> None:
        for iid in self.made:
            LMCacheEngineBuilder.destroy(iid)


def _wqs_connector(engine: Any) -> Any:
    return engine.storage_manager.storage_backends["RemoteBackend-wqs"].connection \
        .getWrappedConnector()


def store(engine: Any, n: int, seed: int) -> dict:
    tokens, kv = tokens_and_kv(n, seed)
    engine.store(tokens, kvcaches=kv)
    conn = _wqs_connector(engine)  # LMCache puts asynchronously: wait until WQS has all
    ids = [b for _, _, k in engine.token_database.process_tokens(tokens)
           for b in key_block_ids(k.to_string(), conn.namespace)]
    deadline = time.monotonic() + STORE_TIMEOUT_S
    while not all(conn.client.exists_many(ids)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"WQS does not hold the {len(ids)} blocks after "
                               f"{STORE_TIMEOUT_S} s: {conn.stats}")
        time.sleep(0.05)
    return {"chunks": len(ids) // 2}


def load(engine: Any, n: int, seed: int) -> dict:
    tokens, kv = tokens_and_kv(n, seed)
    found = engine.lookup(tokens)
    out = torch.zeros_like(kv)
    retrieved = int(engine.retrieve(tokens, kvcaches=out).sum())
    exact = bool(torch.equal(out[:, :, :retrieved], kv[:, :, :retrieved]))
    return {"lookup": int(found), "retrieved": retrieved, "exact": exact,
            "wqs_hits": _wqs_connector(engine).stats["get_hits"]}


def main() -> int:
    engines = Engines()
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            engine = engines.make(cmd["yaml"])
            if cmd["op"] == "engine":
                answer = {"backends": list(engine.storage_manager.storage_backends)}
            elif cmd["op"] == "store":
                answer = store(engine, cmd["tokens"], cmd["seed"])
            else:
                answer = load(engine, cmd["tokens"], cmd["seed"])
            print("@@ " + json.dumps(answer), flush=True)
    finally:
        engines.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
