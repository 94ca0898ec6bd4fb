"""The LMCache remote storage plugin against the real `lmcache` package and real daemons.

Everything runs on the CPU: LMCache's own config objects (from the YAML the plugin's
docstring documents), its metadata, its CPU memory allocator and objects, its
RemoteBackend / ConnectorManager plugin loading, and a whole `LMCacheEngine`
(store -> lookup -> retrieve) whose KV "GPU" is a CPU tensor. Skipped, with the reason,
where `lmcache` (or torch) is not installed: see wqs/integrations/README.md for the
install.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("lmcache", reason="lmcache (with torch) is not installed here; the engine "
                    "tests run in the integration venv: see wqs/integrations/README.md")
torch = pytest.importorskip("torch")

from lmcache.utils import CacheEngineKey  # noqa: E402
from lmcache.v1.cache_engine import LMCacheEngineBuilder  # noqa: E402
from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.memory_management import MemoryFormat, MemoryObj  # noqa: E402
from lmcache.v1.storage_backend.connector import CreateConnector  # noqa: E402
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend  # noqa: E402
from lmcache.v1.storage_backend.remote_backend import RemoteBackend  # noqa: E402

import wqs  # noqa: E402
from tests.daemons import ROOT, daemon_factory  # noqa: E402,F401 (fixture import)
from tests.lmcache_proc import (CHUNK, DTYPE, HEAD_DIM, HEADS, LAYERS,  # noqa: E402
                                CPUKVConnector, lmcache_metadata)
from wqs.integrations.lmcache import (META_MAGIC, ChunkHashNotShared,  # noqa: E402
                                      PluginConfigError, WQSRemoteConnector, key_block_ids)

CHUNK_BYTES = 2 * LAYERS * CHUNK * HEADS * HEAD_DIM * 2  # 32 KiB

# What wqs/integrations/README.md tells a user to write, with a small CPU tier.
YAML = """\
chunk_size: {chunk}
local_cpu: {local_cpu}
max_local_cpu_size: 0.05
pre_caching_hash_algorithm: {hash}
remote_serde: {serde}
save_unfull_chunk: true
remote_storage_plugins: ["wqs"]
extra_config:
  remote_storage_plugin.wqs.module_path: wqs.integrations.lmcache
  remote_storage_plugin.wqs.class_name: WQSConnectorAdapter
  remote_storage_plugin.wqs.servers: "{servers}"
  remote_storage_plugin.wqs.timeout_s: 1.0
  remote_storage_plugin.wqs.namespace: "{namespace}"
"""


def lmcache_yaml(tmp_path: Path, servers: list[str], namespace: str = "t", *,
                 hash: str = "sha256_cbor", serde: str = "naive",
                 local_cpu: bool = False) -> Path:
    path = tmp_path / f"lmcache-{namespace}-{hash}-{serde}-{local_cpu}.yaml"
    path.write_text(YAML.format(chunk=CHUNK, servers=",".join(servers), namespace=namespace,
                                hash=hash, serde=serde, local_cpu=str(local_cpu).lower()))
    return path


def lmcache_config(tmp_path: Path, servers: list[str], namespace: str = "t",
                   **kw) -> LMCacheEngineConfig:
    """LMCache's own config, read by LMCache from the YAML a user writes."""
    return LMCacheEngineConfig.from_file(str(lmcache_yaml(tmp_path, servers, namespace, **kw)))


_engines = iter(range(1_000_000))


@pytest.fixture
def engines():
    """make(config) -> a post-initialised LMCacheEngine on the CPU; all destroyed after."""
    made: list[str] = []

    def make(config: LMCacheEngineConfig):
        iid = f"wqs-test-{next(_engines)}"
        config.lmcache_instance_id = iid
        engine = LMCacheEngineBuilder.get_or_create(iid, config, lmcache_metadata(),
                                                    CPUKVConnector(), None, None)
        engine.post_init()
        made.append(iid)
        return engine

    yield make
    for iid in made:
        LMCacheEngineBuilder.destroy(iid)


@pytest.fixture
def loop():
    """An asyncio loop on its own thread, as LMCache runs its remote backends."""
    lp = asyncio.new_event_loop()
    t = threading.Thread(target=lp.run_forever, daemon=True)
    t.start()
    yield lp
    lp.call_soon_threadsafe(lp.stop)
    t.join(5)


def remote_backend(config, loop):
    """LMCache's RemoteBackend for plugin "wqs", over its real LocalCPUBackend."""
    metadata = lmcache_metadata()
    local = LocalCPUBackend(config, metadata, dst_device="cpu")
    return RemoteBackend(config, metadata, loop, local, dst_device="cpu", plugin_name="wqs")


def wqs_connector(backend: RemoteBackend) -> WQSRemoteConnector:
    conn = backend.connection.getWrappedConnector()
    assert isinstance(conn, WQSRemoteConnector)
    return conn


def key(i: int) -> CacheEngineKey:
    return CacheEngineKey(model_name="tiny-llama", world_size=1, worker_id=0,
                          chunk_hash=0x5EED0000 + i, dtype=DTYPE)


def filled(backend: RemoteBackend, seed: int) -> MemoryObj:
    metadata = lmcache_metadata()
    obj = backend.local_cpu_backend.allocate(metadata.get_shapes(), metadata.get_dtypes(),
                                             MemoryFormat.KV_2LTD)
    g = torch.Generator().manual_seed(seed)
    obj.tensor.copy_(torch.randn(obj.tensor.shape, generator=g).to(DTYPE))
    return obj


def run(loop, coro, timeout=20):
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


def wait_until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# --------------------------------------------------------------------------- tests


def test_key_to_block_ids_is_deterministic_across_processes():
    k = key(1)
    ids = key_block_ids(k.to_string(), "ns")
    assert ids[0] != ids[1] and len(ids[0]) == 16
    assert key_block_ids(k.to_string(), "other") != ids
    # Another process (another hash seed) derives the same data block ID. (It computes
    # derive_id itself rather than import the plugin, to skip importing lmcache again.)
    code = ("from wqs.integrations.common import derive_id;"
            f"print(derive_id(b'wqs/lmcache/data/1\\x00', 'ns', {k.to_string()!r}).hex())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={"PYTHONPATH": str(ROOT),
                                                     "PYTHONHASHSEED": "123"})
    assert out.stdout.strip() == ids[0].hex()
    # Frozen: changing the mapping orphans every chunk already stored.
    assert key_block_ids("m@1@0@abc@bfloat16", "")[0].hex() == "ff5d4c481d91360dbf79b34a4e26d076"



def test_lmcache_loads_the_plugin_from_its_yaml(tmp_path, daemon_factory, loop):
    d = daemon_factory()
    config = lmcache_config(tmp_path, [d.address])
    assert config.remote_storage_plugins == ["wqs"]
    conn = CreateConnector("plugin://wqs", loop, None, config, lmcache_metadata(),
                           plugin_name="wqs")
    inner = conn.getWrappedConnector()  # LMCache wraps every connector in its instrumentation
    assert isinstance(inner, WQSRemoteConnector)
    assert inner.client.nodes == (d.address,)
    assert inner.full_chunk_size_bytes == CHUNK_BYTES
    assert run(loop, conn.list()) == []
    assert run(loop, conn.ping()) == 0
    run(loop, conn.close())


def test_engine_store_lookup_retrieve_through_wqs(tmp_path, daemon_factory, engines):
    """LMCacheEngine A stores 100 tokens (6 full chunks + a partial one) into a 2-node
    cluster; engine B, with an empty CPU tier and the servers in the other order,
    looks them up and retrieves them bit-exact from WQS."""
    nodes = [daemon_factory(), daemon_factory()]
    servers = [n.address for n in nodes]
    tokens = torch.arange(1000, 1100)
    kv = torch.randn(2, LAYERS, len(tokens), HEADS * HEAD_DIM,
                     generator=torch.Generator().manual_seed(7)).to(DTYPE)

    a = engines(lmcache_config(tmp_path, servers, "e2e"))
    a.store(tokens, kvcaches=kv)
    b = engines(lmcache_config(tmp_path, servers[::-1], "e2e"))
    wait_until(lambda: b.lookup(tokens) == len(tokens))  # puts are asynchronous in LMCache

    out = torch.zeros_like(kv)
    mask = b.retrieve(tokens, kvcaches=out)
    assert int(mask.sum()) == len(tokens)
    assert torch.equal(out, kv)
    # Both daemons are on this host: with transport auto (the default) every block moved
    # one-sided through shared memory, none inline through the socket.
    for n in nodes:
        counts = n.request_counts()
        assert counts["put_shm"] >= 1 and counts["get_shm"] >= 1, counts
        assert counts["put"] == counts["get"] == 0, counts

    # The blocks are in WQS, under the documented IDs: data = the chunk's bytes,
    # meta = the magic + LMCache's RemoteMetadata header.
    client = wqs.Client(servers)
    conn_ids = [key_block_ids(k.to_string(), "e2e")
                for _, _, k in b.token_database.process_tokens(tokens)]
    got = client.get_many([m for _, m in conn_ids])
    assert all(g is not None and bytes(g[:len(META_MAGIC)]) == META_MAGIC for g in got)
    sizes = [len(client.get(dd)) for dd, _ in conn_ids]
    assert sizes == [CHUNK_BYTES] * 6 + [CHUNK_BYTES * 4 // CHUNK]
    client.close()

    # A different namespace sees none of it.
    c = engines(lmcache_config(tmp_path, servers, "other"))
    assert c.lookup(tokens) == 0


def test_remote_backend_batched_fast_paths(tmp_path, daemon_factory, loop):
    """batched put / contains / get_non_blocking as LMCache's RemoteBackend calls them."""
    d = daemon_factory()
    backend = remote_backend(lmcache_config(tmp_path, [d.address], "batch"), loop)
    conn = wqs_connector(backend)
    keys = [key(i) for i in range(8)]
    objs = [filled(backend, i) for i in range(8)]
    expect = [o.tensor.clone() for o in objs]
    stored = [0, 1, 2, 3, 4, 6, 7]  # key 5 missing: the consecutive hits end at 5
    backend.batched_submit_put_task([keys[i] for i in stored], [objs[i] for i in stored])
    wait_until(lambda: conn.stats["put_blocks"] + conn.stats["put_failed"] == len(stored))
    assert conn.stats["put_blocks"] == len(stored)

    calls = []
    real = conn.client.exists_many
    conn.client.exists_many = lambda ids: calls.append(len(ids)) or real(ids)
    assert run(loop, backend.batched_async_contains("l1", keys)) == 5
    assert calls == [16]  # one call (one parallel round trip) for both blocks of 8 keys
    conn.client.exists_many = real
    assert backend.batched_contains(keys) == 5
    assert backend.contains(keys[6]) and not backend.contains(keys[5])

    got = run(loop, backend.batched_get_non_blocking("l1", keys))
    assert len(got) == 5
    for obj, want in zip(got, expect):
        assert torch.equal(obj.tensor, want)
        obj.ref_count_down()

    blocking = backend.batched_get_blocking(keys)
    assert [o is not None for o in blocking] == [i in stored for i in range(8)]
    assert torch.equal(blocking[7].tensor, expect[7])
    single = backend.get_blocking(keys[3])
    assert torch.equal(single.tensor, expect[3])
    for obj in [single, *objs, *(o for o in blocking if o is not None)]:
        obj.ref_count_down()

    assert backend.remove(keys[0]) and not backend.contains(keys[0])
    assert run(loop, backend.batched_async_contains("l2", keys)) == 0
    backend.close()


def test_a_lookup_with_pin_pins_what_its_load_reads_and_the_load_releases_it(
        tmp_path, daemon_factory, loop):
    """batched_async_contains(pin=True), as LMCache's async loading path asks it: the
    leading chunks found are pinned on the node until batched_get_non_blocking of the
    same lookup reads them; chunks found past the first miss are released at once; a
    lookup without pin pins nothing."""
    from wqs.rpc.control import ControlClient

    d = daemon_factory()

    def engine_stats() -> dict:
        with ControlClient(d.control_address) as control:
            return control.stats()["engine"]

    backend = remote_backend(lmcache_config(tmp_path, [d.address], "pins"), loop)
    conn = wqs_connector(backend)
    keys = [key(i) for i in range(8)]
    objs = [filled(backend, i) for i in range(8)]
    stored = [0, 1, 2, 3, 4, 6, 7]
    backend.batched_submit_put_task([keys[i] for i in stored], [objs[i] for i in stored])
    wait_until(lambda: conn.stats["put_blocks"] == len(stored))

    assert run(loop, backend.batched_async_contains("plain", keys)) == 5
    assert engine_stats()["pins_granted"] == 0  # a lookup without pin pins nothing
    assert run(loop, backend.batched_async_contains("p1", keys, pin=True)) == 5
    # Both blocks of each of the 5 leading chunks stay pinned; chunks 6 and 7 (found
    # after the miss) were pinned by the same round trip and are released at once.
    wait_until(lambda: engine_stats()["pinned_blocks"] == 10)
    assert engine_stats()["pins_granted"] == 14
    got = run(loop, backend.batched_get_non_blocking("p1", keys))
    assert len(got) == 5
    for obj in got:
        obj.ref_count_down()
    wait_until(lambda: engine_stats()["pinned_blocks"] == 0)  # the load released them
    for obj in objs:
        obj.ref_count_down()
    backend.close()


def test_partial_chunk_keeps_its_shape(tmp_path, daemon_factory, loop):
    """A chunk shorter than chunk_size (save_unfull_chunk) comes back with its own
    shape: the stored meta header carries it."""
    d = daemon_factory()
    backend = remote_backend(lmcache_config(tmp_path, [d.address], "partial"), loop)
    metadata = lmcache_metadata()
    obj = backend.local_cpu_backend.allocate(metadata.get_shapes(5), metadata.get_dtypes(),
                                             MemoryFormat.KV_2LTD)
    obj.tensor.copy_(torch.randn(obj.tensor.shape).to(DTYPE))
    want = obj.tensor.clone()
    backend.submit_put_task(key(99), obj).result(10)
    got = backend.get_blocking(key(99))
    assert tuple(got.tensor.shape) == (2, LAYERS, 5, HEADS * HEAD_DIM)
    assert torch.equal(got.tensor, want)
    obj.ref_count_down()
    got.ref_count_down()
    backend.close()


def test_a_dead_node_is_a_miss_not_an_error(tmp_path, daemon_factory, engines, loop):
    """Kill one of three nodes: lookups end at the first chunk it held, retrieves return
    that prefix, gets of its chunks are None, puts to it are dropped -- nothing raises,
    and every call returns within the client timeout."""
    nodes = [daemon_factory() for _ in range(3)]
    servers = [n.address for n in nodes]
    tokens = torch.arange(5000, 5000 + 12 * CHUNK)
    kv = torch.randn(2, LAYERS, len(tokens), HEADS * HEAD_DIM,
                     generator=torch.Generator().manual_seed(3)).to(DTYPE)
    a = engines(lmcache_config(tmp_path, servers, "fail"))
    a.store(tokens, kvcaches=kv)
    wait_until(lambda: a.lookup(tokens) == len(tokens))

    # Kill a node that holds neither block of chunk 0; a chunk is lost when either of
    # its blocks (data, meta) was there.
    keys = [k for _, _, k in a.token_database.process_tokens(tokens)]
    with wqs.Client(servers) as placement:
        ring = placement.ring
    homes = [{ring.nodes_for(b, 1)[0] for b in key_block_ids(k.to_string(), "fail")}
             for k in keys]
    victim = next(n for n in servers if n not in homes[0])
    first_lost = next((i for i, h in enumerate(homes) if victim in h), len(keys))
    next(n for n in nodes if n.address == victim).kill()

    b = engines(lmcache_config(tmp_path, servers[::-1], "fail"))
    started = time.monotonic()
    hit = b.lookup(tokens)
    assert hit == first_lost * CHUNK
    out = torch.zeros_like(kv)
    mask = b.retrieve(tokens, kvcaches=out)
    n = int(mask.sum())
    assert n == hit and torch.equal(out[:, :, :n], kv[:, :, :n])
    assert time.monotonic() - started < 10

    backend = remote_backend(lmcache_config(tmp_path, servers, "fail"), loop)
    conn = wqs_connector(backend)
    lost = [k for k, h in zip(keys, homes) if victim in h]
    assert not backend.contains(lost[0])
    assert backend.get_blocking(lost[0]) is None
    prefix = run(loop, backend.batched_get_non_blocking("x", keys))
    assert len(prefix) == first_lost
    for got in prefix:
        got.ref_count_down()
    obj = filled(backend, 1)
    backend.submit_put_task(lost[0], obj).result(10)  # dropped, logged, no raise
    obj.ref_count_down()
    assert conn.stats["put_failed"] >= 1
    assert run(loop, backend.connection.ping()) == 0  # two nodes still answer
    backend.close()


# --------------------------------------------------------------------------- config checks


@pytest.mark.parametrize("algorithm", ["builtin", "xxhash", "no-such-hash"])
def test_a_per_process_chunk_hash_is_refused_naming_the_key(tmp_path, daemon_factory, loop,
                                                           monkeypatch, caplog, algorithm):
    """Chunk keys that differ in every process (LMCache's default hash, or a random
    seed, with PYTHONHASHSEED unset) would make every other process miss: the plugin
    refuses to start and says which key to set. With PYTHONHASHSEED fixed it starts."""
    d = daemon_factory()
    config = lmcache_config(tmp_path, [d.address], "h", hash=algorithm)
    for seed in (None, "random"):
        if seed is None:
            monkeypatch.delenv("PYTHONHASHSEED", raising=False)
        else:
            monkeypatch.setenv("PYTHONHASHSEED", seed)
        with pytest.raises(ChunkHashNotShared) as refused:
            remote_backend(config, loop)
        message = str(refused.value)
        assert message.startswith("pre_caching_hash_algorithm: ") and "PYTHONHASHSEED" in message
        assert "pre_caching_hash_algorithm: sha256_cbor" in message  # the fix, spelled out
    assert "WQS LMCache plugin refuses to start" in caplog.text

    monkeypatch.setenv("PYTHONHASHSEED", "0")
    backend = remote_backend(config, loop)
    assert wqs_connector(backend).client.nodes == (d.address,)
    backend.close()


def test_remote_serde_cachegen_is_refused_kivi_works(tmp_path, daemon_factory, loop):
    d = daemon_factory()
    with pytest.raises(PluginConfigError, match="remote_serde: 'cachegen' is not supported"):
        remote_backend(lmcache_config(tmp_path, [d.address], "s", serde="cachegen"), loop)
    backend = remote_backend(lmcache_config(tmp_path, [d.address], "s", serde="kivi"), loop)
    obj = filled(backend, 5)
    want = obj.tensor.clone()
    backend.submit_put_task(key(5), obj).result(10)
    got = backend.get_blocking(key(5))
    assert got is not None and torch.equal(got.tensor, want)
    obj.ref_count_down()
    got.ref_count_down()
    backend.close()


# --------------------------------------------------------------------------- two processes


class EngineProcess:
    """`python -m tests.lmcache_proc`: LMCache engines in a process of their own."""

    def __init__(self, name: str, hash_seed: str | None) -> None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
        if hash_seed is not None:
            env["PYTHONHASHSEED"] = hash_seed
        env["PYTHONPATH"] = str(ROOT)
        self.name = name
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.lmcache_proc"], cwd=ROOT,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.answers: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("@@ "):
                self.answers.put(json.loads(line[3:]))
        self.answers.put(None)  # exited

    def ask(self, timeout: float = 180.0, **cmd) -> dict:
        self.proc.stdin.write(json.dumps({k: str(v) if isinstance(v, Path) else v
                                          for k, v in cmd.items()}) + "\n")
        self.proc.stdin.flush()
        answer = self.answers.get(timeout=timeout)
        assert answer is not None, f"{self.name} exited:\n{self.output()[-4000:]}"
        return answer

    def output(self) -> str:
        return "".join(self.lines)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            assert self.proc.wait(60) == 0, self.output()[-4000:]
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.mark.slow
def test_a_second_process_finds_the_first_ones_chunks(tmp_path, daemon_factory):
    """What the issue found broken: one process stores 200 tokens through LMCache, another
    (local CPU cache off, so every hit comes from WQS) looks them up and retrieves them
    bit-exact -- configured as documented: sha256_cbor, naive or kivi serde, the same
    PYTHONHASHSEED everywhere (here: none). A process with another PYTHONHASHSEED finds
    nothing (vLLM starts sha256_cbor's chain from it when it is set: the pitfall the docs
    warn about), and LMCache's default hash without PYTHONHASHSEED gets no WQS backend
    at all (the plugin refuses; LMCache logs it and runs on)."""
    nodes = [daemon_factory(), daemon_factory()]
    servers = [n.address for n in nodes]
    n_tokens, chunks = 200, 13  # 12 full chunks of 16 tokens and a partial one

    def yaml(ns: str, **kw) -> Path:
        return lmcache_yaml(tmp_path, servers, ns, **kw)

    # Started together: each spends ~10 s importing LMCache and torch.
    procs = [EngineProcess("writer", None), EngineProcess("reader", None),
             EngineProcess("reader-seed-7", "7")]
    try:
        writer, reader, other_seed = procs
        assert writer.ask(op="store", yaml=yaml("sha"), tokens=n_tokens,
                          seed=1) == {"chunks": chunks}
        assert writer.ask(op="store", yaml=yaml("kivi", serde="kivi"), tokens=n_tokens,
                          seed=2) == {"chunks": chunks}

        everything = {"lookup": n_tokens, "retrieved": n_tokens, "exact": True,
                      "wqs_hits": chunks}
        assert reader.ask(op="load", yaml=yaml("sha"), tokens=n_tokens, seed=1) == everything
        assert reader.ask(op="load", yaml=yaml("kivi", serde="kivi"), tokens=n_tokens,
                          seed=2) == everything
        assert other_seed.ask(op="load", yaml=yaml("sha"), tokens=n_tokens, seed=1) == {
            "lookup": 0, "retrieved": 0, "exact": True, "wqs_hits": 0}

        backends = reader.ask(op="engine", yaml=yaml("default", hash="builtin"))["backends"]
        assert "LocalCPUBackend" in backends and "RemoteBackend-wqs" not in backends
        assert ("WQS LMCache plugin refuses to start: pre_caching_hash_algorithm: 'builtin'"
                in reader.output())
        for p in procs:
            p.close()
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()
