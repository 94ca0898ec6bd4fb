#!/usr/bin/env python3
"""Load vs recompute of one 256-token KV chunk of a Llama-3-8B-shaped model (32 MiB),
through one local wqsd, and what the LMCache plugin adds over a bare SDK get_many.

    python examples/load_vs_recompute.py [--runs 20] [--device-read]

Needs torch and lmcache (the environment of wqs/integrations/README.md). Measures, for
the same stored chunk (median of --runs):

* ``sdk get_many``: ``client.get_many([data_id, meta_id], outs=[...])`` -- the same two
  blocks the plugin reads, received in place into memory from LMCache's allocator: the
  floor the plugin is measured against (and, for information, the data block alone);
* ``plugin batched_get``: LMCache's RemoteBackend.batched_get_blocking of the key ->
  the WQS plugin: allocate from LMCache's CPU allocator, one get_many of the data and
  meta blocks into it, check the header, free;
* ``plugin lookup``: batched_async_contains of the key (one exists_many);
* ``recompute``: a Llama-3-8B decoder layer (GQA attention + SwiGLU MLP, float32) on 256
  tokens on this machine's CPU, times 32 layers; and, for scale, the FLOP count at an
  assumed 400 TFLOP/s on a GPU.

``--device-read`` runs the daemon without its DRAM tier, so every read comes from the
device file with O_DIRECT instead of the daemon's memory.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from pd_handoff import start_local_cluster, stop  # noqa: E402

LAYERS, KV_HEADS, HEAD_DIM, HIDDEN, HEADS, FFN = 32, 8, 128, 4096, 32, 14336
TOKENS = 256
CHUNK_BYTES = 2 * LAYERS * TOKENS * KV_HEADS * HEAD_DIM * 2  # 32 MiB


def interleaved_ms(fns: dict, runs: int, warmup: int = 3) -> dict:
    """Median ms of each fn, run in turn (a, b, c, a, b, c, ...) so drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def median_ms(fn, runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def recompute_ms(runs: int) -> float:
    """One Llama-3-8B decoder layer forward on 256 tokens on the CPU, x 32 layers. In
    float32: CPUs without bf16 matrix units run bf16 matmuls hundreds of times slower,
    which would flatter the load."""
    torch.manual_seed(0)
    dt = torch.float32
    wq = torch.randn(HIDDEN, HIDDEN, dtype=dt) * 0.02
    wkv = torch.randn(HIDDEN, 2 * KV_HEADS * HEAD_DIM, dtype=dt) * 0.02
    wo = torch.randn(HIDDEN, HIDDEN, dtype=dt) * 0.02
    w13 = torch.randn(HIDDEN, 2 * FFN, dtype=dt) * 0.02
    w2 = torch.randn(FFN, HIDDEN, dtype=dt) * 0.02
    x = torch.randn(TOKENS, HIDDEN, dtype=dt)

    def layer():
        with torch.no_grad():
            h = torch.nn.functional.rms_norm(x, (HIDDEN,))
            q = (h @ wq).view(TOKENS, HEADS, HEAD_DIM).transpose(0, 1)
            k, v = (h @ wkv).view(TOKENS, 2, KV_HEADS, HEAD_DIM).unbind(1)
            k = k.transpose(0, 1).repeat_interleave(HEADS // KV_HEADS, 0)
            v = v.transpose(0, 1).repeat_interleave(HEADS // KV_HEADS, 0)
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            y = x + a.transpose(0, 1).reshape(TOKENS, HIDDEN) @ wo
            g, u = (torch.nn.functional.rms_norm(y, (HIDDEN,)) @ w13).chunk(2, -1)
            return y + (torch.nn.functional.silu(g) * u) @ w2

    return median_ms(layer, max(3, runs // 4), warmup=1) * LAYERS


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--device-read", action="store_true",
                    help="no DRAM tier in the daemon: reads come from the device file")
    args = ap.parse_args()

    from lmcache.utils import CacheEngineKey
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.memory_management import MemoryFormat
    from lmcache.v1.metadata import LMCacheMetadata
    from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
    from lmcache.v1.storage_backend.remote_backend import RemoteBackend

    import wqs
    from wqs.integrations.lmcache import key_block_ids

    workdir = Path(tempfile.mkdtemp(prefix="wqs-bench-"))
    cfg = None
    if args.device_read:
        cfg = str(workdir / "wqsd.yaml")
        Path(cfg).write_text("engine:\n  dram_cache_bytes: 0\n")
    procs, servers = start_local_cluster(1, workdir, device_size="1G", config=cfg)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    try:
        config = LMCacheEngineConfig.from_defaults(
            chunk_size=TOKENS, local_cpu=False, max_local_cpu_size=1.0, remote_serde="naive",
            pre_caching_hash_algorithm="sha256_cbor",  # keys every process agrees on
            remote_storage_plugins=["wqs"], lmcache_instance_id="bench",
            extra_config={"remote_storage_plugin.wqs.module_path": "wqs.integrations.lmcache",
                          "remote_storage_plugin.wqs.class_name": "WQSConnectorAdapter",
                          "remote_storage_plugin.wqs.servers": servers[0]})
        metadata = LMCacheMetadata(
            model_name="llama-3-8b", world_size=1, local_world_size=1, worker_id=0,
            local_worker_id=0, kv_dtype=torch.bfloat16,
            kv_shape=(LAYERS, 2, TOKENS, KV_HEADS, HEAD_DIM), chunk_size=TOKENS)
        local = LocalCPUBackend(config, metadata, dst_device="cpu")
        backend = RemoteBackend(config, metadata, loop, local, dst_device="cpu",
                                plugin_name="wqs")
        key = CacheEngineKey("llama-3-8b", 1, 0, 0x8B, torch.bfloat16)
        obj = local.allocate(metadata.get_shapes(), metadata.get_dtypes(), MemoryFormat.KV_2LTD)
        assert obj.get_size() == CHUNK_BYTES
        obj.tensor.copy_(torch.randn(obj.tensor.shape).to(torch.bfloat16))
        backend.submit_put_task(key, obj).result(30)
        obj.ref_count_down()

        client = wqs.Client(servers)
        data_id, meta_id = key_block_ids(key.to_string(), "")
        meta_buf = bytearray(4096)
        buf = np.empty(CHUNK_BYTES, np.uint8)
        assert client.get_many([data_id], outs=[buf])[0] is not None

        def plugin_get():
            got = backend.batched_get_blocking([key])[0]
            assert got is not None
            got.ref_count_down()

        def plugin_lookup():
            assert asyncio.run_coroutine_threadsafe(
                backend.batched_async_contains("b", [key]), loop).result() == 1

        # The SDK also into memory from LMCache's allocator, to tell buffer effects apart.
        lm_obj = local.allocate(metadata.get_shapes(), metadata.get_dtypes(),
                                MemoryFormat.KV_2LTD)
        lm_view = memoryview(lm_obj.byte_array).cast("B")
        t = interleaved_ms({
            "sdk": lambda: client.get_many([data_id], outs=[buf]),
            "sdk_lm": lambda: client.get_many([data_id, meta_id], outs=[lm_view, meta_buf]),
            "plugin": plugin_get,
            "lookup": plugin_lookup,
            "sdk_lookup": lambda: client.lookup_prefix([data_id]),
        }, args.runs)
        lm_obj.ref_count_down()
        sdk, sdk_lm, plug, look, sdk_lookup = (t["sdk"], t["sdk_lm"], t["plugin"], t["lookup"],
                                               t["sdk_lookup"])
        backend.close()
        client.close()
    finally:
        stop(procs)
        loop.call_soon_threadsafe(loop.stop)

    rec = recompute_ms(args.runs)
    flops = 2 * 8.03e9 * TOKENS
    where = "device file, O_DIRECT (no DRAM tier)" if args.device_read else "daemon DRAM tier"
    print(f"one 256-token chunk of Llama-3-8B KV = {CHUNK_BYTES / 2**20:.0f} MiB, one local "
          f"wqsd, reads from the {where}; medians of {args.runs}; {os.cpu_count()} CPUs")
    print(f"  load, SDK get_many of data+meta blocks: {sdk_lm:7.2f} ms  "
          f"({CHUNK_BYTES / sdk_lm / 1e6:.2f} GB/s)")
    print(f"  load, LMCache plugin batched_get      : {plug:7.2f} ms  "
          f"({plug - sdk_lm:+.2f} ms, {100 * (plug - sdk_lm) / sdk_lm:+.0f}% over that SDK call)")
    print(f"  (SDK get_many of the data block alone : {sdk:7.2f} ms)")
    print(f"  lookup, plugin batched_async_contains: {look:7.2f} ms  "
          f"(SDK lookup_prefix of 1 ID: {sdk_lookup:.2f} ms)")
    print(f"  recompute on this CPU (fp32, 32 x 1 layer): {rec:8.0f} ms  "
          f"({rec / sdk:.0f}x the load)")
    print(f"  recompute, {flops / 1e12:.1f} TFLOP at an assumed 400 TFLOP/s on a GPU: "
          f"{flops / 400e12 * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
