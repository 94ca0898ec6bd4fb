"""KV-cache workloads: model shapes, a seeded multi-turn conversation generator, and the
``--workload=prefix`` replay.

Model shapes
------------
KV bytes per token = layers x (per-layer KV width) x dtype bytes, where the per-layer
width is ``2 x kv_heads x head_dim`` (K and V) for multi-head / grouped-query attention
and ``kv_lora_rank + qk_rope_head_dim`` (one compressed latent) for DeepSeek's MLA:

=================  ======  ========  ========  =====================  ============
model              layers  kv_heads  head_dim  per-layer width        bf16 / token
=================  ======  ========  ========  =====================  ============
llama-3-8b         32      8         128       2x8x128 = 2048         128 KiB
llama-3-70b        80      8         128       2048                   320 KiB
llama-3.1-405b     126     8         128       2048                   504 KiB
mistral-7b         32      8         128       2048                   128 KiB
qwen2.5-7b         28      4         128       1024                   56 KiB
qwen2.5-72b        80      8         128       2048                   320 KiB
deepseek-v2-lite   27      MLA       -         512 + 64 = 576         30.4 KiB
deepseek-v3        61      MLA       -         576                    68.6 KiB
=================  ======  ========  ========  =====================  ============

``--kv_dtype`` (bf16, fp16, fp8, int8, fp32) scales it; ``--kv_bytes_per_token``
overrides it. A block is ``--block_tokens`` tokens (default 16, vLLM's block size;
LMCache uses 256-token chunks), so a llama-3-8b block is 2 MiB in bf16.

Conversations (ShareGPT-like, seeded)
-------------------------------------
Chat logs such as ShareGPT have many short conversations and a long tail of long ones,
short user turns and longer answers. The generator draws, from
``numpy.random.default_rng((seed, job clone, conversation number))``:

* turns per conversation: geometric with p=0.3 (trials to the first success), capped
  at 32: mean 3.3, median 2, 30 % single-turn, ~4 % with 10 turns or more;
* user message tokens per turn: log-normal, median 64, sigma 1.1, clipped to
  [4, 4096] (mean ~117; 10 % above ~260);
* answer tokens per turn: log-normal, median 160, sigma 0.8, clipped to [8, 2048]
  (mean ~220);
* token IDs uniform over a 128,256-token vocabulary (llama-3's), so two conversations
  share nothing unless ``--system_prompt_tokens=N`` puts the same N-token system prompt
  in front of every one of them (as chat services do).

Turn *t*'s prompt is the system prompt, every earlier user message and answer, then
the new user message: each prompt extends the previous one, so its leading blocks are
the previous turn's.

The replay
----------
Each of ``iodepth`` streams per job clone replays its share of ``--conversations``
conversations, turn after turn, as an inference engine with a KV-cache tier would:

1. chain the prompt's full blocks into IDs (`wqs.prefix_block_ids`, namespace = model);
2. ``lookup_prefix``: how many leading blocks are stored (one round trip);
3. ``get`` those hits into buffers (in calls of at most 16 MiB); a hit that no longer
   loads (evicted between lookup and get) ends the prefix there ("lost hit");
4. ``put`` the prompt's remaining full blocks (the engine computed their KV in prefill);
5. with ``--save_decode``, also put the full blocks the answer completes (LMCache's
   ``save_decode_cache``); by default only prompt blocks are stored.

Reported: the hit rate by tokens and by blocks, the KV bytes loaded instead of
recomputed versus the bytes recomputed (the misses and every prompt's partial tail
block), bytes stored, and the latency of lookup, of loading a turn's hits (read) and of
storing its misses (write), one sample per turn.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

VOCAB = 128_256
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "fp32": 4}
MAX_CALL_BYTES = 16 << 20
TURNS_P = 0.3
MAX_TURNS = 32
USER_MEDIAN, USER_SIGMA, USER_CLIP = 64, 1.1, (4, 4096)
ANSWER_MEDIAN, ANSWER_SIGMA, ANSWER_CLIP = 160, 0.8, (8, 2048)


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    kv_heads: int = 0
    head_dim: int = 0
    mla_width: int = 0  # kv_lora_rank + qk_rope_head_dim for MLA models

    def kv_bytes_per_token(self, dtype: str = "bf16") -> int:
        width = self.mla_width if self.mla_width else 2 * self.kv_heads * self.head_dim
        return self.layers * width * DTYPE_BYTES[dtype]

    @property
    def attention(self) -> str:
        return "MLA" if self.mla_width else "GQA"


MODELS = {m.name: m for m in (
    ModelShape("llama-3-8b", 32, 8, 128),
    ModelShape("llama-3-70b", 80, 8, 128),
    ModelShape("llama-3.1-405b", 126, 8, 128),
    ModelShape("mistral-7b", 32, 8, 128),
    ModelShape("qwen2.5-7b", 28, 4, 128),
    ModelShape("qwen2.5-72b", 80, 8, 128),
    ModelShape("deepseek-v2-lite", 27, mla_width=512 + 64),
    ModelShape("deepseek-v3", 61, mla_width=512 + 64),
)}
_ALIASES = {"llama-3.1-8b": "llama-3-8b", "llama3-8b": "llama-3-8b",
            "llama-3.1-70b": "llama-3-70b", "llama3-70b": "llama-3-70b",
            "deepseek-r1": "deepseek-v3", "deepseek-v3-mla": "deepseek-v3",
            "mistral-7b-v0.1": "mistral-7b"}


def model_shape(name: str) -> ModelShape:
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)} "
                         "(or give --kv_bytes_per_token)")
    return MODELS[key]


# ----------------------------------------------------------------------- conversations


@dataclass
class Conversation:
    system: np.ndarray
    users: list[np.ndarray]
    answers: list[np.ndarray]

    @property
    def turns(self) -> int:
        return len(self.users)

    def prompt(self, t: int) -> np.ndarray:
        """Turn t's prompt: system, every earlier exchange, then user message t."""
        parts = [self.system]
        for i in range(t):
            parts += [self.users[i], self.answers[i]]
        parts.append(self.users[t])
        return np.concatenate(parts)

    def with_answer(self, t: int) -> np.ndarray:
        return np.concatenate([self.prompt(t), self.answers[t]])


def _lognormal(rng: np.random.Generator, median: float, sigma: float, clip: tuple[int, int]) -> int:
    return int(np.clip(round(rng.lognormal(np.log(median), sigma)), *clip))


def system_prompt(seed: int, tokens: int) -> np.ndarray:
    rng = np.random.default_rng((seed, 0xC0FFEE))
    return rng.integers(0, VOCAB, tokens, dtype=np.int32)


def make_conversation(seed: int, clone: int, number: int, system: np.ndarray) -> Conversation:
    rng = np.random.default_rng((seed, clone, number))
    turns = min(int(rng.geometric(TURNS_P)), MAX_TURNS)
    users, answers = [], []
    for _ in range(turns):
        users.append(rng.integers(0, VOCAB, _lognormal(rng, USER_MEDIAN, USER_SIGMA, USER_CLIP),
                                  dtype=np.int32))
        answers.append(rng.integers(0, VOCAB, _lognormal(rng, ANSWER_MEDIAN, ANSWER_SIGMA,
                                                         ANSWER_CLIP), dtype=np.int32))
    return Conversation(system, users, answers)


# ----------------------------------------------------------------------------- replay


class PrefixStats:
    """Counters of one job clone, shared by its streams (under a lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.c: dict[str, int] = {k: 0 for k in (
            "conversations", "turns", "prompt_tokens", "hit_tokens", "lookup_blocks",
            "hit_blocks", "lost_hits", "bytes_loaded", "bytes_recomputed", "bytes_stored",
            "stored_blocks", "failed_puts")}

    def add(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                self.c[k] += v


def replay_stream(ctx: Any, clone: Any, stream: int, rec: Any) -> None:
    """One stream of a prefix job: conversations stream, stream+iodepth, ... in turn.

    ctx: the run (deadline, stop flag); clone: the job clone (engine, spec, stats);
    rec: the stream's recorder (read = loads, write = stores, extra 'lookup').
    """
    from wqs.ids import prefix_block_ids

    from .blocks import check, content

    spec = clone.spec
    engine = clone.engine
    B = spec.block_tokens
    block_bytes = clone.block_bytes
    per_call = max(1, MAX_CALL_BYTES // block_bytes)
    outs = [bytearray(block_bytes) for _ in range(per_call)]
    payload = memoryview(clone.payload)
    ns = clone.namespace
    stats: PrefixStats = clone.kv
    clock = time.perf_counter_ns
    number = stream
    while number < spec.conversations and not ctx.should_stop(clone):
        conv = make_conversation(spec.seed, clone.index, number, clone.system)
        number += spec.iodepth
        stats.add(conversations=1)
        for t in range(conv.turns):
            if ctx.should_stop(clone):
                return
            prompt = conv.prompt(t)
            ids = prefix_block_ids(prompt, B, namespace=ns)
            t0 = clock()
            hits = engine.lookup_prefix(ids) if ids else 0
            t1 = clock()
            rec.extra("lookup", t1 - t0, t0)
            # load the hits
            valid = 0
            load_ns = 0
            first = 0
            while first < hits:
                chunk = ids[first:min(hits, first + per_call)]
                t2 = clock()
                got = engine.get(chunk, outs[: len(chunk)])
                load_ns += clock() - t2
                stop = False
                for k, n in enumerate(got):
                    bad = n is None or n != block_bytes
                    if not bad and spec.verify:
                        bad = check(chunk[k], memoryview(outs[k])[:n]) is not None
                        if bad:
                            clone.note_verify(f"verify: block {chunk[k].hex()} of a prefix "
                                              "chain came back wrong")
                    if bad:
                        stop = True
                        break
                    if spec.verify:
                        clone.note(verified=1)
                    valid += 1
                if stop:
                    break
                first += len(chunk)
            if hits:
                rec.record(0, load_ns, t1, valid * block_bytes)
            lost = hits - valid
            # store what prefill computed
            todo = ids[valid:]
            store_ns, stored, failed = _store(engine, todo, block_bytes, payload, spec, per_call,
                                              clock, content)
            if spec.save_decode:
                full = prefix_block_ids(conv.with_answer(t), B, namespace=ns)
                extra = full[len(ids):]
                ns2, s2, f2 = _store(engine, extra, block_bytes, payload, spec, per_call, clock,
                                     content)
                store_ns += ns2
                stored += s2
                failed += f2
            if stored or failed:
                rec.record(1, store_ns, t1, stored * block_bytes)
            stats.add(turns=1, prompt_tokens=len(prompt), hit_tokens=valid * B,
                      lookup_blocks=len(ids), hit_blocks=valid, lost_hits=lost,
                      bytes_loaded=valid * block_bytes,
                      bytes_recomputed=(len(prompt) - valid * B) * clone.kv_per_token,
                      bytes_stored=stored * block_bytes, stored_blocks=stored,
                      failed_puts=failed)


def _store(engine: Any, ids: list[bytes], block_bytes: int, payload: memoryview, spec: Any,
           per_call: int, clock: Any, content: Any) -> tuple[int, int, int]:
    spent = stored = failed = 0
    for first in range(0, len(ids), per_call):
        chunk = ids[first:first + per_call]
        bufs = [content(b, block_bytes) for b in chunk] if spec.verify else [payload] * len(chunk)
        t = clock()
        ok = engine.put(chunk, bufs)
        spent += clock() - t
        good = sum(1 for x in ok if x)
        stored += good
        failed += len(chunk) - good
    return spent, stored, failed


def summary(clone: Any) -> dict[str, Any]:
    from .report import finish_kvcache

    spec = clone.spec
    kv: dict[str, Any] = dict(clone.kv.c)
    kv.update({"model": clone.model_name, "attention": clone.attention,
               "kv_dtype": spec.kv_dtype, "kv_bytes_per_token": clone.kv_per_token,
               "block_tokens": spec.block_tokens, "block_bytes": clone.block_bytes,
               "system_prompt_tokens": spec.system_prompt_tokens,
               "save_decode": spec.save_decode, "seed": spec.seed})
    finish_kvcache(kv)
    return kv
