"""The vLLM KV connector against the real `vllm` package, its real Scheduler, and real daemons.

On the CPU: vLLM's own `VllmConfig` (a tiny local Llama config.json, no weights, no
network), `KVTransferConfig` loading the connector by module path, vLLM's `Scheduler`
(which builds the scheduler-side connector itself) with its `Request`, `KVCacheBlocks`
and `SchedulerOutput` types, and a worker-side connector driven step by step the way
vLLM's model runner drives it (bind metadata, start_load_kv, per attention layer
wait_for_layer_load -> write this step's KV -> save_kv_layer, wait_for_save, load
errors back to the scheduler). The "model" writes a deterministic value per (layer,
token prefix) into vLLM-layout ``[blocks, heads, block_size, head_dim]`` CPU tensors, so
loaded blocks can be checked bit for bit. Skipped, with the reason, where vLLM is not
installed: see wqs/integrations/README.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib

import pytest

pytest.importorskip("vllm", reason="vllm (with torch) is not installed here; the engine "
                    "tests run in the integration venv: see wqs/integrations/README.md")
torch = pytest.importorskip("torch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vllm import SamplingParams  # noqa: E402
from vllm.config import (CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig,  # noqa: E402
                         SchedulerConfig, VllmConfig)
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig,  # noqa: E402
                                        KVCacheGroupSpec)
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

import wqs  # noqa: E402
from tests.daemons import ROOT, daemon_factory  # noqa: E402,F401 (fixture import)
from wqs.integrations.vllm import WQSConnector, WQSConnectorMetadata  # noqa: E402
from wqs.integrations.vllm_ids import (chain_ids, chain_namespace, layer_block_id,  # noqa: E402
                                       marker_block_id, rank_tag)

BLOCK = 16
LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
HEADS, HEAD_DIM, NUM_BLOCKS = 2, 32, 64
DTYPE = torch.bfloat16
EOS = 2

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
         "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": HEADS,
         "num_hidden_layers": len(LAYERS), "vocab_size": 1000,
         "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    (d / "config.json").write_text(json.dumps(LLAMA))
    return d


def vllm_config(model_dir, role: str, servers: list[str], **extra) -> VllmConfig:
    """What ``vllm serve --kv-transfer-config '{...}'`` builds, on the CPU."""
    kt = KVTransferConfig(
        kv_connector="WQSConnector", kv_connector_module_path="wqs.integrations.vllm",
        kv_role=role, kv_load_failure_policy="recompute",
        kv_connector_extra_config={"wqs_servers": ",".join(servers), "wqs_timeout_s": 1.0,
                                   **extra})
    return VllmConfig(
        model_config=ModelConfig(model=str(model_dir), dtype="bfloat16", seed=0,
                                 skip_tokenizer_init=True),
        scheduler_config=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64,
                                         max_model_len=1024, enable_chunked_prefill=True,
                                         is_encoder_decoder=False),
        cache_config=CacheConfig(block_size=BLOCK, gpu_memory_utilization=0.9,
                                 cache_dtype="auto", enable_prefix_caching=True),
        kv_transfer_config=kt, device_config=DeviceConfig("cpu"))


KV_CACHE_CONFIG = KVCacheConfig(
    num_blocks=NUM_BLOCKS, kv_cache_tensors=[],
    kv_cache_groups=[KVCacheGroupSpec(LAYERS, FullAttentionSpec(
        block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD_DIM, dtype=DTYPE))])


def kv_value(layer: int, tokens: list[int], pos: int) -> torch.Tensor:
    """The "model": KV of token `pos` in `layer`, a function of the prefix (as real KV is)."""
    seed = zlib.crc32(repr((layer, tokens[: pos + 1])).encode())
    return torch.randn(HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(seed)).to(DTYPE)


class Engine:
    """vLLM's Scheduler plus one worker, stepped like vLLM's model runner steps them."""

    def __init__(self, config: VllmConfig) -> None:
        config.cache_config.num_gpu_blocks = NUM_BLOCKS
        self.sched = Scheduler(vllm_config=config, kv_cache_config=KV_CACHE_CONFIG,
                               log_stats=True, block_size=BLOCK,
                               structured_output_manager=StructuredOutputManager(config))
        self.connector: WQSConnector = self.sched.connector  # built by vLLM's factory
        self.worker = WQSConnector(config, KVConnectorRole.WORKER, KV_CACHE_CONFIG)
        self.kv = {n: torch.zeros(NUM_BLOCKS, HEADS, BLOCK, HEAD_DIM, dtype=DTYPE)
                   for n in LAYERS}
        self.worker.register_kv_caches(self.kv)
        self.computed_tokens = 0  # tokens this engine computed itself
        self.load_errors: set[int] = set()

    def add(self, request_id: str, prompt: list[int], max_tokens: int = 2, **kw) -> None:
        sp = SamplingParams(max_tokens=max_tokens)
        sp.update_from_generation_config({}, EOS)
        self.sched.add_request(Request(request_id=request_id, prompt_token_ids=prompt,
                                       sampling_params=sp, pooling_params=None, **kw))

    def step(self):
        so = self.sched.schedule()
        w = self.worker
        w.bind_connector_metadata(so.kv_connector_metadata)
        w.start_load_kv(None)
        work = []
        sampled = []  # like vLLM: a token only for requests past their prefill
        for rid, n in so.num_scheduled_tokens.items():
            req = self.sched.requests[rid]
            work.append((list(req.all_token_ids), req.num_computed_tokens - n, n,
                         self.sched.kv_cache_manager.get_block_ids(rid)[0]))
            sampled.append([7] if req.num_computed_tokens >= req.num_tokens else [])
        for li, name in enumerate(LAYERS):
            w.wait_for_layer_load(name)  # attention layer li needs its loaded KV now
            for tokens, start, n, blocks in work:
                for pos in range(start, start + n):
                    self.kv[name][blocks[pos // BLOCK], :, pos % BLOCK] = kv_value(li, tokens,
                                                                                   pos)
            w.save_kv_layer(name, self.kv[name], None)
        w.wait_for_save()
        errors = w.get_block_ids_with_load_errors()
        self.load_errors |= errors
        w.clear_connector_metadata()
        self.computed_tokens += sum(n for _, _, n, _ in work)
        ids = list(so.num_scheduled_tokens)
        self.sched.update_from_output(so, ModelRunnerOutput(
            req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
            sampled_token_ids=sampled,
            kv_connector_output=KVConnectorOutput(invalid_block_ids=errors)))
        return so

    def run(self, max_steps: int = 50) -> list:
        outs = []
        while self.sched.has_requests():
            assert len(outs) < max_steps
            outs.append(self.step())
        return outs

    def assert_kv_matches(self, request_id: str, prompt: list[int], upto: int) -> None:
        blocks = self.sched.kv_cache_manager.get_block_ids(request_id)[0]
        for li, name in enumerate(LAYERS):
            for pos in range(upto):
                got = self.kv[name][blocks[pos // BLOCK], :, pos % BLOCK]
                assert torch.equal(got, kv_value(li, prompt, pos)), (name, pos)

    def close(self) -> None:
        self.worker.shutdown()
        self.connector.shutdown()


def prompt_of(n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [int(t) for t in torch.randint(3, 1000, (n,), generator=g)]


@pytest.fixture
def engines():
    made: list[Engine] = []

    def make(config: VllmConfig) -> Engine:
        made.append(Engine(config))
        return made[-1]

    yield make
    for e in made:
        e.close()


# --------------------------------------------------------------------------- tests


def test_vllm_builds_the_connector_from_kv_transfer_config(model_dir, daemon_factory):
    d = daemon_factory()
    config = vllm_config(model_dir, "kv_both", [d.address])
    cls = KVConnectorFactory.get_connector_class(config.kv_transfer_config)
    assert cls is WQSConnector
    conn = KVConnectorFactory.create_connector(config, KVConnectorRole.SCHEDULER,
                                               KV_CACHE_CONFIG)
    assert isinstance(conn, WQSConnector) and conn.client.nodes == (d.address,)
    conn.shutdown()


def test_prefill_saves_and_decode_on_other_node_order_loads_bit_exact(
        model_dir, daemon_factory, engines):
    """PD through WQS: a kv_producer prefills 100 tokens (chunked: 64 then 36); a
    kv_consumer whose client lists the daemons in the other order is told 96 tokens
    (6 full blocks) are cached, computes only the last 4, and holds the producer's KV
    bit for bit."""
    nodes = [daemon_factory(), daemon_factory()]
    servers = [n.address for n in nodes]
    prompt = prompt_of(100)

    p = engines(vllm_config(model_dir, "kv_producer", servers))
    p.add("prefill-1", prompt)
    p.run()
    assert p.worker.stats["saved_blocks"] == 6  # full blocks only, each once
    assert p.worker.stats["save_failed"] == 0
    assert p.computed_tokens >= 100

    d = engines(vllm_config(model_dir, "kv_consumer", servers[::-1]))
    d.add("decode-1", prompt)
    first = d.step()
    assert first.num_scheduled_tokens == {"decode-1": 4}  # 96 of 100 came from WQS
    meta = first.kv_connector_metadata
    assert isinstance(meta, WQSConnectorMetadata)
    assert [len(s.block_ids) for s in meta.loads] == [6] and not meta.saves  # consumer
    assert d.worker.stats["loaded_blocks"] == 6 and not d.load_errors
    d.assert_kv_matches("decode-1", prompt, 100)
    assert d.connector.stats["lookup_hit_blocks"] == 6
    d.run()

    # The documented layout: per chain position, one block per layer and a marker.
    ns = chain_namespace(str(model_dir), BLOCK, "bfloat16")
    chain = chain_ids(prompt, BLOCK, ns)
    assert len(chain) == 6
    with wqs.Client(servers) as client:
        assert client.lookup_prefix([marker_block_id(c, rank_tag()) for c in chain]) == 6
        layer0 = client.get(layer_block_id(chain[2], rank_tag(), LAYERS[0]))
    want = torch.stack([kv_value(0, prompt, pos) for pos in range(32, 48)], dim=1)
    assert bytes(layer0) == want.contiguous().view(torch.uint8).numpy().tobytes()


def test_kv_both_reuses_saves_and_cache_salt_isolates_tenants(model_dir, daemon_factory, engines):
    d = daemon_factory()
    e = engines(vllm_config(model_dir, "kv_both", [d.address]))
    prompt = prompt_of(80, seed=5)
    e.add("a", prompt)
    e.run()
    assert e.worker.stats["saved_blocks"] == 5

    other = engines(vllm_config(model_dir, "kv_both", [d.address]))
    other.add("b", prompt)
    assert other.step().num_scheduled_tokens == {"b": 1}  # 79 = 80 - 1 cached
    other.assert_kv_matches("b", prompt, 80)
    other.run()
    assert other.worker.stats["saved_blocks"] == 0  # nothing new to store

    other.add("salted", prompt, cache_salt="tenant-2")
    assert other.step().num_scheduled_tokens == {"salted": 64}  # no hit across salts
    other.run()
    assert other.worker.stats["saved_blocks"] == 5  # stored again, under tenant-2's IDs

    third = engines(vllm_config(model_dir, "kv_consumer", [d.address]))
    third.add("same-tenant", prompt, cache_salt="tenant-2")
    assert third.step().num_scheduled_tokens == {"same-tenant": 1}
    third.assert_kv_matches("same-tenant", prompt, 80)
    third.run()
    third.add("other-tenant", prompt, cache_salt="tenant-3")
    assert third.step().num_scheduled_tokens == {"other-tenant": 64}
    third.run()

    renamed = engines(vllm_config(model_dir, "kv_consumer", [d.address],
                                  wqs_model_id="another-model"))
    renamed.add("c", prompt)
    assert renamed.step().num_scheduled_tokens == {"c": 64}


def test_block_ids_are_the_same_in_another_process(model_dir):
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


def test_worker_loads_layer_by_layer(model_dir, daemon_factory, engines):
    """start_load_kv only issues one get per layer; each layer is applied on its own
    wait_for_layer_load, in layer order."""
    d = daemon_factory()
    p = engines(vllm_config(model_dir, "kv_producer", [d.address]))
    prompt = prompt_of(48, seed=9)
    p.add("p", prompt)
    p.run()
    c = engines(vllm_config(model_dir, "kv_consumer", [d.address]))
    c.add("c", prompt)
    so = c.sched.schedule()
    w = c.worker
    w.bind_connector_metadata(so.kv_connector_metadata)
    w.start_load_kv(None)
    assert list(w._load_futures) == LAYERS  # one in-flight load per layer, in order
    blocks = c.sched.kv_cache_manager.get_block_ids("c")[0]
    w._load_futures[LAYERS[0]].result()
    w.wait_for_layer_load(LAYERS[0])
    assert list(w._load_futures) == LAYERS[1:]
    assert torch.equal(c.kv[LAYERS[0]][blocks[1], :, 3], kv_value(0, prompt, 19))
    w.wait_for_layer_load(LAYERS[1])
    assert torch.equal(c.kv[LAYERS[1]][blocks[2], :, 15], kv_value(1, prompt, 47))
    w.wait_for_save()
    w.clear_connector_metadata()


def test_dead_node_gives_shorter_hits_and_recomputed_load_errors(
        model_dir, daemon_factory, engines):
    """Kill one of three nodes after the prefill: the decode side's lookup stops at the
    first marker it held; layer blocks it held that sit behind surviving markers fail to
    load, are reported to vLLM, recomputed -- and the final KV is still exact. No call
    raises."""
    nodes = [daemon_factory() for _ in range(3)]
    servers = [n.address for n in nodes]
    prompt = prompt_of(160, seed=3)
    p = engines(vllm_config(model_dir, "kv_producer", servers))
    p.add("p", prompt)
    p.run()
    assert p.worker.stats["saved_blocks"] == 10

    chain = chain_ids(prompt, BLOCK, chain_namespace(str(model_dir), BLOCK, "bfloat16"))
    with wqs.Client(servers) as placement:
        def home(bid):
            return placement.ring.nodes_for(bid, 1)[0]
        markers = [home(marker_block_id(c, rank_tag())) for c in chain]
        layer_homes = [{home(layer_block_id(c, rank_tag(), n)) for n in LAYERS} for c in chain]
    victim = next(n for n in servers if n != markers[0])  # chain position 0 still hits
    first_dead_marker = next((i for i, m in enumerate(markers) if m == victim), len(chain))
    next(n for n in nodes if n.address == victim).kill()

    d = engines(vllm_config(model_dir, "kv_consumer", servers[::-1]))
    d.add("d", prompt, max_tokens=4)
    d.step()
    assert d.connector.stats["lookup_hit_blocks"] == first_dead_marker
    broken = {i for i in range(first_dead_marker) if victim in layer_homes[i]}
    blocks = d.sched.kv_cache_manager.get_block_ids("d")[0]
    assert d.load_errors == {blocks[i] for i in broken}  # reported to vLLM
    while d.sched.requests["d"].num_computed_tokens < len(prompt):
        d.step()  # vLLM recomputes from the first failed block (policy: recompute)
    d.assert_kv_matches("d", prompt, len(prompt))
    d.run()


def test_async_save_mode_drains_on_shutdown(model_dir, daemon_factory, engines):
    d = daemon_factory()
    p = engines(vllm_config(model_dir, "kv_producer", [d.address], wqs_save="async",
                            wqs_max_inflight_mib=1))
    prompt = prompt_of(64, seed=11)
    p.add("p", prompt)
    p.run()
    p.worker.shutdown()
    assert p.worker.stats["saved_blocks"] == 4
    c = engines(vllm_config(model_dir, "kv_consumer", [d.address]))
    c.add("c", prompt)
    assert c.step().num_scheduled_tokens == {"c": 1}
    c.assert_kv_matches("c", prompt, 64)


def test_evicted_layer_block_is_a_load_error_then_recomputed(model_dir, daemon_factory,
                                                            engines):
    """A chain position whose marker is there but one of its layer blocks is gone (evicted,
    or lost with a node) fails to load: the connector reports exactly that vLLM block,
    vLLM recomputes from it, and the KV ends up exact."""
    d = daemon_factory()
    prompt = prompt_of(100, seed=4)
    p = engines(vllm_config(model_dir, "kv_producer", [d.address]))
    p.add("p", prompt)
    p.run()
    chain = chain_ids(prompt, BLOCK, chain_namespace(str(model_dir), BLOCK, "bfloat16"))
    with wqs.Client([d.address]) as client:
        assert client.delete(layer_block_id(chain[3], rank_tag(), LAYERS[1]))

    c = engines(vllm_config(model_dir, "kv_consumer", [d.address]))
    c.add("c", prompt, max_tokens=3)
    assert c.step().num_scheduled_tokens == {"c": 4}  # the lookup sees 6 markers
    blocks = c.sched.kv_cache_manager.get_block_ids("c")[0]
    assert c.load_errors == {blocks[3]}
    while c.sched.requests["c"].num_computed_tokens < len(prompt):
        c.step()
    assert c.computed_tokens >= 4 + (len(prompt) - 3 * BLOCK)  # recomputed from block 3
    c.assert_kv_matches("c", prompt, len(prompt))
