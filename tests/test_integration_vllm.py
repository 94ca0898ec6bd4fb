"""The vLLM KV connector against the real `vllm` package, along vLLM's own paths, and real
daemons.

On the CPU, with `examples/vllm_pd_handoff.py`'s `CpuEngine`: vLLM's `VllmConfig` and
`KVTransferConfig` loading the connector by module path (a tiny local Llama config.json,
no weights, no network); vLLM's `Scheduler`, which builds the scheduler-side connector
with `KVConnectorFactory`; the worker-side connector that `ensure_kv_transfer_initialized`
builds with the factory and installs as the process's KV transfer agent; the KV cache
planned under a vLLM layout and allocated by `allocate_kv_cache` (LBHNC: a block's bytes
are contiguous and loads land in place; LBNHC, vLLM's default: they are not, so loads go
through the connector's staging copy), bound by `bind_kv_cache` and registered as the
GPU model runner does; every step through `KVConnectorModelRunnerMixin` (preemptions,
metadata, start_load_kv before the forward when the step has sync loads, wait_for_save,
load errors, stats, worker metadata) and, per layer in model order, the KV-cache write
then the attention call wrapped by vLLM's `maybe_transfer_kv_layer` (wait_for_layer_load
on entry, save_kv_layer on exit). The "model" writes a deterministic value per (layer,
token prefix) and its attention checks every position it reads, so loaded KV is checked
bit for bit when attention uses it. The prefill/decode hand-off runs the example as two
processes. Skipped, with the reason, where vLLM is not installed: see
wqs/integrations/README.md.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("vllm", reason="vllm (with torch) is not installed here; the engine "
                    "tests run in the integration venv: see wqs/integrations/README.md")
torch = pytest.importorskip("torch")

from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (  # noqa: E402
    KVConnectorLogging)

import wqs  # noqa: E402
from examples.vllm_pd_handoff import (BLOCK, LAYERS, LLAMA, MODEL_ID, CpuEngine,  # noqa: E402
                                      kv_value, prefix_crcs, prompt_of, vllm_config)
from tests.daemons import ROOT, daemon_factory  # noqa: E402,F401 (fixture import)
from wqs.integrations.vllm import (WQSConnector, WQSConnectorMetadata,  # noqa: E402
                                   WQSConnectorStats)
from wqs.integrations.vllm_ids import (chain_ids, chain_namespace, layer_block_id,  # noqa: E402
                                       marker_block_id, rank_tag)

EXAMPLE = ROOT / "examples" / "vllm_pd_handoff.py"
LAYOUTS = ["LBHNC", "LBNHC"]  # blocks contiguous (in place) / not (staging)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    (d / "config.json").write_text(json.dumps(LLAMA))
    return d


@pytest.fixture
def engines(model_dir):
    """make(role, servers, layout=..., num_blocks=..., prefix_caching=..., **extra) ->
    a CpuEngine; all closed after the test."""
    made: list[CpuEngine] = []

    def make(role: str, servers: list[str], layout: str = "LBNHC", num_blocks: int = 64,
             prefix_caching: bool = True, **extra) -> CpuEngine:
        config = vllm_config(model_dir, role, servers, layout, **extra)
        config.cache_config.enable_prefix_caching = prefix_caching
        made.append(CpuEngine(config, model_dir, num_blocks=num_blocks))
        return made[-1]

    yield make
    for e in made:
        e.close()


def chain_of(prompt: list[int], cache_salt: str | None = None) -> list[bytes]:
    return chain_ids(prompt, BLOCK, chain_namespace(MODEL_ID, BLOCK, "bfloat16",
                                                    cache_salt=cache_salt))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- building


def test_vllm_builds_both_connectors_with_its_factory(model_dir, daemon_factory, engines):
    d = daemon_factory()
    e = engines("kv_both", [d.address])
    config = e.config
    assert KVConnectorFactory.get_connector_class(config.kv_transfer_config) is WQSConnector
    assert isinstance(e.connector, WQSConnector) and e.connector.role is KVConnectorRole.SCHEDULER
    assert isinstance(e.worker, WQSConnector) and e.worker.role is KVConnectorRole.WORKER
    assert e.worker.client is e.connector.client  # one client per cluster per process
    assert e.worker.client.nodes == (d.address,)
    assert set(e.worker._kv_caches) == set(LAYERS)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vllm_allocates_the_kv_the_connector_registers(daemon_factory, engines, layout):
    """vLLM's own allocation: per-layer [blocks, heads, block, K and V] views of one
    buffer; under LBNHC a block's bytes are not contiguous."""
    e = engines("kv_both", [daemon_factory().address], layout=layout)
    kv = e.kv[LAYERS[0]]
    assert tuple(kv.shape) == (64, 2, BLOCK, 64) and kv.dtype == torch.bfloat16
    assert kv[0].is_contiguous() is (layout == "LBHNC")
    assert kv.untyped_storage().data_ptr() == e.kv[LAYERS[1]].untyped_storage().data_ptr()


# --------------------------------------------------------------------------- hand-off


def run_example(role: str, servers: list[str], *args: str) -> dict:
    out = subprocess.run([sys.executable, str(EXAMPLE), role, "--servers", ",".join(servers),
                          *args], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_prefill_and_decode_processes_hand_off_bit_exact(daemon_factory):
    """examples/vllm_pd_handoff.py as a user runs it: a kv_producer process (LBHNC)
    prefills 100 tokens in chunks and saves 6 full blocks; a kv_consumer process (LBNHC,
    so every block is staged) whose client lists the daemons in the other order loads
    96 tokens and computes 4; its attention saw the producer's KV at every position,
    and both sides' KV of the 96 tokens hash alike."""
    servers = [daemon_factory().address, daemon_factory().address]
    p = run_example("prefill", servers, "--layout", "LBHNC", "--tokens", "100")
    assert (p["saved_blocks"], p["save_failed"], p["attention_errors"]) == (6, 0, 0)
    d = run_example("decode", servers[::-1], "--layout", "LBNHC", "--tokens", "100")
    assert d["loaded_tokens"] == 96 and d["lookup_hit_blocks"] == 6
    assert (d["loaded_blocks"], d["load_errors"], d["attention_errors"]) == (6, 0, 0)
    assert d["staged_layer_blocks"] == 6 * len(LAYERS)
    assert d["kv_sha256"] == p["kv_sha256"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_consumer_loads_at_its_first_step_through_the_runner(daemon_factory, engines, layout):
    """In one process, engines taking turns: the loads of a consumer's first step run
    before its forward (has_sync_kv_loads), layer by layer; the stats reach vLLM's
    KVConnectorOutput and its connector logging."""
    nodes = [daemon_factory(), daemon_factory()]
    servers = [n.address for n in nodes]
    prompt = prompt_of(100)
    p = engines("kv_producer", servers, layout="LBHNC")
    p.add("prefill-1", prompt)
    p.run()
    assert p.worker.stats["saved_blocks"] == 6 and not p.attention_errors

    d = engines("kv_consumer", servers[::-1], layout=layout)
    d.add("decode-1", prompt)
    first = d.step()
    assert first.num_scheduled_tokens == {"decode-1": 4} and first.has_sync_kv_loads
    meta = first.kv_connector_metadata
    assert isinstance(meta, WQSConnectorMetadata)
    assert [len(s.block_ids) for s in meta.loads] == [6] and not meta.saves  # a consumer
    assert d.attention_errors == [] and d.wrong_positions("decode-1", prompt, 100) == []
    assert d.worker.stats["staged_layer_blocks"] == (12 if layout == "LBNHC" else 0)
    stats = d.outputs[0].kv_connector_stats
    assert isinstance(stats, WQSConnectorStats) and stats.data["loaded_blocks"] == 6
    logged: list[str] = []
    logging = KVConnectorLogging(d.config.kv_transfer_config)
    logging.observe(stats.data)
    logging.log(lambda fmt, *a: logged.append(fmt % a if a else fmt))
    assert any("loaded_blocks" in line for line in logged)
    assert d.connector.stats["lookup_hit_blocks"] == 6
    d.run()
    assert d.attention_errors == []
    # Both daemons are on this host: with transport auto (the default) every block moved
    # one-sided through shared memory, none inline through the socket.
    for n in nodes:
        counts = n.request_counts()
        assert counts["put_shm"] >= 1 and counts["get_shm"] >= 1, counts
        assert counts["put"] == counts["get"] == 0, counts

    # The documented layout: per chain position, one block per layer and a marker.
    chain = chain_of(prompt)
    with wqs.Client(servers) as client:
        assert client.lookup_prefix([marker_block_id(c, rank_tag()) for c in chain]) == 6
        layer0 = client.get(layer_block_id(chain[2], rank_tag(), LAYERS[0]))
    crcs = prefix_crcs(prompt)  # the block's [heads, tokens, K and V], in logical order
    want = torch.stack([kv_value(0, crcs[pos], pos) for pos in range(32, 48)], dim=1)
    assert bytes(layer0) == want.contiguous().view(torch.uint8).numpy().tobytes()


def test_layers_wait_for_their_own_load_in_hook_order(daemon_factory, engines):
    """vLLM's hook order per layer: wait_for_layer_load(layer) then save_kv_layer(layer);
    when layer 0 is waited for, layer 1's load may still be in flight (one get per layer)."""
    d = daemon_factory()
    prompt = prompt_of(48, seed=9)
    p = engines("kv_producer", [d.address])
    p.add("p", prompt)
    p.run()
    c = engines("kv_both", [d.address])
    calls: list[tuple] = []
    w = c.worker
    for name in ("bind_connector_metadata", "start_load_kv", "wait_for_layer_load",
                 "save_kv_layer", "wait_for_save", "get_block_ids_with_load_errors",
                 "get_kv_connector_stats", "build_connector_worker_meta",
                 "clear_connector_metadata", "handle_preemptions"):
        real = getattr(w, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            pending = tuple(w._load_futures)
            calls.append((_name, args[0] if _name.endswith("layer_load") or
                          _name == "save_kv_layer" else None, pending))
            return _real(*args, **kwargs)

        setattr(w, name, spy)
    c.add("c", prompt)
    c.step()
    names = [(n, layer) for n, layer, _ in calls]
    assert names == [("handle_preemptions", None), ("bind_connector_metadata", None),
                     ("start_load_kv", None),
                     ("wait_for_layer_load", LAYERS[0]), ("save_kv_layer", LAYERS[0]),
                     ("wait_for_layer_load", LAYERS[1]), ("save_kv_layer", LAYERS[1]),
                     ("wait_for_save", None), ("get_block_ids_with_load_errors", None),
                     ("get_kv_connector_stats", None), ("build_connector_worker_meta", None),
                     ("clear_connector_metadata", None)]
    assert calls[3][2] == tuple(LAYERS)  # both loads issued before layer 0 waits
    assert calls[5][2] == (LAYERS[1],)  # layer 1's still pending after layer 0 applied
    assert c.attention_errors == []


def test_kv_both_reuses_saves_and_cache_salt_isolates_tenants(daemon_factory, engines):
    d = daemon_factory()
    e = engines("kv_both", [d.address])
    prompt = prompt_of(80, seed=5)
    e.add("a", prompt)
    e.run()
    assert e.worker.stats["saved_blocks"] == 5

    other = engines("kv_both", [d.address])
    other.add("b", prompt)
    assert other.step().num_scheduled_tokens == {"b": 1}  # 79 = 80 - 1 cached
    assert other.wrong_positions("b", prompt, 80) == []
    other.run()
    assert other.worker.stats["saved_blocks"] == 0  # nothing new to store

    other.add("salted", prompt, cache_salt="tenant-2")
    assert other.step().num_scheduled_tokens == {"salted": 64}  # no hit across salts
    other.run()
    assert other.worker.stats["saved_blocks"] == 5  # stored again, under tenant-2's IDs

    third = engines("kv_consumer", [d.address], layout="LBHNC")
    third.add("same-tenant", prompt, cache_salt="tenant-2")
    assert third.step().num_scheduled_tokens == {"same-tenant": 1}
    assert third.wrong_positions("same-tenant", prompt, 80) == []
    third.run()
    third.add("other-tenant", prompt, cache_salt="tenant-3")
    assert third.step().num_scheduled_tokens == {"other-tenant": 64}
    third.run()

    renamed = engines("kv_consumer", [d.address], wqs_model_id="another-model")
    renamed.add("c", prompt)
    assert renamed.step().num_scheduled_tokens == {"c": 64}
    for engine in (e, other, third, renamed):
        assert engine.attention_errors == []


def test_block_ids_are_the_same_in_another_process():
    prompt = prompt_of(64)
    ns = chain_namespace("m", BLOCK, "bfloat16", 2, 1, cache_salt="s")
    ids = [layer_block_id(c, rank_tag(0, 1), LAYERS[1]).hex() for c in chain_ids(prompt, BLOCK, ns)]
    code = ("import json,sys; from wqs.integrations.vllm_ids import *;"
            "p=json.loads(sys.argv[1]); ns=chain_namespace('m',16,'bfloat16',2,1,cache_salt='s');"
            f"print(json.dumps([layer_block_id(c, rank_tag(0,1), {LAYERS[1]!r}).hex() "
            "for c in chain_ids(p,16,ns)]))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(prompt)], cwd=ROOT, check=True,
                         capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "7"})
    assert json.loads(out.stdout) == ids
    assert ns != chain_namespace("m", BLOCK, "bfloat16", 2, 1, cache_salt="s|x")


# --------------------------------------------------------------------------- preemption


def test_a_preempted_request_reloads_its_prompt_from_wqs(daemon_factory, engines):
    """12 KV blocks for two requests that grow to 8 blocks each: vLLM preempts one (its
    blocks are freed and reused by the other). With vLLM's own prefix cache off, the
    resumed request finds its prompt in WQS, loads it into its new blocks, and computes
    only what follows; every attention call reads exact KV."""
    d = daemon_factory()
    e = engines("kv_both", [d.address], num_blocks=12, prefix_caching=False)
    prompts = {"r1": prompt_of(80, seed=21), "r2": prompt_of(80, seed=22)}
    for rid, prompt in prompts.items():
        e.add(rid, prompt, max_tokens=40)
    steps = e.run(max_steps=200)
    preempted = set().union(*(s.preempted_req_ids or set() for s in steps))
    assert preempted, "the scenario must make vLLM preempt a request"
    assert e.worker.stats["saved_blocks"] == 10  # both prompts, once each
    assert e.worker.stats["loaded_blocks"] >= 5  # a resumed prompt came back from WQS
    assert e.connector.stats["lookup_hit_blocks"] >= 5
    assert e.worker.stats["load_errors"] == 0
    assert e.attention_errors == []
    assert not e.scheduler.requests  # both ran to completion


# --------------------------------------------------------------------------- failures


def test_unreachable_store_leaves_vllm_computing(model_dir, engines):
    """No WQS node answers: the engines start, lookups find nothing, saves are counted as
    failed, nothing raises into vLLM, the KV is exact, and a step waits at most about the
    client timeout (1 s) for the store."""
    down = [f"127.0.0.1:{closed_port()}", f"127.0.0.1:{closed_port()}"]
    e = engines("kv_both", down)
    prompt = prompt_of(50, seed=8)
    e.add("r", prompt, max_tokens=3)
    started = time.monotonic()
    first = e.step()
    assert first.num_scheduled_tokens == {"r": 50}  # no hit: all computed
    assert time.monotonic() - started < 10
    e.run()
    assert e.connector.stats["lookup_hit_blocks"] == 0
    assert e.worker.stats["saved_blocks"] == 0 and e.worker.stats["save_failed"] == 3
    assert e.attention_errors == []


def test_frozen_node_costs_a_step_the_client_timeout_not_more(daemon_factory, engines):
    """A node that accepts but never answers (SIGSTOP): the consumer's first step waits
    about the client timeout (1 s) per round trip for it, not forever; its blocks are
    misses or load errors, recomputed; the KV ends up exact."""
    nodes = [daemon_factory(), daemon_factory()]
    servers = [n.address for n in nodes]
    prompt = prompt_of(96, seed=12)
    p = engines("kv_producer", servers)
    p.add("p", prompt)
    p.run()
    assert p.worker.stats["saved_blocks"] == 6
    with wqs.Client(servers) as placement:
        markers = [placement.ring.nodes_for(marker_block_id(c, rank_tag()), 1)[0]
                   for c in chain_of(prompt)]
    frozen_at = next((i for i, m in enumerate(markers) if m == servers[1]), 6)
    nodes[1].signal_all(signal.SIGSTOP)
    try:
        c = engines("kv_consumer", servers)
        c.add("c", prompt, max_tokens=2)
        started = time.monotonic()
        c.step()
        assert time.monotonic() - started < 8  # lookup and loads: ~1 s each, not forever
        assert c.connector.stats["lookup_hit_blocks"] == frozen_at
        while c.scheduler.requests["c"].num_computed_tokens < len(prompt):
            c.step()
        assert c.wrong_positions("c", prompt, len(prompt)) == []
        c.run()
    finally:
        nodes[1].signal_all(signal.SIGCONT)


def test_dead_node_gives_shorter_hits_and_recomputed_load_errors(daemon_factory, engines):
    """Kill one of three nodes after the prefill: the decode side's lookup stops at the
    first marker it held; layer blocks it held that sit behind surviving markers fail to
    load, are reported to vLLM, recomputed -- and the final KV is exact. No call raises."""
    nodes = [daemon_factory() for _ in range(3)]
    servers = [n.address for n in nodes]
    prompt = prompt_of(160, seed=3)
    p = engines("kv_producer", servers)
    p.add("p", prompt)
    p.run()
    assert p.worker.stats["saved_blocks"] == 10

    chain = chain_of(prompt)
    with wqs.Client(servers) as placement:
        def home(bid):
            return placement.ring.nodes_for(bid, 1)[0]
        markers = [home(marker_block_id(c, rank_tag())) for c in chain]
        layer_homes = [{home(layer_block_id(c, rank_tag(), n)) for n in LAYERS} for c in chain]
    victim = next(n for n in servers if n != markers[0])  # chain position 0 still hits
    first_dead_marker = next((i for i, m in enumerate(markers) if m == victim), len(chain))
    next(n for n in nodes if n.address == victim).kill()

    d = engines("kv_consumer", servers[::-1])
    d.add("d", prompt, max_tokens=4)
    d.step()
    assert d.connector.stats["lookup_hit_blocks"] == first_dead_marker
    broken = {i for i in range(first_dead_marker) if victim in layer_homes[i]}
    blocks = d.scheduler.kv_cache_manager.get_block_ids("d")[0]
    errors = d.outputs[0].invalid_block_ids
    assert errors == {blocks[i] for i in broken}  # reported to vLLM
    # Attention read wrong KV only in the blocks reported (vLLM discards that work).
    assert {pos // BLOCK for _, _, pos in d.attention_errors} <= broken
    d.attention_errors.clear()
    while d.scheduler.requests["d"].num_computed_tokens < len(prompt):
        d.step()  # vLLM recomputes from the first failed block (policy: recompute)
    assert d.wrong_positions("d", prompt, len(prompt)) == []
    d.run()


def test_async_save_mode_drains_on_shutdown(daemon_factory, engines):
    d = daemon_factory()
    p = engines("kv_producer", [d.address], wqs_save="async", wqs_max_inflight_mib=1)
    prompt = prompt_of(64, seed=11)
    p.add("p", prompt)
    p.run()
    p.worker.shutdown()
    assert p.worker.stats["saved_blocks"] == 4
    c = engines("kv_consumer", [d.address])
    c.add("c", prompt)
    assert c.step().num_scheduled_tokens == {"c": 1}
    assert c.wrong_positions("c", prompt, 64) == [] and c.attention_errors == []


def test_evicted_layer_block_is_a_load_error_then_recomputed(daemon_factory, engines):
    """A chain position whose marker is there but one of its layer blocks is gone (evicted,
    or lost with a node) fails to load: the connector reports exactly that vLLM block,
    vLLM recomputes from it, and the KV ends up exact."""
    d = daemon_factory()
    prompt = prompt_of(100, seed=4)
    p = engines("kv_producer", [d.address])
    p.add("p", prompt)
    p.run()
    chain = chain_of(prompt)
    with wqs.Client([d.address]) as client:
        assert client.delete(layer_block_id(chain[3], rank_tag(), LAYERS[1]))

    c = engines("kv_consumer", [d.address])
    c.add("c", prompt, max_tokens=3)
    assert c.step().num_scheduled_tokens == {"c": 4}  # the lookup sees 6 markers
    blocks = c.scheduler.kv_cache_manager.get_block_ids("c")[0]
    assert c.outputs[0].invalid_block_ids == {blocks[3]}
    while c.scheduler.requests["c"].num_computed_tokens < len(prompt):
        c.step()
    assert c.computed_tokens >= 4 + (len(prompt) - 3 * BLOCK)  # recomputed from block 3
    assert c.wrong_positions("c", prompt, len(prompt)) == []
