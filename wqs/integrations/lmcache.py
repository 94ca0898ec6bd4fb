"""LMCache remote storage plugin: LMCache's KV chunks in a WQS cluster.

Tested with LMCache 0.5.6 (the 0.5.x plugin interface: ``remote_storage_plugins`` plus
``extra_config["remote_storage_plugin.<name>.module_path" / ".class_name"]``, the backend
dialing ``plugin://<name>``). Add to the LMCache YAML (``LMCACHE_CONFIG_FILE``)::

    chunk_size: 256
    local_cpu: true
    max_local_cpu_size: 5            # GB of host DRAM in front of WQS
    pre_caching_hash_algorithm: sha256_cbor   # chunk keys every process agrees on
    remote_serde: naive
    remote_storage_plugins: ["wqs"]
    extra_config:
      remote_storage_plugin.wqs.module_path: wqs.integrations.lmcache
      remote_storage_plugin.wqs.class_name: WQSConnectorAdapter
      remote_storage_plugin.wqs.servers: "10.0.0.1:7070,10.0.0.2:7070,10.0.0.3:7070"
      # or: remote_storage_plugin.wqs.config: /etc/wqs/client.yaml   (etcd, auth, replicas)
      # optional: remote_storage_plugin.wqs.timeout_s: 2.0
      #           remote_storage_plugin.wqs.namespace: "prod"   (separates deployments)
      #           remote_storage_plugin.wqs.pin_seconds: 30    (see "Pins" below)

The plugin name is ``wqs`` or ``wqs.<instance>`` (LMCache's ``type.instance`` form); keys
are looked up under the full name first, then under ``remote_storage_plugin.wqs.``.
Without any, ``$WQS_CONFIG`` / ``$WQS_SERVERS`` name the cluster.

Chunk keys must be the same in every process. LMCache names a chunk by a hash chain over
its tokens, started from a seed vLLM derives: from ``PYTHONHASHSEED`` when it is set,
else a fixed one for ``sha256_cbor`` / ``sha256`` and a random one per process for
``xxhash`` / ``xxhash_cbor``; LMCache's default, ``pre_caching_hash_algorithm: builtin``,
is Python's ``hash()``, seeded per process. So: ``sha256_cbor``, and ``PYTHONHASHSEED``
the same in every process that shares the cache (unset everywhere is simplest; a process
with another value finds nothing). Where the keys would differ in every process (a
per-process hash and ``PYTHONHASHSEED`` unset) no other process -- nor the same one
after a restart -- would find what a process stored, so the plugin refuses to start
(`ChunkHashNotShared`, naming the key). LMCache logs the refusal ("Failed to create
remote backend for plugin wqs: ...") and runs on without WQS.

``remote_serde``: ``naive`` (the chunk as LMCache holds it) or ``kivi`` (in LMCache 0.5.x
an identity, so the same bytes). ``cachegen`` is refused: it turns a chunk into a
variable-length bitstream (on CUDA) that the plugin cannot receive into the KV-shaped
buffer it allocates before a read.

Storage layout. An LMCache key (`CacheEngineKey` or `LayerCacheEngineKey`) maps to two
WQS blocks whose IDs are pure functions of ``key.to_string()`` and the namespace, so
every process and host computes the same IDs (see `key_block_ids`):

* the data block: the chunk's bytes exactly as ``memory_obj.byte_array`` holds them;
* the meta block: ``b"WQSLMC\\0\\1"`` + LMCache's own `RemoteMetadata` chunk header (length,
  memory format, dtype and shape per group) -- what LMCache's FS connector writes in
  front of its data. It tells a full chunk from a partial one (``save_unfull_chunk``).

Both are written by one ``put_many`` and read by one ``get_many`` (one parallel round
trip); the data block is received straight into the memory object LMCache allocated, so
a load copies nothing in Python (one block holding header and data would cost a 32 MiB
memcpy per chunk on each side: the SDK cannot split one block between two buffers).
Existence checks and ``batched_async_contains`` ask about both blocks of every key in
one ``exists_many`` (one parallel round trip), so a hit means both can be read. The
price: with ``replicas: 1`` a chunk depends on two nodes, so a dead node turns about
twice its share of chunks into misses (``replicas: 2`` in the client config avoids it).

Pins. When LMCache looks chunks up to load them (``batched_async_contains(pin=True)``,
its asynchronous loading path), the blocks found are pinned on their nodes for
``pin_seconds`` (default 30; a node cuts it to its ``engine.max_pin_s``), so eviction
cannot take them between the lookup and the load; the load releases them once it has
read them (in the background: the answer does not wait for it), and a lookup that
loads nothing leaves them to expire by themselves. A lookup without ``pin`` pins
nothing. A node refuses pins past its cap on pinned bytes; the lookup's answer is the
same either way (pins protect, they are not needed to be found).

Failures. A node that is down or slow makes its blocks misses (``exists`` False, ``get``
None, the consecutive-hit count ends there), and a put it cannot take is logged and
dropped: no call raises into LMCache's event loop. ``list()`` returns ``[]``: WQS
addresses blocks by hash and keeps no key catalogue.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, List, Mapping, Optional, Sequence

from lmcache.utils import CacheEngineKey
from lmcache.v1.exceptions import IrrecoverableException
from lmcache.v1.memory_management import MemoryObj
from lmcache.v1.protocol import RemoteMetadata
from lmcache.v1.storage_backend.connector import ConnectorAdapter, ConnectorContext
from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector

from wqs.errors import ConfigError
from wqs.integrations.common import acquire_client, cluster_spec, derive_id, release_client

log = logging.getLogger("wqs.integrations.lmcache")

PLUGIN_TYPE = "wqs"
META_MAGIC = b"WQSLMC\x00\x01"  # 6 bytes tag + format version 1
META_BUF_BYTES = 4096  # receive buffer per meta block: far above any RemoteMetadata
DEFAULT_PIN_SECONDS = 30.0  # how long a lookup with pin asks its blocks to be kept
MAX_PINNED_LOOKUPS = 4096  # lookups whose pins wait for their load (older ones expire)
_DATA_DOMAIN = b"wqs/lmcache/data/1\x00"
_META_DOMAIN = b"wqs/lmcache/meta/1\x00"

# pre_caching_hash_algorithm values that give every process the same chunk keys without
# PYTHONHASHSEED (vLLM derives the chain's start from a fixed seed for these).
SHARED_HASHES = ("sha256", "sha256_cbor", "sha256_cbor_64bit")
# remote_serde values whose chunks are stored as LMCache holds them (kivi is an identity
# in LMCache 0.5.x).
SUPPORTED_SERDE = ("naive", "kivi")
FIX_HINT = ("set pre_caching_hash_algorithm: sha256_cbor in the LMCache config (or export "
            "PYTHONHASHSEED with one value in every process that shares the cache)")


class PluginConfigError(ConfigError, IrrecoverableException):
    """An LMCache config the plugin cannot work with. An IrrecoverableException, so that
    LMCache's RemoteBackend fails instead of retrying the connection every few seconds."""


class ChunkHashNotShared(PluginConfigError):
    """LMCache's chunk keys would differ in every process: nothing stored is ever found."""


def _vllm_hash_loader() -> Optional[Callable[[str], Any]]:
    """vLLM's get_hash_fn_by_name, where LMCache finds its hash functions (None: not
    installed here, and then LMCache falls back to Python's hash())."""
    try:
        from vllm.utils.hashing import get_hash_fn_by_name
    except ImportError:
        try:
            from vllm.utils import get_hash_fn_by_name  # type: ignore[attr-defined,no-redef]
        except ImportError:
            return None
    return get_hash_fn_by_name


def chunk_hash_problem(algorithm: str, environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """Why chunk keys from `algorithm` differ between processes, or None if they do not."""
    seed = environ.get("PYTHONHASHSEED")
    if seed is not None and seed != "random":
        return None  # every hash LMCache uses is then a function of that seed
    if algorithm in SHARED_HASHES:
        loader = _vllm_hash_loader()
        # As LMCache looks them up (vLLM renamed sha256_cbor_64bit to sha256_cbor).
        names = [algorithm] if algorithm == "sha256" else ["sha256_cbor", "sha256_cbor_64bit"]
        for name in names if loader is not None else []:
            try:
                loader(name)
                return None
            except ValueError:
                continue
        why = (f"LMCache cannot load {algorithm!r} from vLLM here and falls back to Python's "
               f"hash(), seeded differently in every process")
    elif algorithm == "builtin":
        why = "'builtin' is Python's hash(), seeded differently in every process"
    elif algorithm in ("xxhash", "xxhash_cbor"):
        why = f"{algorithm!r} starts the hash chain from a random per-process seed"
    else:
        why = (f"{algorithm!r} is no hash LMCache knows, so it falls back to Python's hash(), "
               f"seeded differently in every process")
    return (f"pre_caching_hash_algorithm: {why}, and PYTHONHASHSEED is not fixed, so no other "
            f"process or host (nor this one after a restart) would find the chunks this "
            f"one stores in WQS: {FIX_HINT}")


def check_lmcache_config(config: Any, environ: Mapping[str, str] = os.environ) -> None:
    """Raise a PluginConfigError naming the key if `config` cannot share chunks via WQS."""
    problem = chunk_hash_problem(str(getattr(config, "pre_caching_hash_algorithm", None)
                                     or "builtin"), environ)
    if problem is not None:
        raise ChunkHashNotShared(problem)
    serde = getattr(config, "remote_serde", None) or "naive"
    if serde not in SUPPORTED_SERDE:
        raise PluginConfigError(
            f"remote_serde: {serde!r} is not supported by the WQS plugin (it stores chunks "
            f"as LMCache holds them and reads them straight into LMCache's buffers); use "
            f"one of {', '.join(SUPPORTED_SERDE)}")


def key_block_ids(key_string: str, namespace: str = "") -> tuple[bytes, bytes]:
    """(data block ID, meta block ID) of an LMCache key given as ``key.to_string()``."""
    return (derive_id(_DATA_DOMAIN, namespace, key_string),
            derive_id(_META_DOMAIN, namespace, key_string))


def _plugin_type(name: str) -> str:
    return name.split(".", 1)[0]


class WQSConnectorAdapter(ConnectorAdapter):
    """What ``remote_storage_plugin.<name>.class_name`` names: LMCache instantiates it
    with no arguments and asks it for a connector for ``plugin://wqs[.<instance>]``."""

    def __init__(self) -> None:
        super().__init__(f"plugin://{PLUGIN_TYPE}")

    def can_parse(self, url: str) -> bool:
        if not url.startswith("plugin://"):
            return False
        return _plugin_type(url[len("plugin://"):]) == PLUGIN_TYPE

    def create_connector(self, context: ConnectorContext) -> RemoteConnector:
        name = context.plugin_name or context.url[len("plugin://"):] or PLUGIN_TYPE
        return WQSRemoteConnector(
            loop=context.loop, local_cpu_backend=context.local_cpu_backend,
            config=context.config, metadata=context.metadata, plugin_name=name)


class WQSRemoteConnector(RemoteConnector):
    """LMCache's `RemoteConnector` interface over a `wqs.Client`.

    Also loadable directly as ``class_name: WQSRemoteConnector`` (LMCache then wraps it
    in its DynamicConnectorAdapter and passes no metadata: it is taken from the local
    CPU backend).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, local_cpu_backend: Any, config: Any,
                 metadata: Any = None, plugin_name: Optional[str] = None,
                 client: Any = None) -> None:
        if metadata is None:
            metadata = getattr(local_cpu_backend, "metadata", None)
        try:
            check_lmcache_config(config)
        except PluginConfigError as e:
            log.error("WQS LMCache plugin refuses to start: %s", e)
            raise
        super().__init__(config, metadata)
        self.loop = loop
        self.local_cpu_backend = local_cpu_backend
        self.plugin_name = plugin_name or PLUGIN_TYPE
        extra = getattr(config, "extra_config", None) or {}

        def get(key: str) -> Any:
            for prefix in (self.plugin_name, PLUGIN_TYPE):
                value = extra.get(f"remote_storage_plugin.{prefix}.{key}")
                if value is not None:
                    return value
            return None

        self.namespace = str(get("namespace") or "")
        pin_seconds = get("pin_seconds")
        try:
            self.pin_seconds = float(DEFAULT_PIN_SECONDS if pin_seconds is None else pin_seconds)
        except (TypeError, ValueError):
            self.pin_seconds = -1.0
        if not 0 < self.pin_seconds < 1e6:
            raise PluginConfigError(f"remote_storage_plugin.{self.plugin_name}.pin_seconds "
                                    f"must be a number of seconds > 0, got {pin_seconds!r}")
        # Blocks each lookup (by LMCache's lookup_id) pinned, until its load reads them.
        self._pinned: OrderedDict[str, list[bytes]] = OrderedDict()
        self._owns_client = client is None
        if client is None:
            path, servers, overrides = cluster_spec(
                get, f"extra_config['remote_storage_plugin.{self.plugin_name}.{{key}}']")
            client = acquire_client(path, servers, overrides)
        self.client = client
        # The SDK blocks; LMCache's loop must not. Calls run here, never on the loop
        # thread and never on the client's own pool (its fan-out uses that one).
        self._pool = ThreadPoolExecutor(int(get("io_threads") or 8),
                                        thread_name_prefix="wqs-lmcache")
        self._stats_lock = threading.Lock()
        self.stats = {"put_blocks": 0, "put_failed": 0, "get_hits": 0, "get_misses": 0,
                      "errors": 0}
        self._closed = False
        log.info("WQS LMCache connector %s: nodes %s, namespace %r", self.plugin_name,
                 list(self.client.nodes), self.namespace)

    # ---- helpers ---------------------------------------------------------------------

    def _ids(self, key: CacheEngineKey) -> tuple[bytes, bytes]:
        return key_block_ids(key.to_string(), self.namespace)

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[name] += n

    async def _run(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def _safe(self, what: str, fn: Callable[[], Any], default: Any) -> Any:
        """fn(); on any error (a node failing in a way the SDK raises, a bug in a
        buffer) log it and return `default`: the engine sees a miss, never a raise."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - a storage failure must not stall the engine
            self._count("errors")
            log.warning("WQS %s failed, treated as a miss: %s", what, e)
            return default

    @staticmethod
    def _view(memory_obj: MemoryObj) -> memoryview:
        buf = memory_obj.byte_array
        view = buf if isinstance(buf, memoryview) else memoryview(buf)
        return view.cast("B") if view.format != "B" or view.ndim != 1 else view

    def _meta_bytes(self, memory_obj: MemoryObj, length: int) -> bytes:
        md = RemoteMetadata(length, memory_obj.get_shapes(), memory_obj.get_dtypes(),
                            memory_obj.get_memory_format())
        return META_MAGIC + md.serialize()

    def _allocate(self) -> Optional[MemoryObj]:
        try:
            return self.local_cpu_backend.allocate(self.meta_shapes, self.meta_dtypes,
                                                   self.meta_fmt, busy_loop=False)
        except TypeError:  # an LMCache whose allocate() has no busy_loop
            return self.local_cpu_backend.allocate(self.meta_shapes, self.meta_dtypes,
                                                   self.meta_fmt)

    def _finish(self, memory_obj: MemoryObj, data: Any, meta: Any) -> Optional[MemoryObj]:
        """Check a received (data, meta) pair against the memory object it was received
        into; the object (reshaped for a partial chunk) or None (then released)."""
        if data is None or meta is None:
            return None
        meta = memoryview(meta)
        if bytes(meta[: len(META_MAGIC)]) != META_MAGIC:
            log.warning("WQS block with a foreign meta header; treated as a miss")
            return None
        try:
            md = RemoteMetadata.deserialize(meta[len(META_MAGIC):])
        except Exception as e:  # noqa: BLE001 - e.g. a header of another group count
            log.warning("WQS meta header unreadable (%s); treated as a miss", e)
            return None
        n = len(memoryview(data))
        if (md.length != n or md.fmt != self.meta_fmt or list(md.dtypes) != list(self.meta_dtypes)):
            log.warning("WQS chunk does not match this engine (%d B, %s, %s); a miss",
                        md.length, md.fmt, md.dtypes)
            return None
        if n == self.full_chunk_size_bytes:
            expect = [tuple(x) for x in self.meta_shapes]
        else:
            memory_obj = self.reshape_partial_chunk(memory_obj, n)
            expect = [tuple(memory_obj.meta.shape)] if len(md.shapes) == 1 else None
        if expect is not None and [tuple(x) for x in md.shapes] != expect:
            log.warning("WQS chunk of shape %s where this engine expects %s; a miss",
                        md.shapes, expect)
            return None
        return memory_obj

    def _get_batch(self, keys: Sequence[CacheEngineKey]) -> list[Optional[MemoryObj]]:
        """Allocate, fetch every key's two blocks in one get_many, check; per key the
        memory object or None. Objects of misses are released here."""
        objs: list[MemoryObj] = []
        for _ in keys:
            obj = self._allocate()
            if obj is None:  # local CPU memory is full: fetch what fits
                log.debug("LMCache CPU buffer full after %d of %d chunks", len(objs), len(keys))
                break
            objs.append(obj)
        n = len(objs)
        if n == 0:
            return [None] * len(keys)
        ids: list[bytes] = []
        metas: list[bytes] = []
        for key in keys[:n]:
            d, m = self._ids(key)
            ids.append(d)
            metas.append(m)
        outs = [self._view(o) for o in objs] + [bytearray(META_BUF_BYTES) for _ in range(n)]
        try:
            got = self.client.get_many(ids + metas, outs=outs)
        except Exception as e:  # noqa: BLE001 - e.g. a stored block larger than a chunk
            self._count("errors")
            log.warning("WQS get of %d chunks failed, treated as misses: %s", n, e)
            got = [None] * (2 * n)
        result: list[Optional[MemoryObj]] = []
        for i, obj in enumerate(objs):
            done = self._safe("chunk check", lambda: self._finish(obj, got[i], got[n + i]), None)
            if done is None:
                obj.ref_count_down()
            result.append(done)
        hits = sum(r is not None for r in result)
        self._count("get_hits", hits)
        self._count("get_misses", len(keys) - hits)
        return result + [None] * (len(keys) - n)

    def _put_batch(self, keys: Sequence[CacheEngineKey], memory_objs: Sequence[MemoryObj]) -> None:
        items: list[tuple[bytes, Any]] = []
        for key, obj in zip(keys, memory_objs):
            view = self._view(obj)
            d, m = self._ids(key)
            items.append((d, view))
            items.append((m, self._meta_bytes(obj, len(view))))
        ok = self.client.put_many(items)
        failed = sum(1 for i in range(0, len(ok), 2) if not (ok[i] and ok[i + 1]))
        self._count("put_blocks", len(keys) - failed)
        if failed:
            self._count("put_failed", failed)
            log.warning("WQS could not store %d of %d chunks (node down?); dropped",
                        failed, len(keys))

    # ---- RemoteConnector: single keys -----------------------------------------------

    def _stored_prefix(self, keys: Sequence[CacheEngineKey], pin_for: str | None = None) -> int:
        """How many leading keys have both blocks stored: one exists_many. With pin_for
        (a lookup_id), the blocks of those leading keys are pinned until the load of
        that lookup reads them (those found past the first miss are released at once)."""
        if not keys:
            return 0
        ids = [self._ids(k) for k in keys]
        flat = [d for d, _ in ids] + [m for _, m in ids]
        if pin_for is None:
            found = self.client.exists_many(flat)
        else:
            found = self.client.exists_many(flat, pin_s=self.pin_seconds)
        n = len(keys)
        hits = next((i for i in range(n) if not (found[i] and found[n + i])), n)
        if pin_for is not None:
            past = [b for i in range(hits, n) for b in ids[i] if found[i] or found[n + i]]
            if past:
                self._release(past)
            if hits:
                self._remember_pins(pin_for, [b for i in range(hits) for b in ids[i]])
        return hits

    def _remember_pins(self, lookup_id: str, block_ids: list[bytes]) -> None:
        with self._stats_lock:
            older = self._pinned.pop(lookup_id, None)
            self._pinned[lookup_id] = block_ids + (older or [])
            while len(self._pinned) > MAX_PINNED_LOOKUPS:  # never loaded: they expire
                self._pinned.popitem(last=False)

    def _release(self, block_ids: list[bytes]) -> None:
        """Release pins in the background (a miss costs nothing but an early end)."""
        if self._closed:
            return
        try:
            self._pool.submit(self._safe, "unpin", lambda: self.client.unpin_many(block_ids),
                              None)
        except RuntimeError:  # the pool is shut down: they expire by themselves
            pass

    async def exists(self, key: CacheEngineKey) -> bool:
        return await self._run(lambda: self.exists_sync(key))

    def exists_sync(self, key: CacheEngineKey) -> bool:
        return bool(self._safe("exists", lambda: self._stored_prefix([key]) == 1, False))

    async def get(self, key: CacheEngineKey) -> Optional[MemoryObj]:
        return (await self._run(lambda: self._safe("get", lambda: self._get_batch([key]),
                                                     [None])))[0]

    async def put(self, key: CacheEngineKey, memory_obj: MemoryObj) -> None:
        # LMCache's InstrumentedRemoteConnector drops the caller's reference afterwards.
        await self._run(lambda: self._safe("put", lambda: self._put_batch([key], [memory_obj]),
                                           None))

    async def list(self) -> List[str]:
        return []  # blocks are addressed by hash; WQS keeps no catalogue of LMCache keys

    def remove_sync(self, key: CacheEngineKey) -> bool:
        return bool(self._safe("remove", lambda: any(self.client.delete_many(self._ids(key))),
                               False))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        if self._owns_client:
            release_client(self.client)
        log.info("WQS LMCache connector %s closed: %s", self.plugin_name, self.stats)

    def support_ping(self) -> bool:
        return True

    async def ping(self) -> int:
        """0 while at least one node answers; 1 when none does."""
        rtts = await self._run(lambda: self._safe("ping", self.client.ping, {}))
        return 0 if any(v is not None for v in rtts.values()) else 1

    # ---- RemoteConnector: batches ----------------------------------------------------

    def support_batched_put(self) -> bool:
        return True

    async def batched_put(self, keys: List[CacheEngineKey], memory_objs: List[MemoryObj]) -> None:
        await self._run(lambda: self._safe("batched put",
                                           lambda: self._put_batch(keys, memory_objs), None))

    def support_batched_get(self) -> bool:
        return True

    async def batched_get(self, keys: List[CacheEngineKey]) -> List[Optional[MemoryObj]]:
        return await self._run(lambda: self._safe("batched get", lambda: self._get_batch(keys),
                                                  [None] * len(keys)))

    def support_batched_contains(self) -> bool:
        return True

    def batched_contains(self, keys: List[CacheEngineKey]) -> int:
        return int(self._safe("lookup", lambda: self._stored_prefix(keys), 0))

    def support_batched_async_contains(self) -> bool:
        return True

    async def batched_async_contains(self, lookup_id: str, keys: List[CacheEngineKey],
                                     pin: bool = False) -> int:
        """How many leading keys are stored: one `exists_many`, one round trip. With
        `pin`, the chunks found are pinned until batched_get_non_blocking of the same
        lookup_id reads them (or for pin_seconds): see "Pins" above."""
        if not pin:
            return await self._run(lambda: self.batched_contains(keys))
        return await self._run(lambda: int(self._safe(
            "lookup", lambda: self._stored_prefix(keys, pin_for=lookup_id), 0)))

    def support_batched_get_non_blocking(self) -> bool:
        return True

    async def batched_get_non_blocking(self, lookup_id: str,
                                       keys: List[CacheEngineKey]) -> List[MemoryObj]:
        """The consecutive prefix of hits (what LMCache's async loader expects); objects
        after the first miss are released."""
        got = await self._run(lambda: self._safe("batched get", lambda: self._get_batch(keys),
                                                 [None] * len(keys)))
        with self._stats_lock:
            pinned = self._pinned.pop(lookup_id, None)
        if pinned:
            self._release(pinned)
        prefix: List[MemoryObj] = []
        for obj in got:
            if obj is None:
                break
            prefix.append(obj)
        for obj in got[len(prefix):]:
            if obj is not None:
                obj.ref_count_down()
        return prefix

    def __repr__(self) -> str:
        return f"<WQSRemoteConnector {self.plugin_name} nodes={list(self.client.nodes)}>"


__all__ = ["WQSConnectorAdapter", "WQSRemoteConnector", "key_block_ids", "META_MAGIC",
           "PluginConfigError", "ChunkHashNotShared", "check_lmcache_config",
           "chunk_hash_problem"]
