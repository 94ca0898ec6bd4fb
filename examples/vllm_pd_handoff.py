#!/usr/bin/env python3
"""Prefill -> decode hand-off through WQS along vLLM's own KV-connector paths, on the CPU.

    wqsd --data-dir /tmp/wqs &          # a daemon on 127.0.0.1:7070 (or any WQS cluster)
    python examples/vllm_pd_handoff.py prefill --servers 127.0.0.1:7070
    python examples/vllm_pd_handoff.py decode  --servers 127.0.0.1:7070

The prefill process is a vLLM ``kv_producer``, the decode process a ``kv_consumer``, both
configured as ``vllm serve --kv-transfer-config`` would be (``kv_connector: WQSConnector``,
``kv_connector_module_path: wqs.integrations.vllm``). What runs is vLLM's code: its
Scheduler (which builds the scheduler-side connector with KVConnectorFactory), the
worker-side connector that ``ensure_kv_transfer_initialized`` installs as the process's
KV transfer agent, the KV cache planned under a KV-cache layout and allocated by
``allocate_kv_cache`` (``--layout LBNHC``, vLLM's default, keeps a block's bytes apart in
memory, so loads go through the connector's staging copy; ``LBHNC`` receives in place),
every step through ``KVConnectorModelRunnerMixin`` and, per attention layer in model
order, vLLM's ``maybe_transfer_kv_layer`` hook around the attention call.

What does not run is a model: the "attention" of layer l writes, for each new token, a
value that is a function of (l, the token prefix) as real KV is, and checks the KV of
every position it attends to. So the decode side proves, at the moment attention reads
it, that the prefix KV it loaded from WQS is the prefill side's, bit for bit; both sides
also print the SHA-256 of that KV. Needs vllm 0.33 and torch (CPU is enough): the
integration environment of wqs/integrations/README.md. `CpuEngine` is what
tests/test_integration_vllm.py drives too.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is a local config.json

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.config import (CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig,  # noqa: E402
                         SchedulerConfig, VllmConfig)
from vllm.distributed import kv_transfer  # noqa: E402
from vllm.distributed.kv_transfer import kv_transfer_state  # noqa: E402
from vllm.distributed.kv_transfer.kv_transfer_state import (  # noqa: E402
    ensure_kv_transfer_initialized)
from vllm.forward_context import set_forward_context  # noqa: E402
from vllm.model_executor.layers.attention.attention import get_attention_context  # noqa: E402
from vllm.model_executor.layers.attention.kv_transfer_utils import (  # noqa: E402
    maybe_transfer_kv_layer)
from vllm.v1.core.kv_cache_planning import get_kv_cache_config_from_groups  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec  # noqa: E402
from vllm.v1.kv_cache_layout import KVCacheLayout  # noqa: E402
from vllm.v1.outputs import ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402
from vllm.v1.worker.kv_connector_model_runner_mixin import (  # noqa: E402
    KVConnectorModelRunnerMixin)
from vllm.v1.worker.utils import allocate_kv_cache, bind_kv_cache  # noqa: E402

BLOCK = 16  # tokens per vLLM block
LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
HEADS, HEAD_DIM = 2, 32
CONTENT = 2 * HEAD_DIM  # vLLM's per-layer view is [blocks, heads, block, K and V]
DTYPE = torch.bfloat16
EOS = 2
MODEL_ID = "tiny-llama"  # wqs_model_id: both sides must agree (their model dirs differ)
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
         "intermediate_size": 128, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
         "num_hidden_layers": len(LAYERS), "vocab_size": 1000,
         "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16"}


# --------------------------------------------------------------------------- the "model"


_KV_MEMO: dict[tuple[int, int, int], torch.Tensor] = {}


def kv_value(layer: int, prefix_crc: int, pos: int) -> torch.Tensor:
    """KV of token `pos` in `layer`: [heads, K and V], a function of the token prefix
    (given as its running CRC) as real KV is."""
    key = (layer, prefix_crc, pos)
    if key not in _KV_MEMO:
        g = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
        _KV_MEMO[key] = torch.randn(HEADS, CONTENT, generator=g).to(DTYPE)
    return _KV_MEMO[key]


def prefix_crcs(tokens: list[int]) -> list[int]:
    out, crc = [], 0
    for t in tokens:
        crc = zlib.crc32(t.to_bytes(4, "little"), crc)
        out.append(crc)
    return out


def prompt_of(n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [int(t) for t in torch.randint(3, 1000, (n,), generator=g)]


@dataclass
class Work:
    """One request's share of a step: what a model runner's batch tells attention."""

    req_id: str
    crcs: list[int]  # running CRC of the token prefix, per position
    start: int  # first position computed this step
    count: int  # positions computed this step
    blocks: list[int]  # the request's vLLM block IDs


@dataclass
class StepMetadata:
    """This test's attention metadata (vLLM's is backend-specific): the step's work."""

    work: list[Work]


class Layer:
    """What vLLM binds a layer's KV-cache view to (`bind_kv_cache`) and the forward
    context holds; its "attention" checks every position it attends to."""

    def __init__(self, engine: "CpuEngine", index: int, name: str) -> None:
        self.engine, self.index, self.name = engine, index, name
        self.kv_cache: torch.Tensor | None = None

    def bind_kv_cache(self, kv_cache: torch.Tensor) -> None:
        self.kv_cache = kv_cache

    def write_new_kv(self, work: list[Work]) -> None:
        """This step's new tokens into their slots (what unified_kv_cache_update does)."""
        assert self.kv_cache is not None
        for w in work:
            for pos in range(w.start, w.start + w.count):
                self.kv_cache[w.blocks[pos // BLOCK], :, pos % BLOCK] = kv_value(
                    self.index, w.crcs[pos], pos)

    def attend(self, kv_cache: torch.Tensor, md: StepMetadata) -> None:
        """Read the KV of every position up to the step's last one; record the wrong ones."""
        for w in md.work:
            end = w.start + w.count
            blk = torch.tensor([w.blocks[p // BLOCK] for p in range(end)])
            off = torch.tensor([p % BLOCK for p in range(end)])
            got = kv_cache[blk, :, off]
            want = torch.stack([kv_value(self.index, w.crcs[p], p) for p in range(end)])
            bad = (got != want).flatten(1).any(1).nonzero().flatten().tolist()
            self.engine.attention_errors.extend((w.req_id, self.name, p) for p in bad)


@maybe_transfer_kv_layer
def attention(query: Any, layer_name: str) -> None:
    """The attention call of a layer, wrapped as vLLM wraps unified_attention_with_output:
    on entry the connector's wait_for_layer_load(layer), on exit its save_kv_layer."""
    attn_metadata, layer, kv_cache, _ = get_attention_context(layer_name)
    layer.attend(kv_cache, attn_metadata)


# --------------------------------------------------------------------------- the engine


def init_distributed(config: VllmConfig, workdir: Path) -> None:
    """vLLM's process groups for one worker (gloo, world size 1), as a CPU worker has."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed.parallel_state import (init_distributed_environment,
                                                 initialize_model_parallel,
                                                 model_parallel_is_initialized)

    if model_parallel_is_initialized():
        return
    with set_current_vllm_config(config):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"file://{workdir}/dist-init")
        initialize_model_parallel(1, 1)


def vllm_config(model_dir: Path, role: str, servers: list[str], layout: str = "LBNHC",
                **extra: Any) -> VllmConfig:
    """What ``vllm serve --kv-transfer-config '{...}'`` builds, on the CPU."""
    kt = KVTransferConfig(
        kv_connector="WQSConnector", kv_connector_module_path="wqs.integrations.vllm",
        kv_role=role, kv_load_failure_policy="recompute",
        kv_connector_extra_config={"wqs_servers": ",".join(servers), "wqs_timeout_s": 1.0,
                                   "wqs_model_id": MODEL_ID, **extra})
    config = VllmConfig(
        model_config=ModelConfig(model=str(model_dir), dtype="bfloat16", seed=0,
                                 skip_tokenizer_init=True),
        scheduler_config=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64,
                                         max_model_len=1024, enable_chunked_prefill=True,
                                         is_encoder_decoder=False),
        cache_config=CacheConfig(block_size=BLOCK, cache_dtype="auto",
                                 enable_prefix_caching=True),
        kv_transfer_config=kt, device_config=DeviceConfig("cpu"))
    config.cache_config.kv_cache_layout = layout  # what the engine core resolves
    return config


class CpuEngine:
    """vLLM's scheduler and one worker in this process, stepped as vLLM's engine core and
    GPU model runner step them; the model is `Layer`. One engine's worker connector is
    the process's KV transfer agent while it steps (`active`), so several can take turns."""

    def __init__(self, config: VllmConfig, workdir: Path, num_blocks: int = 64) -> None:
        init_distributed(config, workdir)
        self.config = config
        spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD_DIM,
                                 dtype=DTYPE)
        groups = [KVCacheGroupSpec(list(LAYERS), spec)]
        self.kv_cache_config = get_kv_cache_config_from_groups(
            config, groups, num_blocks * len(LAYERS) * spec.page_size_bytes)
        assert self.kv_cache_config.num_blocks == num_blocks
        config.cache_config.num_gpu_blocks = num_blocks
        self.scheduler = Scheduler(vllm_config=config, kv_cache_config=self.kv_cache_config,
                                   log_stats=True, block_size=BLOCK,
                                   structured_output_manager=StructuredOutputManager(config))
        self.connector = self.scheduler.connector  # scheduler side, made by vLLM's factory
        with self.active(None):  # as the GPU worker does in initialize_from_config
            ensure_kv_transfer_initialized(config, self.kv_cache_config)
            self.worker = kv_transfer_state._KV_CONNECTOR_AGENT
        # As GPUModelRunner.initialize_kv_cache: allocate, bind to the layers, register.
        layout = config.cache_config.get_resolved_kv_cache_layout()
        self.kv = allocate_kv_cache(self.kv_cache_config, torch.device("cpu"), layout)
        self.layers = {name: Layer(self, i, name) for i, name in enumerate(LAYERS)}
        config.compilation_config.static_forward_context.update(self.layers)
        self.runner_kv_caches: list[torch.Tensor] = []
        bind_kv_cache(self.kv, config.compilation_config.static_forward_context,
                      self.runner_kv_caches, kv_cache_groups=self.kv_cache_config.kv_cache_groups)
        self.worker.register_kv_caches(self.kv)
        self.attention_errors: list[tuple[str, str, int]] = []  # (request, layer, position)
        self.computed_tokens = 0  # positions this engine computed itself
        self.outputs: list[Any] = []  # every step's KVConnectorOutput

    @contextlib.contextmanager
    def active(self, agent: Any = "self") -> Iterator[None]:
        saved = kv_transfer_state._KV_CONNECTOR_AGENT
        kv_transfer_state._KV_CONNECTOR_AGENT = self.worker if agent == "self" else agent
        try:
            yield
        finally:
            kv_transfer_state._KV_CONNECTOR_AGENT = saved

    def add(self, request_id: str, prompt: list[int], max_tokens: int = 2, **kw: Any) -> None:
        sp = SamplingParams(max_tokens=max_tokens)
        sp.update_from_generation_config({}, EOS)
        self.scheduler.add_request(Request(request_id=request_id, prompt_token_ids=prompt,
                                           sampling_params=sp, pooling_params=None, **kw))

    def step(self) -> Any:
        """One engine-core step: schedule, execute as GPUModelRunner.execute_model does,
        update the scheduler from the output. Returns the SchedulerOutput."""
        so = self.scheduler.schedule()
        work, sampled = [], []
        for rid, n in so.num_scheduled_tokens.items():
            req = self.scheduler.requests[rid]
            blocks = list(self.scheduler.kv_cache_manager.get_block_ids(rid)[0])
            work.append(Work(rid, prefix_crcs(list(req.all_token_ids)),
                             req.num_computed_tokens - n, n, blocks))
            # A token is sampled only for requests whose prompt is all computed.
            sampled.append([7] if req.num_computed_tokens >= req.num_tokens else [])
        with self.active():
            kv_transfer.get_kv_transfer_group().handle_preemptions(so.kv_connector_metadata)
            if not so.total_num_scheduled_tokens:
                out = KVConnectorModelRunnerMixin.kv_connector_no_forward(so, self.config)
                kv_output = out.kv_connector_output
            else:
                md = {name: StepMetadata(work) for name in LAYERS}
                slots = {name: torch.zeros(0, dtype=torch.long) for name in LAYERS}
                with (set_forward_context(md, self.config, slot_mapping=slots),
                      KVConnectorModelRunnerMixin.maybe_get_kv_connector_output(so)
                      as kv_output):
                    for name, layer in self.layers.items():  # the model's layers in order
                        layer.write_new_kv(work)
                        attention(None, name)
        self.outputs.append(kv_output)
        self.computed_tokens += sum(w.count for w in work)
        ids = list(so.num_scheduled_tokens)
        self.scheduler.update_from_output(so, ModelRunnerOutput(
            req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
            sampled_token_ids=sampled, kv_connector_output=kv_output))
        return so

    def run(self, max_steps: int = 100) -> list[Any]:
        steps = []
        while self.scheduler.has_requests():
            assert len(steps) < max_steps, "the scheduler does not finish"
            steps.append(self.step())
        return steps

    def kv_of(self, request_id: str, upto: int) -> torch.Tensor:
        """[layers, positions, heads, K and V] of a running request, in logical order."""
        blocks = self.scheduler.kv_cache_manager.get_block_ids(request_id)[0]
        blk = torch.tensor([blocks[p // BLOCK] for p in range(upto)])
        off = torch.tensor([p % BLOCK for p in range(upto)])
        return torch.stack([self.kv[name][blk, :, off] for name in LAYERS])

    def wrong_positions(self, request_id: str, prompt: list[int], upto: int) -> list[int]:
        """Positions below `upto` whose KV (any layer) is not the model's."""
        crcs = prefix_crcs(prompt)
        want = torch.stack([torch.stack([kv_value(li, crcs[p], p) for p in range(upto)])
                            for li in range(len(LAYERS))])
        bad = (self.kv_of(request_id, upto) != want).transpose(0, 1).flatten(1).any(1)
        return bad.nonzero().flatten().tolist()

    def close(self) -> None:
        self.worker.shutdown()
        self.connector.shutdown()
        for name in LAYERS:
            self.config.compilation_config.static_forward_context.pop(name, None)


# --------------------------------------------------------------------------- the two sides


def kv_digest(kv: torch.Tensor) -> str:
    return hashlib.sha256(kv.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def run_side(role: str, servers: list[str], tokens: int, seed: int, layout: str) -> dict:
    prompt = prompt_of(tokens, seed)
    full = tokens // BLOCK * BLOCK  # what is handed off: the prompt's full blocks
    with tempfile.TemporaryDirectory(prefix="wqs-vllm-") as tmp:
        workdir = Path(tmp)
        (workdir / "config.json").write_text(json.dumps(LLAMA))
        kv_role = "kv_producer" if role == "prefill" else "kv_consumer"
        engine = CpuEngine(vllm_config(workdir, kv_role, servers, layout), workdir)
        try:
            engine.add("req-1", prompt, max_tokens=4)
            first = engine.step()
            while engine.scheduler.requests["req-1"].num_computed_tokens < tokens:
                engine.step()  # the prefill side computes the prompt in chunks
            kv = engine.kv_of("req-1", full)  # before the request finishes and frees it
            engine.run()
            report = {"role": role, "layout": layout, "tokens": tokens,
                      "kv_sha256": kv_digest(kv), "attention_errors": len(engine.attention_errors),
                      "computed_tokens": engine.computed_tokens}
            stats = engine.worker.stats
            if role == "prefill":
                report.update(saved_blocks=stats["saved_blocks"], save_failed=stats["save_failed"])
            else:
                report.update(loaded_tokens=tokens - first.num_scheduled_tokens["req-1"],
                              lookup_hit_blocks=engine.connector.stats["lookup_hit_blocks"],
                              loaded_blocks=stats["loaded_blocks"],
                              load_errors=stats["load_errors"],
                              staged_layer_blocks=stats["staged_layer_blocks"])
        finally:
            engine.close()
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("role", choices=["prefill", "decode"])
    ap.add_argument("--servers", required=True, help="host:port,... of the WQS cluster")
    ap.add_argument("--tokens", type=int, default=100, help="prompt length (default 100)")
    ap.add_argument("--seed", type=int, default=1, help="the prompt's tokens (default 1)")
    ap.add_argument("--layout", default="LBNHC", choices=[m.name for m in KVCacheLayout],
                    help="vLLM KV-cache layout of this side (default LBNHC, vLLM's default)")
    args = ap.parse_args(argv)
    servers = [s for s in args.servers.split(",") if s]
    report = run_side(args.role, servers, args.tokens, args.seed, args.layout)
    print(json.dumps(report))
    full = args.tokens // BLOCK
    if args.role == "prefill":
        ok = report["saved_blocks"] == full and report["attention_errors"] == 0
        print(f"prefill: {report['saved_blocks']}/{full} blocks of {len(LAYERS)} layers saved "
              f"to WQS; KV sha256 {report['kv_sha256'][:16]}", file=sys.stderr)
    else:
        ok = (report["loaded_blocks"] == full and report["load_errors"] == 0
              and report["attention_errors"] == 0)
        print(f"decode: {report['loaded_tokens']} of {args.tokens} prompt tokens loaded from "
              f"WQS ({report['loaded_blocks']} blocks), attention saw the expected KV at every "
              f"position: {'yes' if report['attention_errors'] == 0 else 'NO'}; KV sha256 "
              f"{report['kv_sha256'][:16]}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
