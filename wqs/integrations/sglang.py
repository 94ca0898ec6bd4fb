"""SGLang HiCache storage backend: WQS as the L3 tier under SGLang's host KV pool.

Tested with SGLang 0.5.23 (its ``HiCacheStorage`` interface with the zero-copy ``*_v1``
calls, loaded by ``StorageBackendFactory`` as a ``dynamic`` backend). Launch flags::

    python -m sglang.launch_server --model-path ... --page-size 64 \\
        --enable-hierarchical-cache --hicache-mem-layout page_first \\
        --hicache-storage-backend dynamic \\
        --hicache-storage-backend-extra-config '{"backend_name": "wqs",
            "module_path": "wqs.integrations.sglang", "class_name": "WQSHiCacheStorage",
            "interface_v1": 1, "servers": "10.0.0.1:7070,10.0.0.2:7070"}'

Extra-config keys (besides SGLang's own: ``backend_name``, ``module_path``,
``class_name``, ``interface_v1`` -- required, it selects the zero-copy calls --, and the
``prefetch_*`` knobs SGLang takes out before the backend sees them): ``servers`` (a
``host:port`` list) or ``config`` (a client YAML: servers or etcd, auth, replicas),
else ``$WQS_SERVERS`` / ``$WQS_CONFIG``; ``namespace`` (separates deployments);
``timeout_s``, ``connect_timeout_s``, ``replicas``.

Pages and blocks. SGLang names a page by a SHA-256 chained over its tokens (page i's key
depends on page i-1's), the same in every process and host. The host pool says where a
page lies in its memory (``get_page_buffer_meta``): one piece per K and V with
``page_first`` / ``page_first_direct`` (every layer of the page together), one per layer
and K/V with ``layer_first`` (MHA; MLA has no V piece). Each piece is one WQS block,
handed to the client as a view of the pool's memory, whatever the layout: over TCP the
socket receives into the pool and sends from it; a daemon on the same host (shared
memory) moves it through the client's bounce memory, one copy, as SGLang's pool is not
memory the client shared. A block ID is XXH3-128 over the namespace, the model, the shard (TP rank and
size for MHA, none for MLA, whose KV every rank holds whole, as SGLang's own file and
Mooncake backends do; PP and attention-CP ranks when used), the page format (pool class,
layout, dtype, page size, piece sizes), the page key and the piece's index. So pools
whose bytes differ never read each other's blocks: a ``page_first`` writer and a
``layer_first`` reader miss each other, as they must (their pages hold the same values in
another order).

Calls. ``batch_exists`` asks for every piece of every page in one ``lookup_prefix`` (one
parallel round trip) and answers the count of leading pages with all pieces stored.
``batch_get_v1`` and ``batch_set_v1`` move all pieces of a batch in one ``get_many`` /
``put_many``; a page is True only when all its pieces arrived (or were acknowledged).

Failures never raise into SGLang: a store that is down (or slow past ``timeout_s``)
makes pages misses and writes False with a logged warning; a page evicted between
``batch_exists`` and ``batch_get_v1`` is False, so SGLang's prefetch stops there -- a
shorter hit. Configurations the backend cannot serve are refused when SGLang attaches it
(a ``ConfigError`` naming the key): no ``interface_v1``, heterogeneous-TP head splitting
(``tp_lcm_size``), decode context parallelism, and hybrid models whose extra host pools
(Mamba, SWA, DSA indexer, draft) SGLang stores through the ``*_v2`` calls.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, List, Optional, Sequence

import numpy as np
import torch
import xxhash
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
    PoolName,
)

from wqs.errors import ConfigError
from wqs.integrations.common import acquire_client, cluster_spec, release_client

log = logging.getLogger("wqs.integrations.sglang")

BACKEND_NAME = "wqs"
_DOMAIN = b"wqs/sglang/page/1\x00"
_WHERE = "--hicache-storage-backend-extra-config key '{key}'"


def shard_tag(config: HiCacheStorageConfig) -> str:
    """Which slice of the model's KV this process's pages hold, as in SGLang's own file
    backend: MHA pages are TP-sharded by heads (rank and size in the key); MLA pages are
    the same on every TP rank (shared, written by one rank)."""
    parts = [(config.model_name or "").replace("/", "-")]
    if not config.is_mla_model:
        parts.append(f"tp{config.tp_rank}of{config.tp_size}")
    if config.pp_size > 1:
        parts.append(f"pp{config.pp_rank}of{config.pp_size}")
    if config.attn_cp_size > 1:
        parts.append(f"cp{config.attn_cp_rank}of{config.attn_cp_size}")
    return "/".join(parts)


class HostPoolPages:
    """Byte views of a host KV pool's pages, for the SDK to receive into and send from.

    The pool gives a page's pieces as (address, size) pairs (``get_page_buffer_meta``,
    what SGLang's zero-copy backends use); each must lie inside one of the pool's CPU
    tensors, which are viewed once as bytes here, so a piece is a slice of that view:
    no copy, and an address outside the pool is an error, never a wild write.
    """

    def __init__(self, pool: Any) -> None:
        tensors = [getattr(pool, "kv_buffer", None)]
        get_buffers = getattr(pool, "get_hybrid_pool_buffer", None)
        if get_buffers is not None:
            tensors.extend(get_buffers())
        self.regions: list[tuple[int, int, np.ndarray]] = []
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.numel() == 0:
                continue
            if t.device.type != "cpu" or not t.is_contiguous():
                raise ConfigError(f"SGLang host KV pool {type(pool).__name__}: its buffer is "
                                  f"on {t.device} or not contiguous; WQS needs host memory")
            raw = t.detach().reshape(-1).view(torch.uint8).numpy()
            self.regions.append((t.data_ptr(), t.data_ptr() + raw.nbytes, raw))
        if not self.regions:
            raise ConfigError(f"SGLang host KV pool {type(pool).__name__} has no KV buffer "
                              f"(a logical anchor of a hybrid model): not supported by WQS")
        self.pool = pool
        self.page_size = int(pool.page_size)
        assert self.page_size > 0
        # One page's geometry, from the pool itself: pieces per page and their sizes.
        _, sizes = pool.get_page_buffer_meta(torch.arange(self.page_size, dtype=torch.int64))
        self.piece_sizes = tuple(int(s) for s in sizes)
        self.pieces = len(self.piece_sizes)
        assert self.pieces > 0 and all(s > 0 for s in self.piece_sizes)
        self.format = (f"{type(pool).__name__}:{pool.layout}:{pool.dtype}:{self.page_size}:"
                       f"{','.join(map(str, self.piece_sizes))}")

    def view(self, ptr: int, size: int) -> memoryview:
        for start, end, raw in self.regions:
            if start <= ptr and ptr + size <= end:
                return raw[ptr - start: ptr - start + size].data
        raise ValueError(f"piece at {ptr:#x}+{size} is outside the host KV pool")

    def views(self, host_indices: torch.Tensor, pages: int) -> list[memoryview]:
        """The pieces of `pages` pages, page by page, in the pool's piece order."""
        assert host_indices.numel() == pages * self.page_size, (
            f"{host_indices.numel()} host indices for {pages} pages of {self.page_size}")
        ptrs, sizes = self.pool.get_page_buffer_meta(host_indices)
        assert len(ptrs) == pages * self.pieces == len(sizes)
        assert tuple(int(s) for s in sizes[:self.pieces]) == self.piece_sizes
        return [self.view(int(p), int(s)) for p, s in zip(ptrs, sizes)]


class WQSHiCacheStorage(HiCacheStorage):
    """SGLang's ``HiCacheStorage`` over a `wqs.Client` (see the module docstring).

    SGLang's ``StorageBackendFactory`` builds it as ``WQSHiCacheStorage(storage_config,
    kwargs)`` and then registers the host KV pool; its calls come from SGLang's prefetch
    and backup threads, concurrently (the client is thread-safe).
    """

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Optional[dict] = None,
                 *, client: Any = None) -> None:
        extra = dict(storage_config.extra_config or {})
        if not extra.get("interface_v1"):
            raise ConfigError(
                "the WQS HiCache backend moves pages straight between SGLang's host pool and "
                "the store: set \"interface_v1\": 1 in --hicache-storage-backend-extra-config")
        if storage_config.should_split_heads:
            raise ConfigError("tp_lcm_size (heterogeneous TP head splitting) is not supported "
                              "by the WQS HiCache backend")
        if storage_config.dcp_size > 1:
            raise ConfigError("decode context parallelism (dcp_size > 1) is not supported by "
                              "the WQS HiCache backend")
        self.config = storage_config
        self.namespace = str(extra.get("namespace") or "")
        self.shard = shard_tag(storage_config)
        self._owns_client = client is None
        if client is None:
            path, servers, overrides = cluster_spec(extra.get, _WHERE)
            client = acquire_client(path, servers, overrides)
        self.client = client
        self.pages: Optional[HostPoolPages] = None
        self._prefix: Any = None  # xxh3 state over domain, namespace, shard and page format
        self._stats_lock = threading.Lock()
        self.stats = {"lookups": 0, "pages_found": 0, "pages_read": 0, "pages_missed": 0,
                      "pages_stored": 0, "pages_dropped": 0, "errors": 0}
        self._closed = False
        log.info("WQS HiCache backend: nodes %s, namespace %r, shard %s",
                 list(self.client.nodes), self.namespace, self.shard)

    # ---- registration ----------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        self.pages = HostPoolPages(mem_pool_host)
        h = xxhash.xxh3_128()
        for part in (_DOMAIN, self.namespace.encode(), self.shard.encode(),
                     self.pages.format.encode()):
            h.update(len(part).to_bytes(4, "little"))
            h.update(part)
        self._prefix = h
        log.info("WQS HiCache backend: host pool %s, %d pieces per page (%s B)",
                 self.pages.format, self.pages.pieces, "+".join(map(str, self.pages.piece_sizes)))

    def on_host_pools_registered(self) -> None:
        others = sorted(str(name) for name in getattr(self, "registered_pools", {})
                        if str(name) != PoolName.KV.value)
        if others:
            raise ConfigError(f"the WQS HiCache backend stores the KV pool only; this model "
                              f"also has host pools {others} (hybrid model): not supported")
        if self.pages is None:
            raise ConfigError("no host KV pool was registered with the WQS HiCache backend")

    # ---- IDs -------------------------------------------------------------------------

    def block_ids(self, keys: Sequence[str]) -> list[bytes]:
        """Every piece of every page, page by page: pieces * len(keys) 16-byte IDs."""
        assert self.pages is not None and self._prefix is not None, "no host pool registered"
        ids: list[bytes] = []
        for key in keys:
            page = self._prefix.copy()
            raw = key.encode()
            page.update(len(raw).to_bytes(4, "little"))
            page.update(raw)
            for j in range(self.pages.pieces):
                piece = page.copy()
                piece.update(j.to_bytes(4, "little"))
                ids.append(piece.digest())
        return ids

    # ---- the calls SGLang makes (interface_v1) ---------------------------------------

    def _count(self, **counts: int) -> None:
        with self._stats_lock:
            for name, n in counts.items():
                self.stats[name] += n

    def _failed(self, what: str, error: BaseException) -> None:
        self._count(errors=1)
        log.warning("WQS %s failed, treated as a miss: %s", what, error)

    def batch_exists(self, keys: List[str],
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> int:
        """How many leading pages have every piece stored: one lookup_prefix."""
        if not keys:
            return 0
        try:
            stored = self.client.lookup_prefix(self.block_ids(keys))
        except Exception as e:  # noqa: BLE001 - a storage failure must not reach the scheduler
            self._failed("lookup", e)
            return 0
        found = stored // self.pages.pieces
        self._count(lookups=1, pages_found=found)
        return found

    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        """Receive every piece of the pages straight into the host pool; per page whether
        all of them arrived (SGLang keeps the leading run of True)."""
        if not keys:
            return []
        n, pieces = len(keys), self.pages.pieces
        try:
            views = self.pages.views(host_indices, n)
            got = self.client.get_many(self.block_ids(keys), outs=views)
        except Exception as e:  # noqa: BLE001
            self._failed(f"get of {n} pages", e)
            return [False] * n
        ok = [all(got[i] is not None and len(got[i]) == len(views[i])
                  for i in range(p * pieces, (p + 1) * pieces)) for p in range(n)]
        hits = sum(ok)
        self._count(pages_read=hits, pages_missed=n - hits)
        if hits < n:
            errors = sorted({type(e).__name__ for e in got.errors.values()})
            # Plain misses (evicted, never stored) are routine; failures are worth a line.
            (log.warning if got.errors else log.debug)(
                "WQS get: %d of %d pages not read (%s); SGLang keeps the leading ones",
                n - hits, n, ", ".join(errors) or "not stored")
        return ok

    def batch_set_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        """Send every piece of the pages from the host pool in one put_many; per page
        whether every piece was acknowledged. Pages not stored are dropped (logged)."""
        if not keys:
            return []
        n, pieces = len(keys), self.pages.pieces
        try:
            views = self.pages.views(host_indices, n)
            acked = self.client.put_many(zip(self.block_ids(keys), views))
        except Exception as e:  # noqa: BLE001
            self._failed(f"put of {n} pages", e)
            self._count(pages_dropped=n)
            return [False] * n
        ok = [all(acked[p * pieces:(p + 1) * pieces]) for p in range(n)]
        stored = sum(ok)
        self._count(pages_stored=stored, pages_dropped=n - stored)
        if stored < n:
            errors = sorted({type(e).__name__ for e in acked.errors.values()})
            log.warning("WQS could not store %d of %d pages (%s); dropped", n - stored, n,
                        ", ".join(errors) or "node down?")
        return ok

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    # ---- the older value-passing calls -----------------------------------------------
    # SGLang calls these only for a dynamic backend without interface_v1, which __init__
    # refuses; they are abstract in HiCacheStorage, so they exist and say so.

    _V1_ONLY = ("the WQS HiCache backend serves the zero-copy calls only (batch_exists, "
                "batch_get_v1, batch_set_v1): set \"interface_v1\": 1")

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> Any:
        raise NotImplementedError(self._V1_ONLY)

    def batch_get(self, keys: List[str], target_locations: Any = None,
                  target_sizes: Any = None) -> Any:
        raise NotImplementedError(self._V1_ONLY)

    def set(self, key: str, value: Any = None, target_location: Any = None,
            target_sizes: Any = None) -> bool:
        raise NotImplementedError(self._V1_ONLY)

    def batch_set(self, keys: List[str], values: Any = None, target_locations: Any = None,
                  target_sizes: Any = None) -> bool:
        raise NotImplementedError(self._V1_ONLY)

    # ---- lifecycle -------------------------------------------------------------------

    def clear(self) -> bool:
        """SGLang's flush clears its L3 too; WQS keeps no catalogue of a deployment's
        pages to delete. A new ``namespace`` starts an empty one."""
        log.warning("WQS HiCache backend: clear is not supported (no page catalogue); "
                    "stored pages stay until evicted -- change 'namespace' to start afresh")
        return False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            release_client(self.client)
        log.info("WQS HiCache backend closed: %s", self.stats)


__all__ = ["WQSHiCacheStorage", "HostPoolPages", "shard_tag", "BACKEND_NAME"]
