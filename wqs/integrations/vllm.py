"""vLLM v1 KV connector: vLLM's paged KV blocks in a WQS cluster.

Supported vLLM: the v1 connector API with the three-argument constructor
(``vllm_config, role, kv_cache_config``) and the standardized per-layer ``[B, H, N, C]``
KV views -- tested with vLLM 0.33.0. Start vLLM with::

    vllm serve <model> --kv-transfer-config '{
        "kv_connector": "WQSConnector",
        "kv_connector_module_path": "wqs.integrations.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"wqs_servers": "10.0.0.1:7070,10.0.0.2:7070"}}'

``kv_connector_extra_config`` keys (all optional but the cluster):

* ``wqs_servers`` (list or ``"h:p,h:p"``) or ``wqs_config`` (client YAML path); else
  ``$WQS_SERVERS`` / ``$WQS_CONFIG``. ``wqs_timeout_s`` overrides the client timeout.
* ``wqs_model_id``: the model's identity in block IDs (default: the model name vLLM was
  given). Prefill and decode hosts must agree on it; set it when they load the same
  weights from different paths.
* ``wqs_namespace``: a further salt (separates deployments sharing a cluster).
* ``wqs_save``: ``"sync"`` (default: ``wait_for_save`` returns once the step's blocks
  are stored, so a decode instance that looks right after the prefill returned finds
  them) or ``"async"`` (it returns at once; puts continue in the background, bounded by
  ``wqs_max_inflight_mib``, default 1024).
* ``wqs_io_threads``: threads doing WQS IO (default 8).

``kv_role``: ``kv_producer`` saves only (a prefill instance), ``kv_consumer`` loads only
(a decode instance), ``kv_both`` does both. ``kv_load_failure_policy: recompute`` makes
vLLM recompute blocks whose load failed (a node died between lookup and load); vLLM's
default, ``fail``, fails such requests.

Block IDs. A request's tokens are cut into vLLM blocks (``cache_config.block_size``
tokens) and chained with `wqs.prefix_block_ids`, salted with the namespace built by
`wqs.integrations.vllm_ids.chain_namespace` (model id, block size, KV dtype, TP/PP sizes,
LoRA, ``cache_salt``, multimodal inputs). So the IDs depend on tokens and those
settings only, never on the host, process or hash seed: a prefill instance writes the
blocks a decode instance on another host reads (PD disaggregation through WQS). One
chain position holds, per (PP rank, TP rank), one WQS block per attention layer -- that
layer's slice of the vLLM block, ``kv_layer[block_id]`` in its logical [H, N, C] order
-- and one small commit marker written after all the layers' blocks were acknowledged.
The scheduler counts leading chain positions whose markers exist (one `lookup_prefix`
round trip with TP = PP = 1).

What runs where. Scheduler side: `get_num_new_matched_tokens` (the lookup),
`update_state_after_alloc` (the load plan), `build_connector_meta` (loads and saves of
this step). Worker side: `start_load_kv` issues one ``get_many`` per layer, in layer
order, on IO threads, receiving straight into the paged buffer when a block is contiguous
CPU memory (else -- a layout such as LBNHC, or a GPU -- into staging memory, pinned on a
GPU, copied on `wait_for_layer_load`; the GPU path has not run: no GPU); attention layer i
waits only for layer i. `save_kv_layer` copies the layer's newly completed blocks out
(a gather, no host sync) and hands them to an IO thread; `wait_for_save` waits for the
step's puts (``sync``) and writes the commit markers. Nothing raises into vLLM: a node
that is down makes lookups shorter, loads fail into `get_block_ids_with_load_errors`
(recomputed), and saves are dropped with a warning.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from wqs.ids import prefix_block_ids
from wqs.integrations.common import acquire_client, cluster_spec, release_client
from wqs.integrations.vllm_ids import (chain_namespace, layer_block_id, marker_block_id,
                                       marker_bytes, rank_tag)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("wqs.integrations.vllm")

SUPPORTED_VLLM = "0.33.x (v1 KV connector API, 3-argument constructor)"


# --------------------------------------------------------------------------- helpers


def _byte_view(t: torch.Tensor) -> Any:
    """A writable uint8 numpy view of a contiguous CPU tensor (any dtype, bf16 too)."""
    return t.reshape(-1).view(torch.uint8).numpy()


# --------------------------------------------------------------------------- stats


@dataclass
class WQSConnectorStats(KVConnectorStats):
    """Counts of one interval, as vLLM collects them from every worker
    (`get_kv_connector_stats`) and the scheduler, adds them up and logs them: blocks
    (chain positions) loaded, failed to load, saved, failed to save; layer blocks that
    went through staging; lookups and the positions they found."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> "WQSConnectorStats":
        for key, value in other.data.items():
            self.data[key] = self.data.get(key, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


# --------------------------------------------------------------------------- metadata


@dataclass
class BlockSpec:
    """A request's chain positions to move this step: (chain ID, vLLM block ID) pairs."""

    req_id: str
    chain_ids: list[bytes]
    block_ids: list[int]


@dataclass
class WQSConnectorMetadata(KVConnectorMetadata):
    loads: list[BlockSpec] = field(default_factory=list)
    saves: list[BlockSpec] = field(default_factory=list)


@dataclass
class _Tracker:
    """Scheduler-side state of one running request, for its saves."""

    tokens: list[int]  # the prompt
    namespace: str
    block_ids: list[int]
    saved: int  # chain positions stored or skipped so far
    chain: list[bytes] | None = None

    def chain_ids(self, block_size: int) -> list[bytes]:
        if self.chain is None:
            self.chain = prefix_block_ids(self.tokens, block_size, self.namespace)
        return self.chain


# --------------------------------------------------------------------------- connector


class WQSConnector(KVConnectorBase_V1):
    """A `KVConnectorBase_V1` that loads and saves vLLM's KV blocks through WQS."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig | None" = None, *, client: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        ktc = self._kv_transfer_config
        extra = dict(ktc.kv_connector_extra_config or {})

        def get(key: str) -> Any:
            return extra.get(f"wqs_{key}")

        self._block_size = int(vllm_config.cache_config.block_size)
        mc = vllm_config.model_config
        self._model_id = str(get("model_id") or getattr(mc, "model", "") or "")
        cache_dtype = str(vllm_config.cache_config.cache_dtype)
        if cache_dtype == "auto":
            cache_dtype = str(getattr(mc, "dtype", "auto")).replace("torch.", "")
        self._kv_dtype = cache_dtype
        pc = vllm_config.parallel_config
        self._tp_size = int(getattr(pc, "tensor_parallel_size", 1) or 1)
        self._pp_size = int(getattr(pc, "pipeline_parallel_size", 1) or 1)
        self._namespace = str(get("namespace") or "")
        self._save_sync = str(get("save") or "sync").lower() != "async"
        self._max_inflight = int(float(get("max_inflight_mib") or 1024) * (1 << 20))
        self._load_enabled = bool(ktc.is_kv_consumer)
        self._save_enabled = bool(ktc.is_kv_producer)
        if ktc.kv_load_failure_policy != "recompute" and self._load_enabled:
            log.warning("kv_load_failure_policy is %r: a block whose load fails (a WQS node "
                        "died after the lookup) fails its request; 'recompute' recomputes it",
                        ktc.kv_load_failure_policy)

        self._owns_client = client is None
        if client is None:
            path, servers, overrides = cluster_spec(
                get, "kv_connector_extra_config['wqs_{key}']")
            client = acquire_client(path, servers, overrides)
        self.client = client
        # staged_layer_blocks: layer blocks received through a staging buffer (a GPU
        # cache, or a layout whose blocks are not contiguous) rather than in place.
        self.stats = {"lookups": 0, "lookup_hit_blocks": 0, "loaded_blocks": 0,
                      "load_errors": 0, "staged_layer_blocks": 0, "saved_blocks": 0,
                      "save_failed": 0}
        self._stats_reported = dict(self.stats)  # at the last get_kv_connector_stats
        self._stats_lock = threading.Lock()

        # scheduler side
        self._namespaces: dict[str, str] = {}  # from the Request: NewRequestData has no salt
        self._lookups: dict[str, tuple[int, list[bytes]]] = {}
        self._pending_loads: dict[str, BlockSpec] = {}
        self._trackers: dict[str, _Tracker] = {}
        self._skip_saves: dict[str, int] = {}

        # worker side
        self._pool: ThreadPoolExecutor | None = None
        if role == KVConnectorRole.WORKER:
            self._pool = ThreadPoolExecutor(int(get("io_threads") or 8),
                                            thread_name_prefix="wqs-vllm")
        self._kv_caches: dict[str, torch.Tensor] = {}
        self._rank = rank_tag(0, 0)
        self._load_futures: dict[str, Future] = {}
        self._loaded_layers = 0
        self._load_errors: set[int] = set()
        self._step_chain: list[bytes] | None = None  # this step's saves
        self._step_blocks: list[int] = []
        self._step_futures: list[Future] = []
        self._inflight: list[tuple[int, Future]] = []  # async mode: (bytes, commit)
        self._inflight_bytes = 0
        self._io_lock = threading.Lock()
        log.info("WQSConnector (%s): nodes %s, block %d tokens, model id %r, save %s",
                 role.name, list(self.client.nodes), self._block_size, self._model_id,
                 "sync" if self._save_sync else "async")

    # ---- shared helpers --------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[name] += n

    def _request_namespace(self, request: Any) -> str:
        lora = getattr(request, "lora_request", None)
        lora_name = getattr(lora, "lora_name", None) if lora is not None else None
        mm = tuple(str(getattr(f, "identifier", "")) for f in (getattr(request, "mm_features",
                                                                        None) or ()))
        return chain_namespace(self._model_id, self._block_size, self._kv_dtype, self._tp_size,
                               self._pp_size, lora=lora_name,
                               cache_salt=getattr(request, "cache_salt", None), mm_hashes=mm,
                               namespace=self._namespace)

    def get_kv_connector_stats(self) -> WQSConnectorStats | None:
        """What this side counted since the last call (None: nothing)."""
        with self._stats_lock:
            delta = {k: v - self._stats_reported[k] for k, v in self.stats.items()}
            self._stats_reported = dict(self.stats)
        stats = WQSConnectorStats(data={k: v for k, v in delta.items() if v})
        return None if stats.is_empty() else stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> WQSConnectorStats:
        return WQSConnectorStats(data=dict(data or {}))

    def _all_ranks(self) -> list[str]:
        return [rank_tag(p, t) for p in range(self._pp_size) for t in range(self._tp_size)]

    # ==================================================================================
    # scheduler side
    # ==================================================================================

    def on_new_request(self, request: "Request") -> None:
        self._namespaces[request.request_id] = self._request_namespace(request)

    def _namespace_of(self, request: "Request") -> str:
        ns = self._namespaces.get(request.request_id)
        if ns is None:
            ns = self._namespaces[request.request_id] = self._request_namespace(request)
        return ns

    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens beyond `num_computed_tokens` whose KV WQS holds: one lookup of the
        request's commit markers (leading chain positions only). Loads are synchronous
        in the forward pass, layer by layer, so the second value is False."""
        if not self._load_enabled:
            return 0, False
        b = self._block_size
        tokens = list(request.all_token_ids)
        n_full = len(tokens) // b
        start = num_computed_tokens // b
        if start >= n_full:
            return 0, False
        try:
            chain = prefix_block_ids(tokens[: n_full * b], b, self._namespace_of(request))
            ranks = self._all_ranks()
            if len(ranks) == 1:
                hits = self.client.lookup_prefix(
                    [marker_block_id(c, ranks[0]) for c in chain[start:]])
            else:
                probe = [marker_block_id(c, r) for c in chain[start:] for r in ranks]
                found = self.client.exists_many(probe)
                hits = 0
                while hits < n_full - start and all(
                        found[hits * len(ranks):(hits + 1) * len(ranks)]):
                    hits += 1
        except Exception as e:  # noqa: BLE001 - a lookup failure is a miss
            log.warning("WQS lookup failed, treated as a miss: %s", e)
            return 0, False
        self._count("lookups")
        self._count("lookup_hit_blocks", hits)
        # vLLM must compute at least one token of the request itself.
        ext = min((start + hits) * b, request.num_tokens - 1) - num_computed_tokens
        if ext <= 0:
            self._lookups.pop(request.request_id, None)
            return 0, False
        self._lookups[request.request_id] = (num_computed_tokens, chain)
        return ext, False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        self._namespace_of(request)  # saves need it; build_connector_meta sees no Request
        if num_external_tokens <= 0:
            return
        found = self._lookups.pop(request.request_id, None)
        if found is None:
            return
        computed, chain = found
        b = self._block_size
        first = computed // b
        last = -(-(computed + num_external_tokens) // b)
        block_ids = list(blocks.get_block_ids()[0])
        last = min(last, len(chain), len(block_ids))
        if last <= first:
            return
        self._pending_loads[request.request_id] = BlockSpec(
            request.request_id, chain[first:last], block_ids[first:last])
        self._skip_saves[request.request_id] = last  # loaded blocks need no save

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = WQSConnectorMetadata()
        meta.loads = list(self._pending_loads.values())
        self._pending_loads.clear()
        if not self._save_enabled:
            self._skip_saves.clear()
            return meta
        b = self._block_size
        sched = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            tokens = list(new.prompt_token_ids or [])
            skip = max(new.num_computed_tokens // b, self._skip_saves.pop(new.req_id, 0))
            namespace = self._namespaces.get(new.req_id)
            if namespace is None:  # never saw its Request, so not its cache_salt: skip it
                log.warning("WQS: no namespace for request %s; its KV is not saved", new.req_id)
                continue
            tracker = _Tracker(tokens, namespace, list(new.block_ids[0]), saved=skip)
            self._trackers[new.req_id] = tracker
            self._plan_saves(meta, new.req_id, tracker, new.num_computed_tokens + sched.get(
                new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracker = self._trackers.get(req_id)
            skip = self._skip_saves.pop(req_id, 0)
            if tracker is None:
                continue
            tracker.saved = max(tracker.saved, skip)
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:
                if req_id in cached.resumed_req_ids:
                    tracker.block_ids = list(new_ids[0])  # resumed: the full list
                else:
                    tracker.block_ids.extend(new_ids[0])
            self._plan_saves(meta, req_id, tracker,
                             cached.num_computed_tokens[i] + sched.get(req_id, 0))
        for req_id in scheduler_output.finished_req_ids:
            self._trackers.pop(req_id, None)
            self._namespaces.pop(req_id, None)
        self._skip_saves.clear()
        return meta

    def _plan_saves(self, meta: WQSConnectorMetadata, req_id: str, tracker: _Tracker,
                    computed_after_step: int) -> None:
        """Save the prompt's chain positions this step completes (full blocks only)."""
        b = self._block_size
        done = min(computed_after_step, len(tracker.tokens)) // b
        done = min(done, len(tracker.block_ids))
        if done <= tracker.saved:
            return
        chain = tracker.chain_ids(b)
        meta.saves.append(BlockSpec(req_id, chain[tracker.saved:done],
                                    tracker.block_ids[tracker.saved:done]))
        tracker.saved = done

    def request_finished(self, request: "Request",
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        for table in (self._trackers, self._lookups, self._pending_loads, self._namespaces):
            table.pop(request.request_id, None)
        return False, None  # saves copy their blocks out: vLLM may free them now

    # ==================================================================================
    # worker side
    # ==================================================================================

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        num_blocks = getattr(self._kv_cache_config, "num_blocks", None)
        for name, kv in kv_caches.items():
            if kv.dim() != 4 or (num_blocks is not None and kv.shape[0] != num_blocks):
                raise ValueError(
                    f"WQSConnector needs vLLM's standardized per-layer KV view "
                    f"[num_blocks, H, N, C] (vLLM {SUPPORTED_VLLM}); layer {name} is "
                    f"{tuple(kv.shape)} with {num_blocks} blocks")
        self._kv_caches = dict(kv_caches)
        tp = pp = 0
        try:
            from vllm.distributed.parallel_state import (get_pp_group,
                                                         get_tensor_model_parallel_rank,
                                                         model_parallel_is_initialized)
            if model_parallel_is_initialized():
                tp = get_tensor_model_parallel_rank()
                pp = get_pp_group().rank_in_group
        except Exception:  # noqa: BLE001 - no distributed state (one process)
            pass
        self._rank = rank_tag(pp, tp)
        sizes = {name: kv[0].nbytes for name, kv in kv_caches.items()}
        log.info("WQSConnector worker %s: %d layers, %s bytes per layer block", self._rank,
                 len(kv_caches), sorted(set(sizes.values())))

    # ---- loads -----------------------------------------------------------------------

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        """Issue this step's loads: one get_many per layer, in layer order, on IO threads."""
        self._drain_loads()  # a previous step's layer nobody waited for (never expected)
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, WQSConnectorMetadata) or not meta.loads or not self._kv_caches:
            return
        chain = [c for spec in meta.loads for c in spec.chain_ids]
        blocks = [bid for spec in meta.loads for bid in spec.block_ids]
        assert self._pool is not None
        for name, kv in self._kv_caches.items():
            self._load_futures[name] = self._pool.submit(self._load_layer, name, kv, chain,
                                                         blocks)

    def _load_layer(self, name: str, kv: torch.Tensor, chain: list[bytes],
                    blocks: list[int]) -> tuple[torch.Tensor | None, list[int], list[int]]:
        """Fetch one layer's blocks: (staging tensor or None when received in place,
        the vLLM block IDs, those that failed). A block is stored in the logical order
        of ``kv[block_id]`` (``[H, N, C]``), whatever the physical layout."""
        ids = [layer_block_id(c, self._rank, name) for c in chain]
        want = kv[0].nbytes
        staging = None
        if kv.device.type == "cpu" and kv[0].is_contiguous():
            outs = [_byte_view(kv[bid]) for bid in blocks]  # straight into the paged buffer
        else:
            staging = torch.empty((len(blocks), want), dtype=torch.uint8,
                                  pin_memory=kv.device.type == "cuda")
            outs = [staging[i].numpy() for i in range(len(blocks))]
        try:
            got = self.client.get_many(ids, outs=outs)
        except Exception as e:  # noqa: BLE001 - e.g. a block of another layout
            log.warning("WQS load of layer %s failed: %s", name, e)
            got = [None] * len(ids)
        failed = [bid for bid, g in zip(blocks, got)
                  if g is None or memoryview(g).nbytes != want]
        return staging, blocks, failed

    def wait_for_layer_load(self, layer_name: str) -> None:
        fut = self._load_futures.pop(layer_name, None)
        if fut is not None:
            self._apply_load(layer_name, fut)

    def _apply_load(self, layer_name: str, fut: Future) -> None:
        staging, blocks, failed = fut.result()
        if staging is not None:
            self._count("staged_layer_blocks", len(blocks))
            kv = self._kv_caches[layer_name]
            idx = torch.tensor(blocks, dtype=torch.long, device=kv.device)
            src = staging.to(kv.device, non_blocking=True).view(kv.dtype).view(
                (len(blocks),) + tuple(kv.shape[1:]))
            kv.index_copy_(0, idx, src)
        self._load_errors.update(failed)
        with self._stats_lock:
            self._loaded_layers += 1
            if self._loaded_layers == len(self._kv_caches):  # the step's last layer
                self._loaded_layers = 0
                self.stats["loaded_blocks"] += len(blocks) - len(self._load_errors)

    def _drain_loads(self) -> None:
        for name in list(self._load_futures):
            self._apply_load(name, self._load_futures.pop(name))

    def get_block_ids_with_load_errors(self) -> set[int]:
        if self._load_errors:
            self._count("load_errors", len(self._load_errors))
            log.warning("WQS: %d blocks failed to load; vLLM recomputes them",
                        len(self._load_errors))
        errors, self._load_errors = self._load_errors, set()
        return errors

    # ---- saves -----------------------------------------------------------------------

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: "AttentionMetadata", **kwargs: Any) -> None:
        """Copy this layer's newly completed blocks out and put them on an IO thread."""
        if not self._save_enabled or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, WQSConnectorMetadata) or not meta.saves:
            return
        if self._step_chain is None:
            self._step_chain = [c for s in meta.saves for c in s.chain_ids]
            self._step_blocks = [bid for s in meta.saves for bid in s.block_ids]
        idx = torch.tensor(self._step_blocks, dtype=torch.long, device=kv_layer.device)
        gathered = kv_layer.index_select(0, idx)  # a copy in logical order, no host sync
        event = None
        if gathered.device.type == "cuda":
            host = torch.empty(gathered.shape, dtype=gathered.dtype, pin_memory=True)
            host.copy_(gathered, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            gathered = host
        assert self._pool is not None
        self._step_futures.append(self._pool.submit(self._save_layer, layer_name, gathered,
                                                    self._step_chain, event))

    def _save_layer(self, name: str, data: torch.Tensor, chain: list[bytes],
                    event: Any) -> list[bool]:
        if event is not None:
            event.synchronize()
        flat = data.reshape(len(chain), -1).view(torch.uint8)
        items = [(layer_block_id(c, self._rank, name), flat[i].numpy())
                 for i, c in enumerate(chain)]
        try:
            return self.client.put_many(items)
        except Exception as e:  # noqa: BLE001 - a save failure is a future miss
            log.warning("WQS save of layer %s failed: %s", name, e)
            return [False] * len(items)

    def wait_for_save(self) -> None:
        """Close the step's saves: commit markers go out once every layer's blocks of a
        chain position are stored. ``sync``: wait for that; ``async``: leave it to an IO
        thread (waiting here only while more than wqs_max_inflight_mib is in flight)."""
        self._drain_loads()
        if self._step_chain is None:
            return
        chain, futures = self._step_chain, self._step_futures
        self._step_chain, self._step_blocks, self._step_futures = None, [], []
        assert self._pool is not None
        commit = self._pool.submit(self._commit, chain, futures)
        if self._save_sync:
            commit.result()
            return
        nbytes = sum(kv[0].nbytes for kv in self._kv_caches.values()) * len(chain)
        with self._io_lock:
            self._inflight.append((nbytes, commit))
            self._inflight_bytes += nbytes
        while True:
            with self._io_lock:
                if not self._inflight:
                    return
                head_bytes, head = self._inflight[0]
                if not head.done() and self._inflight_bytes <= self._max_inflight:
                    return
                self._inflight.pop(0)
            head.result()  # _commit never raises
            with self._io_lock:
                self._inflight_bytes -= head_bytes

    def _commit(self, chain: list[bytes], futures: list[Future]) -> None:
        try:
            ok = [True] * len(chain)
            for fut in futures:
                for i, stored in enumerate(fut.result()):
                    ok[i] = ok[i] and stored
            per_block = max((kv[0].nbytes for kv in self._kv_caches.values()), default=0)
            marker = marker_bytes(len(futures), per_block)
            items = [(marker_block_id(c, self._rank), marker)
                     for c, good in zip(chain, ok) if good]
            n_ok = sum(self.client.put_many(items)) if items else 0
        except Exception as e:  # noqa: BLE001 - a save failure is a future miss
            log.warning("WQS commit failed: %s", e)
            n_ok = 0
        self._count("saved_blocks", n_ok)
        if n_ok < len(chain):
            self._count("save_failed", len(chain) - n_ok)
            log.warning("WQS stored %d of %d blocks of this step (node down?)", n_ok, len(chain))

    # ---- lifecycle -------------------------------------------------------------------

    def shutdown(self) -> None:
        self._drain_loads()
        for _, fut in list(self._inflight):
            fut.result()
        self._inflight.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._owns_client:
            release_client(self.client)
        log.info("WQSConnector %s closed: %s", self.role.name, self.stats)


__all__ = ["WQSConnector", "WQSConnectorMetadata", "WQSConnectorStats", "BlockSpec",
           "SUPPORTED_VLLM"]
