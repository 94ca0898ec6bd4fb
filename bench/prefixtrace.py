"""Multi-turn chat traces and the prefix-cache hit rates of FIFO, LRU and Belady's MIN.

The trace
---------
A seeded, time-ordered list of requests from ``conversations`` chat conversations of
``apps`` applications. Every parameter is a field of `TraceParams`; the defaults are:

* apps: 4, each with a system prompt of ``system_tokens`` = 300..3,000 tokens (drawn
  uniformly per app from ``numpy.random.default_rng((seed, "apps"))``), and a share
  of the conversations falling as 1/rank (48 %, 24 %, 16 %, 12 %);
* conversations arrive as a Poisson process of ``arrival_rate`` = 1 per second;
* turns per conversation, user and answer lengths: `bench.kvcache`'s ShareGPT-like
  model (geometric turns, p = 0.3, mean 3.3; user messages log-normal, median 64 tokens;
  answers median 160 tokens), drawn from ``default_rng((seed, 1, conversation))``;
* between two turns the user reads and types: log-normal think time, median
  ``think_median_s`` = 60 s, sigma ``think_sigma`` = 1.0 (a quarter of the gaps are
  under 30 s, a tenth over five minutes);
* turn *t*'s prompt is the app's system prompt, every earlier user message and answer,
  then the new user message; it is cut into ``block_tokens`` = 256-token blocks with
  chained IDs (`wqs.prefix_block_ids`, namespace ``namespace``). Only full blocks have
  IDs, so a turn looks up ``len(prompt) // block_tokens`` blocks, the leading ones of
  its conversation's chain.

Requests are ordered by time (arrival plus think times); the time itself matters only
through that order.

Serving a request (what the simulators and the replays do alike): ``k`` = how many
leading blocks of the prompt are cached (a prefix lookup stops at the first miss), those
``k`` are read (hits), and the other ``n - k`` blocks are stored (the engine computed
them in prefill). The block hit rate is hits / blocks looked up, over the whole trace.

The simulators, per block at a capacity of C blocks
---------------------------------------------------
* ``fifo``: blocks leave in the order they were stored; hits change nothing.
* ``lru``: a hit or a repeated store makes the block the most recently used.
* ``min``: Belady's MIN, the offline optimum. Each request is its blocks accessed in
  chain order; on a miss the block is stored unless its next use lies beyond that of
  every cached block, else the cached block used furthest in the future is dropped
  (ties: the deepest first). A block's next use is never earlier than its parent's (a
  prompt that holds a block holds its whole prefix), and of two with the same next use
  the deeper goes first, so this cache stays prefix-closed: every cached block's parent
  is cached. A prefix lookup therefore stops at no cached block, and MIN's hits under
  the prefix definition equal its hits per block, which no policy can exceed (a prefix
  hit is a block hit, and MIN with bypass maximises block hits). `simulate` counts
  both and they are checked to agree.
* ``inf``: no eviction: only first stores miss.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .kvcache import make_conversation

APPS_SEED = 0xA995
SYSTEM_SEED = 0x5E5


@dataclass(frozen=True)
class TraceParams:
    conversations: int = 4000
    apps: int = 4
    system_tokens: tuple[int, int] = (300, 3000)
    block_tokens: int = 256
    arrival_rate: float = 1.0  # conversations per second
    think_median_s: float = 60.0
    think_sigma: float = 1.0
    seed: int = 1
    namespace: str = "prefix-trace"

    def __post_init__(self) -> None:
        lo, hi = self.system_tokens
        assert self.conversations >= 1 and self.apps >= 1 and self.block_tokens >= 1
        assert 0 <= lo <= hi and self.arrival_rate > 0 and self.think_median_s > 0


@dataclass
class Trace:
    """Requests in time order: requests[i] = (conversation, blocks looked up, prompt
    tokens). chains[c] holds conversation c's block IDs (its last prompt's full blocks);
    a request looks up the first `blocks` of them."""

    params: TraceParams
    chains: list[list[bytes]]
    requests: list[tuple[int, int, int]]
    app_of: list[int]
    system_prompts: list[int]  # tokens of each app's system prompt
    times: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))

    @property
    def lookups(self) -> int:
        return sum(n for _, n, _ in self.requests)

    def distinct_blocks(self) -> int:
        seen: set[bytes] = set()
        for c, n, _ in self.requests:
            seen.update(self.chains[c][:n])
        return len(seen)

    def ids(self, request: int) -> list[bytes]:
        c, n, _ = self.requests[request]
        return self.chains[c][:n]


def app_shares(apps: int) -> np.ndarray:
    w = 1.0 / np.arange(1, apps + 1)
    return w / w.sum()


def make_trace(params: TraceParams = TraceParams()) -> Trace:
    from wqs.ids import prefix_block_ids

    from .kvcache import VOCAB

    rng = np.random.default_rng((params.seed, APPS_SEED))
    lo, hi = params.system_tokens
    sizes = [int(x) for x in rng.integers(lo, hi + 1, params.apps)]
    systems = [np.random.default_rng((params.seed, SYSTEM_SEED, a)).integers(
        0, VOCAB, sizes[a], dtype=np.int32) for a in range(params.apps)]
    apps = rng.choice(params.apps, size=params.conversations, p=app_shares(params.apps))
    starts = np.cumsum(rng.exponential(1.0 / params.arrival_rate, params.conversations))
    B = params.block_tokens
    chains: list[list[bytes]] = []
    events: list[tuple[float, int, int, int]] = []
    for c in range(params.conversations):
        conv = make_conversation(params.seed, 1, c, systems[apps[c]])
        think = np.random.default_rng((params.seed, 2, c)).lognormal(
            np.log(params.think_median_s), params.think_sigma, conv.turns)
        last = conv.prompt(conv.turns - 1)
        chains.append(prefix_block_ids(last, B, namespace=params.namespace))
        t = float(starts[c])
        length = len(conv.system)
        for turn in range(conv.turns):
            if turn:
                length += len(conv.answers[turn - 1])
                t += float(think[turn])
            length += len(conv.users[turn])
            events.append((t, c, length // B, length))
    events.sort()
    return Trace(params, chains, [(c, n, toks) for _, c, n, toks in events],
                 [int(a) for a in apps], sizes, np.array([e[0] for e in events]))


# ---------------------------------------------------------------------- simulators


@dataclass
class SimResult:
    policy: str
    capacity: int  # blocks; 0 for inf
    lookups: int = 0
    hits: int = 0  # prefix hits: leading cached blocks of each request
    block_hits: int = 0  # blocks cached when accessed (MIN: equal to hits)
    stored: int = 0  # blocks stored (misses written)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


def _dense(trace: Trace) -> tuple[list[np.ndarray], int]:
    """Per conversation, its chain as dense block numbers (shared blocks share one)."""
    number: dict[bytes, int] = {}
    out = []
    for chain in trace.chains:
        out.append(np.array([number.setdefault(b, len(number)) for b in chain], dtype=np.int64))
    return out, len(number)


def simulate(trace: Trace, policy: str, capacity: int) -> SimResult:
    """The prefix hit rate of `policy` (fifo, lru, min, inf) holding `capacity` blocks."""
    if policy == "min":
        return _simulate_min(trace, capacity)
    if policy not in ("fifo", "lru", "inf"):
        raise ValueError(f"unknown policy {policy!r}: fifo, lru, min or inf")
    chains, _ = _dense(trace)
    res = SimResult(policy, 0 if policy == "inf" else capacity)
    if policy == "inf":
        seen: set[int] = set()
        for c, n, _ in trace.requests:
            keys = chains[c][:n].tolist()
            k = 0
            while k < n and keys[k] in seen:
                k += 1
            seen.update(keys[k:])
            res.lookups += n
            res.hits += k
            res.block_hits += k
            res.stored += n - k
        return res
    assert capacity >= 1
    cache: OrderedDict[int, None] = OrderedDict()
    lru = policy == "lru"
    for c, n, _ in trace.requests:
        keys = chains[c][:n].tolist()
        k = 0
        while k < n and keys[k] in cache:
            k += 1
        res.lookups += n
        res.hits += k
        res.block_hits += k + sum(1 for b in keys[k:] if b in cache)
        if lru:
            for b in keys[:k]:
                cache.move_to_end(b)
        for b in keys[k:]:
            res.stored += 1
            if b in cache:
                if lru:
                    cache.move_to_end(b)
                continue
            cache[b] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
    return res


def _simulate_min(trace: Trace, capacity: int) -> SimResult:
    assert capacity >= 1
    chains, _ = _dense(trace)
    keys_per_req = [chains[c][:n] for c, n, _ in trace.requests]
    flat = np.concatenate(keys_per_req) if keys_per_req else np.zeros(0, dtype=np.int64)
    depth = np.concatenate([np.arange(len(k)) for k in keys_per_req]) if keys_per_req \
        else np.zeros(0, dtype=np.int64)
    total = len(flat)
    never = total + 1
    # next_use[t]: the next access of the block accessed at t.
    next_use = np.full(total, never, dtype=np.int64)
    last: dict[int, int] = {}
    flat_l = flat.tolist()
    for t in range(total - 1, -1, -1):
        b = flat_l[t]
        next_use[t] = last.get(b, never)
        last[b] = t
    nu_l, depth_l = next_use.tolist(), depth.tolist()
    res = SimResult("min", capacity)
    cached: dict[int, int] = {}  # block -> its next use
    heap: list[tuple[int, int, int]] = []  # (-next use, -depth, block), lazily stale
    t = 0
    for keys in keys_per_req:
        n = len(keys)
        prefix = True
        for j in range(n):
            b, nu, d = flat_l[t], nu_l[t], depth_l[t]
            t += 1
            if b in cached:
                res.block_hits += 1
                if prefix:
                    res.hits += 1
                cached[b] = nu
                heapq.heappush(heap, (-nu, -d, b))
                continue
            prefix = False
            res.stored += 1
            if nu == never:
                continue  # never used again: not worth a place
            if len(cached) >= capacity:
                while True:
                    neg_nu, neg_d, v = heap[0]
                    if cached.get(v) == -neg_nu:
                        break
                    heapq.heappop(heap)  # stale: evicted or used since
                if (nu, d) >= (-neg_nu, -neg_d):
                    continue  # the incoming block is the one used furthest away: bypass
                heapq.heappop(heap)
                del cached[v]
            cached[b] = nu
            heapq.heappush(heap, (-nu, -d, b))
        res.lookups += n
    return res


def trace_summary(trace: Trace) -> dict[str, object]:
    p = trace.params
    distinct = trace.distinct_blocks()
    turns = len(trace.requests)
    return {
        "conversations": p.conversations, "requests": turns, "apps": p.apps,
        "system_prompt_tokens": trace.system_prompts, "block_tokens": p.block_tokens,
        "blocks_looked_up": trace.lookups, "distinct_blocks": distinct,
        "prompt_tokens": sum(t for _, _, t in trace.requests),
        "arrival_rate": p.arrival_rate, "think_median_s": p.think_median_s,
        "think_sigma": p.think_sigma, "seed": p.seed,
        "duration_s": float(trace.times[-1]) if len(trace.times) else 0.0,
    }


# ------------------------------------------------------------------------- the replay


@dataclass
class ReplayResult:
    """One replay of a trace through a store."""

    label: str
    lookups: int = 0
    hits: int = 0  # leading blocks found by lookup_prefix and loaded by get_many
    lost_hits: int = 0  # found by the lookup, gone (or wrong) by the get
    stored: int = 0
    failed_puts: int = 0
    prompt_tokens: int = 0
    tokens_avoided: int = 0  # prefill tokens whose KV was loaded instead of computed
    put_bytes: int = 0  # payload bytes the replay put
    held_blocks: list[int] = field(default_factory=list)  # the store's block count, sampled
    evicted: bool = False  # the store evicted during the replay
    engine_before: dict[str, int] = field(default_factory=dict)
    engine_after: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    def delta(self, key: str) -> int:
        return self.engine_after.get(key, 0) - self.engine_before.get(key, 0)

    @property
    def capacity_blocks(self) -> int:
        """Blocks the store held once full: the median of the samples taken after its
        first eviction; if it never evicted, what it held at the end (every block put)."""
        if not self.held_blocks:
            return 0
        if not self.evicted:
            return self.held_blocks[-1]
        return int(np.median(self.held_blocks))

    @property
    def write_amplification(self) -> float:
        """Device bytes written over the bytes that puts wrote (copies forward are the
        difference; region headers count on both sides)."""
        written = self.delta("written_bytes")
        own = written - self.delta("reinserted_bytes")
        return written / own if own > 0 else 1.0

    @property
    def device_bytes_per_put_byte(self) -> float:
        """Device bytes written per payload byte put: write amplification times the
        on-device format's overhead (entry header and padding to the unit)."""
        return self.delta("written_bytes") / self.put_bytes if self.put_bytes else 0.0


def replay(trace: Trace, client: Any, block_bytes: int, *, label: str = "",
           stats: Callable[[], dict[str, int]] | None = None, sample_every: int = 100,
           progress: Callable[[int, int], None] | None = None) -> ReplayResult:
    """Serve every request of the trace through `client` (a wqs.Client) as an inference
    engine with a KV-cache tier does: lookup_prefix, get_many of the hit prefix (stops at
    the first block that no longer loads), put_many of the rest. `stats()`: the store's
    engine counters (wqs.rpc.control.ControlClient.stats()["engine"]), read before,
    after and every `sample_every` requests to learn how many blocks it holds."""
    import time

    res = ReplayResult(label)
    B = trace.params.block_tokens
    payload = memoryview(bytes(range(256)) * (block_bytes // 256 + 1))[:block_bytes]
    longest = max((n for _, n, _ in trace.requests), default=0)
    outs = [bytearray(block_bytes) for _ in range(longest)]
    if stats is not None:
        res.engine_before = stats()
    t0 = time.perf_counter()
    evicting = False
    for r, (c, n, tokens) in enumerate(trace.requests):
        ids = trace.chains[c][:n]
        k = client.lookup_prefix(ids) if n else 0
        valid = 0
        if k:
            got = client.get_many(ids[:k], outs[:k])
            while valid < k and got[valid] is not None and len(got[valid]) == block_bytes:
                valid += 1
        rest = ids[valid:]
        if rest:
            ok = client.put_many([(b, payload) for b in rest])
            good = sum(1 for x in ok if x)
            res.stored += good
            res.failed_puts += len(rest) - good
            res.put_bytes += good * block_bytes
        res.lookups += n
        res.hits += valid
        res.lost_hits += k - valid
        res.prompt_tokens += tokens
        res.tokens_avoided += valid * B
        if stats is not None and r % sample_every == sample_every - 1:
            now = stats()
            if not evicting and now.get("evicted_regions", 0) > res.engine_before.get(
                    "evicted_regions", 0):
                evicting = True
                res.held_blocks.clear()
            res.held_blocks.append(now.get("index_entries", 0))
        if progress is not None:
            progress(r + 1, len(trace.requests))
    res.seconds = time.perf_counter() - t0
    if stats is not None:
        res.engine_after = stats()
        res.evicted = res.delta("evicted_regions") > 0
        if not res.evicted or not res.held_blocks:
            res.held_blocks.append(res.engine_after.get("index_entries", 0))
    return res


def engine_stats(control: Any, wait_s: float = 30.0) -> dict[str, int]:
    """A daemon's engine counters from its control plane (a ControlClient), waiting up
    to wait_s for it to come up: a daemon serves data before its control plane."""
    import time

    from wqs.errors import NodeUnavailable

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return control.stats()["engine"]
        except NodeUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def device_size_for(blocks: int, block_bytes: int, region_size: int) -> tuple[int, int]:
    """(device size, regions) of a device whose regions hold `blocks` blocks of
    `block_bytes` besides the two a shard keeps for reclaiming (one clean, one spare)."""
    from wqs.engine import format as fmt

    per_region = (region_size - fmt.UNIT) // fmt.entry_len(block_bytes)
    assert per_region >= 1, "a block larger than a region"
    regions = -(-blocks // per_region) + 2
    size = fmt.SUPERBLOCK_SIZE + regions * region_size
    while fmt.compute_geometry(size, region_size)[3] < regions:
        size += region_size
    return size, regions


# --------------------------------------------------------------------------- the CLI


def _parse_size(text: str) -> int:
    from wqs.config import parse_size

    return parse_size(text)


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A Markdown table (what bench/README.md quotes)."""
    head = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join("---:" if i else "---" for i in range(len(columns))) + "|"
    lines = [head, rule]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(key, "")) for key, _ in columns) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import tempfile

    ap = argparse.ArgumentParser(
        prog="python -m bench.prefixtrace",
        description="Multi-turn chat trace: FIFO, LRU and Belady's MIN block hit rates "
                    "at several capacities, and the same trace replayed through wqsd "
                    "daemons (one per capacity and eviction policy) sized to hold them.")
    ap.add_argument("--conversations", type=int, default=TraceParams.conversations)
    ap.add_argument("--seed", type=int, default=TraceParams.seed)
    ap.add_argument("--fractions", default="0.05,0.1,0.3,1.0",
                    help="capacities as shares of the trace's distinct blocks")
    ap.add_argument("--evictions", default="block-lru,fifo",
                    help="engine.eviction of each replay ('' to only simulate)")
    ap.add_argument("--block-bytes", default="32704",
                    help="payload per block (default 32 KiB less the 64 B entry header, "
                         "so an entry is 8 units)")
    ap.add_argument("--region-size", default="1M", help="engine.region_size of the daemons")
    ap.add_argument("--servers", default=None,
                    help="replay through these running daemons instead (comma-separated; "
                         "one replay, no daemons started; each one's control plane at its "
                         "data port + 1, their counters summed)")
    ap.add_argument("--json", default=None, help="also write every figure to this file")
    args = ap.parse_args(argv)

    from .procs import Daemon

    t_start = __import__("time").perf_counter()
    params = TraceParams(conversations=args.conversations, seed=args.seed)
    trace = make_trace(params)
    summary = trace_summary(trace)
    distinct = int(summary["distinct_blocks"])  # type: ignore[arg-type]
    print(f"trace: {json.dumps(summary)}", flush=True)
    block_bytes = _parse_size(args.block_bytes)
    region_size = _parse_size(args.region_size)
    fractions = [float(x) for x in args.fractions.split(",") if x]
    evictions = [x for x in args.evictions.split(",") if x]
    inf = simulate(trace, "inf", 0)
    sims: dict[int, dict[str, float]] = {}

    def sim_at(capacity: int) -> dict[str, float]:
        if capacity not in sims:
            sims[capacity] = {p: simulate(trace, p, max(1, capacity)).hit_rate
                              for p in ("fifo", "lru", "min")}
        return sims[capacity]

    rows: list[dict[str, Any]] = []
    out: dict[str, Any] = {"trace": summary, "infinite_hit_rate": inf.hit_rate,
                           "block_bytes": block_bytes, "region_size": region_size, "runs": []}

    def report(res: ReplayResult | None, fraction: float | None, eviction: str) -> None:
        cap = res.capacity_blocks if res is not None else int(round(fraction * distinct))
        sim = sim_at(cap)
        row: dict[str, Any] = {
            "capacity": f"{cap} ({cap / distinct:.1%})" + (
                ", no eviction" if res is not None and not res.evicted else ""),
            "eviction": eviction or "—",
            "fifo": f"{sim['fifo']:.3f}", "lru": f"{sim['lru']:.3f}",
            "min": f"{sim['min']:.3f}", "inf": f"{inf.hit_rate:.3f}"}
        run: dict[str, Any] = {"fraction": fraction, "capacity_blocks": cap, "sim": sim,
                               "eviction": eviction}
        if res is not None:
            ratio = res.hit_rate / sim["min"] if sim["min"] else 0.0
            row.update({
                "store": f"{res.hit_rate:.3f}", "vs_min": f"{ratio:.3f}",
                "vs_inf": f"{res.hit_rate / inf.hit_rate:.3f}",
                "wa": f"{res.write_amplification:.2f}",
                "dev_per_put": f"{res.device_bytes_per_put_byte:.2f}",
                "avoided": f"{res.tokens_avoided / res.prompt_tokens:.1%}",
                "lost": str(res.lost_hits), "failed": str(res.failed_puts),
                "secs": f"{res.seconds:.0f}"})
            run.update({"hit_rate": res.hit_rate, "vs_min": ratio,
                        "write_amplification": res.write_amplification,
                        "device_bytes_per_put_byte": res.device_bytes_per_put_byte,
                        "prefill_tokens_avoided": res.tokens_avoided,
                        "prompt_tokens": res.prompt_tokens, "lost_hits": res.lost_hits,
                        "failed_puts": res.failed_puts, "seconds": res.seconds,
                        "engine_delta": {k: res.delta(k) for k in res.engine_after}})
        rows.append(row)
        out["runs"].append(run)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    def run_one(addresses: list[str], label: str) -> ReplayResult:
        from wqs.client import Client
        from wqs.rpc.control import ControlClient

        from .usage import control_address

        controls = [ControlClient(control_address(a)) for a in addresses]

        def stats() -> dict[str, int]:
            total: dict[str, int] = {}
            for control in controls:
                for k, v in engine_stats(control).items():
                    total[k] = total.get(k, 0) + v
            return total

        try:
            with Client(addresses) as client:
                return replay(trace, client, block_bytes, label=label, stats=stats)
        finally:
            for control in controls:
                control.close()

    if args.servers:
        report(run_one(args.servers.split(","), "given"), None, "(running cluster)")
    else:
        for fraction in fractions:
            if not evictions:
                report(None, fraction, "")
            for eviction in evictions:
                size, regions = device_size_for(int(round(fraction * distinct)), block_bytes,
                                                region_size)
                with tempfile.TemporaryDirectory(prefix="wqs-prefixtrace-") as tmp:
                    daemon = Daemon(tmp, device_size=str(size), workers=1,
                                    engine={"region_size": str(region_size),
                                            "eviction": eviction})
                    try:
                        res = run_one([daemon.address], f"{eviction}@{fraction}")
                    finally:
                        daemon.stop()
                report(res, fraction, eviction)
    columns = [("capacity", "capacity (blocks)"), ("eviction", "eviction"),
               ("store", "store"), ("fifo", "FIFO sim"), ("lru", "LRU sim"),
               ("min", "MIN sim"), ("vs_min", "store / MIN"), ("inf", "infinite"),
               ("wa", "write ampl."), ("dev_per_put", "device B / put B"),
               ("avoided", "prefill tokens avoided"), ("lost", "lost hits"),
               ("failed", "failed puts"), ("secs", "s")]
    print()
    print(_table(rows, columns))
    elapsed = __import__("time").perf_counter() - t_start
    print(f"\n{summary['requests']} requests, {summary['blocks_looked_up']} blocks looked up, "
          f"{distinct} distinct; blocks of {block_bytes} B in regions of {region_size} B; "
          f"{elapsed:.0f} s in all", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0 if all(r.get("failed", "0") == "0" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
