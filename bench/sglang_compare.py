"""SGLang HiCache's L3 tier: pages written back and prefetched through WQS and through
SGLang's own ``file`` backend, in one run, on the same machine.

    PYTHONPATH=. .venv-sglang/bin/python -m bench.sglang_compare [--pages 64]
        [--layout page_first] [--page-size 32] [--layers 8] [--heads 8] [--head-dim 128]
        [--rounds 7] [--dir /var/tmp] [--dram-cache 256M] [--transport auto] [--json]

Needs the SGLang environment (wqs/integrations/README.md). Both systems run under SGLang's
own HiCacheController on the CPU (`HiCacheNode`: SGLang's device and host KV pools, the
backend attached through ``StorageBackendFactory``): a write-back is the controller's
``_page_backup`` of `--pages` pages from host memory; a read is what a prefetch costs --
the hit query (``_storage_hit_query``: page hashes and the existence check) and the page
IO into an empty host pool (``_page_transfer``). WQS is one daemon on loopback (its
device a file under `--dir`, O_DIRECT; DRAM tier `--dram-cache`), reached as
``--transport`` says; ``file`` writes a file per page under `--dir` (SGLang's default is
/tmp/hicache) and reads it back through the page cache. Each round writes new pages (a
new request) to both, then reads them back from both, alternating which goes first; every
read is checked bit-exact against what was written. Reported per system and operation:
the median time, MiB/s and pages/s, and per page the CPU microseconds of this process
(client) and of the daemon, and context switches; then the read and write ratios
(file time / WQS time: above 1, WQS is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
from rich.console import Console
from rich.table import Table
from sglang.srt.managers.cache_controller import (HiCacheController, PrefetchOperation,
                                                  StorageOperation)
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost
from sglang.srt.mem_cache.utils import get_storage_hash_str
from sglang.srt.runtime_context import get_parallel

from wqs.procstat import ProcessUsage, self_usage, usage_delta

from .procs import Daemon
from .usage import ControlPlaneUsage, control_address


@dataclass(frozen=True)
class Geometry:
    """One model shard's KV: layers, KV heads (MHA) or the MLA latent width, page size."""

    layers: int = 8
    heads: int = 8
    head_dim: int = 128
    page_size: int = 32
    device_tokens: int = 4096  # the host pool holds twice that (SGLang's default ratio)
    dtype: torch.dtype = torch.bfloat16
    kv_lora_rank: int = 512  # MLA only
    rope_dim: int = 64  # MLA only


class HiCacheNode:
    """What an SGLang scheduler holds for one model shard, on the CPU: SGLang's device KV
    pool, its host pool in `layout`, and its HiCacheController with `backend` attached by
    SGLang's own ``attach_storage_backend`` (``StorageBackendFactory``; ``dynamic``
    backends from `extra_config`). The controller is built the way SGLang's own backend
    tests build it (``object.__new__`` and the attributes attach reads): no CUDA streams
    and no scheduler threads; pages move through its own batch loops, called here."""

    def __init__(self, backend: str, extra_config: dict, geometry: Geometry = Geometry(), *,
                 layout: str = "page_first", mla: bool = False, tp_rank: int = 0,
                 tp_size: int = 1, model: str = "tiny-llama") -> None:
        g = self.geometry = geometry
        if mla:
            self.device = MLATokenToKVPool(
                size=g.device_tokens, page_size=g.page_size, dtype=g.dtype,
                kv_lora_rank=g.kv_lora_rank, qk_rope_head_dim=g.rope_dim,
                layer_num=g.layers, device="cpu", enable_memory_saver=False, start_layer=0,
                end_layer=g.layers)
        else:
            self.device = MHATokenToKVPool(
                size=g.device_tokens, page_size=g.page_size, dtype=g.dtype, head_num=g.heads,
                head_dim=g.head_dim, layer_num=g.layers, device="cpu",
                enable_memory_saver=False, start_layer=0, end_layer=g.layers)
        info = self.device.get_device_pool_infos()[0].buffer_info
        common = dict(pin_memory=False, device="cpu", device_capacity_tokens=self.device.size,
                      start_layer=0, end_layer=g.layers)
        if mla:
            self.host = MLATokenToKVPoolHost(info, 2.0, 0, g.page_size, layout, **common,
                                             target_layer_num=g.layers)
        else:
            self.host = MHATokenToKVPoolHost(info, 2.0, 0, g.page_size, layout, **common)
        c = object.__new__(HiCacheController)
        c.enable_storage = False
        c.storage_stop_event = threading.Event()
        c.storage_host_pool = c.mem_pool_host = self.host
        c.mem_pool_device = self.device
        c.host_memory_mode = "cache"
        c.page_size = g.page_size
        c.enable_storage_metrics = False
        c.tp_group = c.attn_cp_group = c.attn_tp_group = c.pp_group = None
        c._stop_storage_threads = lambda: None  # no prefetch/backup threads: the caller
        c._start_storage_threads = lambda: None  # drives the same loops they run
        c.prefetch_sync_queue = queue.Queue()
        c.prefetch_hits_sync_groups, c.prefetch_completion_sync_groups = [], []
        # This process's place in tensor parallelism, as SGLang's scheduler publishes it.
        with get_parallel().override(tp_rank=tp_rank, tp_size=tp_size, attn_tp_rank=tp_rank,
                                     attn_tp_size=tp_size, pp_rank=0, pp_size=1,
                                     attn_dcp_size=1, attn_dcp_rank=0):
            c.attach_storage_backend(backend, model_name=model,
                                     storage_backend_extra_config=dict(extra_config))
        self.controller = c
        self.backend = c.storage_backend

    @property
    def page_size(self) -> int:
        return self.geometry.page_size

    def close(self) -> None:
        self.controller.detach_storage_backend()

    def alloc(self, pages: int) -> torch.Tensor:
        indices = self.host.alloc(pages * self.page_size)
        assert indices is not None, "host pool full"
        return indices

    def page(self, indices: torch.Tensor, p: int) -> torch.Tensor:
        """Page p of the pages at `indices`, as a view in the host pool's own layout."""
        return self.host.get_data_page(int(indices[p * self.page_size]), flat=False)

    def backup(self, indices: torch.Tensor, tokens: list[int]) -> int:
        """SGLang's write-back of the pages at `indices` to L3; pages stored."""
        op = StorageOperation(indices, tokens, hash_value=get_storage_hash_str(
            tokens, None, page_size=self.page_size))
        self.controller._page_backup(op)
        return op.completed_tokens // self.page_size

    def query(self, tokens: list[int], rid: str = "req") -> PrefetchOperation:
        """SGLang's prefetch hit query for a request's tokens."""
        op = PrefetchOperation(rid, tokens)
        op.hash_value, op.storage_hit_count = self.controller._storage_hit_query(op)
        return op

    def prefetch(self, op: PrefetchOperation) -> int:
        """SGLang's prefetch IO for what the query found, into host memory it allocates;
        the pages it counts as loaded."""
        op.host_indices = self.host.alloc(op.storage_hit_count)
        assert op.host_indices is not None, "host pool full"
        return self.controller._page_transfer(op)


# --------------------------------------------------------------------------- the run


@dataclass
class Sample:
    seconds: float
    client: ProcessUsage
    daemon: Optional[ProcessUsage]


class System:
    """One L3 backend under test: a writer node and a reader node (empty host pool)."""

    def __init__(self, name: str, backend: str, config: dict, geometry: Geometry,
                 layout: str, daemon_usage: Optional[ControlPlaneUsage]) -> None:
        self.name = name
        self.writer = HiCacheNode(backend, config, geometry, layout=layout)
        self.reader = HiCacheNode(backend, config, geometry, layout=layout)
        self.daemon_usage = daemon_usage
        self.samples: dict[str, list[Sample]] = {"write": [], "read": []}

    def _usage(self) -> tuple[ProcessUsage, Optional[ProcessUsage]]:
        return self_usage(), (self.daemon_usage.read() if self.daemon_usage else None)

    def _sample(self, op: str, started: float, before: tuple) -> None:
        seconds = time.perf_counter() - started
        client, daemon = self._usage()
        self.samples[op].append(Sample(
            seconds, usage_delta(before[0], client),
            usage_delta(before[1], daemon) if daemon is not None else None))

    def round(self, pages: int, tokens: list[int], seed: int) -> None:
        w = self.writer
        src = w.alloc(pages)
        g = torch.Generator().manual_seed(seed)
        for p in range(pages):  # the request's KV, as if written back from the GPU
            view = w.page(src, p)
            view.copy_(torch.randn(view.shape, generator=g).to(view.dtype))
        before = self._usage()
        started = time.perf_counter()
        stored = w.backup(src, tokens)
        self._sample("write", started, before)
        if stored != pages:
            raise RuntimeError(f"{self.name}: stored {stored} of {pages} pages")

        r = self.reader
        before = self._usage()
        started = time.perf_counter()
        op = r.query(tokens, f"req-{seed}")
        loaded = r.prefetch(op) if op.storage_hit_count else 0
        self._sample("read", started, before)
        if loaded != pages:
            raise RuntimeError(f"{self.name}: read {loaded} of {pages} pages back")
        if not all(torch.equal(r.page(op.host_indices, p), w.page(src, p))
                   for p in range(pages)):
            raise RuntimeError(f"{self.name}: pages read back differ from those written")
        w.host.free(src)
        r.host.free(op.host_indices)

    def close(self) -> None:
        self.writer.close()
        self.reader.close()


def summary(samples: list[Sample], pages: int, page_bytes: int) -> dict[str, Any]:
    secs = statistics.median(s.seconds for s in samples)
    out: dict[str, Any] = {
        "median_ms": secs * 1e3, "mib_s": pages * page_bytes / secs / (1 << 20),
        "pages_s": pages / secs,
        "client_cpu_us_per_page": statistics.median(s.client.cpu_s for s in samples)
        / pages * 1e6,
        "client_ctx_per_page": statistics.median(s.client.ctx for s in samples) / pages,
        "runs_ms": [round(s.seconds * 1e3, 2) for s in samples]}
    if all(s.daemon is not None for s in samples):
        out["daemon_cpu_us_per_page"] = statistics.median(
            s.daemon.cpu_s for s in samples) / pages * 1e6
        out["daemon_ctx_per_page"] = statistics.median(s.daemon.ctx for s in samples) / pages
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=64, help="pages per request (default 64)")
    ap.add_argument("--layout", default="page_first",
                    choices=["page_first", "page_first_direct", "layer_first"])
    ap.add_argument("--page-size", type=int, default=32, help="tokens per page")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8, help="KV heads (of this TP rank)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7, help="requests written and read back")
    ap.add_argument("--dir", default="/var/tmp", help="where the WQS device file and the "
                    "file backend's pages go (a temporary folder, removed after)")
    ap.add_argument("--dram-cache", default="256M", help="the WQS daemon's DRAM tier (wqsd's "
                    "default; 0: every read from the device, O_DIRECT)")
    ap.add_argument("--transport", default="auto", choices=["auto", "tcp"],
                    help="how the client reaches the daemon on this host")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    assert args.pages > 0 and args.rounds > 0

    g = Geometry(layers=args.layers, heads=args.heads, head_dim=args.head_dim,
                 page_size=args.page_size, device_tokens=args.pages * args.page_size)
    page_bytes = 2 * g.layers * g.page_size * g.heads * g.head_dim * 2  # K and V, bf16
    data = args.rounds * args.pages * page_bytes
    work = tempfile.mkdtemp(prefix="wqs-sglang-", dir=args.dir)
    console = Console(stderr=True)
    daemon: Optional[Daemon] = None
    systems: list[System] = []
    try:
        device_size = max(data * 2, 256 << 20)
        daemon = Daemon(os.path.join(work, "wqsd"), device_size=str(device_size),
                        dram_cache=args.dram_cache)
        client_yaml = os.path.join(work, "client.yaml")
        with open(client_yaml, "w") as f:
            json.dump({"servers": [daemon.address], "transport": args.transport,
                       "timeout_s": 30.0}, f)
        usage = ControlPlaneUsage(daemon.address, control_address(daemon.address), None)
        wqs_config = {"backend_name": "wqs", "module_path": "wqs.integrations.sglang",
                      "class_name": "WQSHiCacheStorage", "interface_v1": 1,
                      "config": client_yaml, "namespace": f"bench-{os.getpid()}"}
        file_config = {"file_storage_path": os.path.join(work, "hicache")}
        systems = [System("wqs", "dynamic", wqs_config, g, args.layout, usage),
                   System("file", "file", file_config, g, args.layout, None)]
        console.print(f"{args.rounds} rounds of {args.pages} pages ({page_bytes >> 10} KiB "
                      f"each, {args.layout}) written and read back; WQS at {daemon.address} "
                      f"(transport {args.transport}, DRAM tier {args.dram_cache}), file "
                      f"backend under {work}")
        base = 1000
        for r in range(args.rounds):
            tokens = list(range(base + r * 1_000_000,
                                base + r * 1_000_000 + args.pages * args.page_size))
            for s in (systems if r % 2 == 0 else systems[::-1]):
                s.round(args.pages, tokens, seed=r)
        results = {s.name: {op: summary(s.samples[op], args.pages, page_bytes)
                            for op in ("write", "read")} for s in systems}
    finally:
        for s in systems:
            s.close()
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(work, ignore_errors=True)

    ratios = {op: results["file"][op]["median_ms"] / results["wqs"][op]["median_ms"]
              for op in ("read", "write")}
    report = {"pages": args.pages, "page_bytes": page_bytes, "layout": args.layout,
              "rounds": args.rounds, "transport": args.transport,
              "dram_cache": args.dram_cache, "results": results,
              "file_over_wqs_time": ratios}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    table = Table(title=f"SGLang HiCache L3: {args.pages} pages of {page_bytes >> 10} KiB, "
                        f"median of {args.rounds}")
    for col in ("system", "op", "ms", "MiB/s", "pages/s", "client µs/page", "client ctx/page",
                "daemon µs/page", "daemon ctx/page"):
        table.add_column(col, justify="left" if col in ("system", "op") else "right")
    for name, ops in results.items():
        for op, m in ops.items():
            table.add_row(name, op, f"{m['median_ms']:.1f}", f"{m['mib_s']:.0f}",
                          f"{m['pages_s']:.0f}", f"{m['client_cpu_us_per_page']:.0f}",
                          f"{m['client_ctx_per_page']:.2f}",
                          f"{m.get('daemon_cpu_us_per_page', 0):.0f}" if name == "wqs" else "-",
                          f"{m.get('daemon_ctx_per_page', 0):.2f}" if name == "wqs" else "-")
    Console().print(table)
    print(f"reads:  file time / wqs time = {ratios['read']:.2f}")
    print(f"writes: file time / wqs time = {ratios['write']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
