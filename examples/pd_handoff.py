#!/usr/bin/env python3
"""Prefill -> decode hand-off through WQS: one process writes a request's KV blocks,
another -- whose client lists the daemons in a different order -- finds and reads them,
and checks them bit for bit.

    python examples/pd_handoff.py                       # starts 3 local wqsd, runs both sides
    python examples/pd_handoff.py --servers h1:7070,h2:7070,h3:7070
    python examples/pd_handoff.py --shape llama-3-8b --tokens 2048

    # or by hand, on two hosts (same --seed/--tokens/--shape on both):
    python examples/pd_handoff.py prefill --servers h1:7070,h2:7070,h3:7070
    python examples/pd_handoff.py decode  --servers h3:7070,h2:7070,h1:7070

The blocks use the layout of the vLLM connector (`wqs.integrations.vllm_ids`): the
prompt's tokens are chained into block IDs with `wqs.prefix_block_ids` under the
request's namespace (model, block size, KV dtype, TP/PP, cache_salt); each chain position
holds one WQS block per attention layer and a commit marker written after them. So the
decode side could as well be vLLM with ``kv_connector: WQSConnector`` and the same
``wqs_model_id``. Placement depends only on block IDs and the set of servers, never on
their order: that is what the reversed list shows.

The KV bytes are pseudo-random, derived from (seed, chain ID, layer), so the decode side
regenerates what it must read without any channel to the prefill side besides WQS. Needs
only the wqs package (numpy, no torch, no vLLM).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import wqs  # noqa: E402
from wqs.integrations.vllm_ids import (chain_ids, chain_namespace, layer_block_id,  # noqa: E402
                                       marker_block_id, marker_bytes, parse_marker, rank_tag)

# (layers, KV heads, head dim): a vLLM block of one layer is 2 (K,V) * heads * block * dim.
SHAPES = {"tiny": (4, 2, 64), "llama-3-8b": (32, 8, 128), "llama-3-70b-tp8": (80, 1, 128)}
DTYPE_BYTES = 2  # bf16


def layer_names(n: int) -> list[str]:
    return [f"model.layers.{i}.self_attn.attn" for i in range(n)]


def prompt_tokens(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 128_000, n).tolist()


def block_bytes(seed: int, chain_id: bytes, layer: int, size: int) -> np.ndarray:
    """The KV bytes of one layer of one block: a function of (seed, chain ID, layer)."""
    key = int.from_bytes(hashlib.blake2b(chain_id + layer.to_bytes(4, "little"),
                                         digest_size=8, key=str(seed).encode()).digest(), "little")
    return np.random.default_rng(key).integers(0, 256, size, dtype=np.uint8)


def request_layout(args) -> tuple[list[bytes], list[str], int]:
    layers, heads, dim = SHAPES[args.shape]
    ns = chain_namespace(args.model_id, args.block_tokens, "bfloat16",
                         cache_salt=args.cache_salt or None)
    chain = chain_ids(prompt_tokens(args.seed, args.tokens), args.block_tokens, ns)
    per_block = 2 * heads * args.block_tokens * dim * DTYPE_BYTES
    return chain, layer_names(layers), per_block


def prefill(args) -> dict:
    """Write every layer block of every full block of the prompt, then the markers."""
    chain, layers, per_block = request_layout(args)
    rank = rank_tag()
    client = wqs.Client(args.servers, timeout_s=args.timeout_s)
    digest = hashlib.sha256()
    elapsed = 0.0  # time in WQS calls only, not in making up the KV bytes
    ok = [True] * len(chain)
    for li, name in enumerate(layers):  # like vLLM's save_kv_layer: one put per layer
        data = [block_bytes(args.seed, c, li, per_block) for c in chain]
        for d in data:
            digest.update(d.data)
        started = time.perf_counter()
        stored = client.put_many([(layer_block_id(c, rank, name), d) for c, d in zip(chain, data)])
        elapsed += time.perf_counter() - started
        ok = [a and b for a, b in zip(ok, stored)]
    marker = marker_bytes(len(layers), per_block)
    started = time.perf_counter()
    committed = client.put_many([(marker_block_id(c, rank), marker)
                                 for c, good in zip(chain, ok) if good])
    elapsed += time.perf_counter() - started
    client.close()
    total = len(chain) * len(layers) * per_block
    return {"role": "prefill", "servers": args.servers, "blocks": len(chain),
            "committed": sum(committed), "bytes": total, "seconds": round(elapsed, 4),
            "GBps": round(total / elapsed / 1e9, 3), "sha256": digest.hexdigest()}


def decode(args) -> dict:
    """Look the prompt up, read the hits into one buffer, verify them bit for bit."""
    chain, layers, per_block = request_layout(args)
    rank = rank_tag()
    client = wqs.Client(args.servers, timeout_s=args.timeout_s)
    started = time.perf_counter()
    hits = client.lookup_prefix([marker_block_id(c, rank) for c in chain])
    marker = client.get(marker_block_id(chain[0], rank)) if hits else None
    if marker is not None and parse_marker(marker) != (len(layers), per_block):
        raise SystemExit(f"the stored blocks have another shape: {parse_marker(marker)}")
    buf = np.empty((len(layers), hits, per_block), np.uint8)  # stands in for the paged cache
    missing = 0
    for li, name in enumerate(layers):  # like start_load_kv: one get per layer
        got = client.get_many([layer_block_id(c, rank, name) for c in chain[:hits]],
                              outs=list(buf[li]))
        missing += sum(g is None for g in got)
    elapsed = time.perf_counter() - started
    client.close()
    digest = hashlib.sha256()
    mismatched = 0
    for li in range(len(layers)):
        for i in range(hits):
            want = block_bytes(args.seed, chain[i], li, per_block)
            mismatched += not np.array_equal(buf[li, i], want)
            digest.update(buf[li, i].data)
    total = hits * len(layers) * per_block
    return {"role": "decode", "servers": args.servers, "blocks": len(chain), "hits": hits,
            "missing": missing, "mismatched": mismatched, "bytes": total,
            "seconds": round(elapsed, 4), "GBps": round(total / max(elapsed, 1e-9) / 1e9, 3),
            "sha256": digest.hexdigest()}


# --------------------------------------------------------------------------- local cluster


def _free_base_port() -> int:
    """A port p with p, p+1, p+2 free (data, control, metrics)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base > 65000:
            continue
        try:
            for off in (1, 2):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + off))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports")


def start_local_cluster(n: int, workdir: Path, device_size: str = "256M",
                        config: str | None = None) -> tuple[list[subprocess.Popen], list[str]]:
    """n wqsd processes on 127.0.0.1 (data under workdir); their addresses once serving."""
    procs, servers = [], []
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for i in range(n):
        addr = f"127.0.0.1:{_free_base_port()}"
        data = workdir / f"node{i}"
        data.mkdir(parents=True)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "wqs.daemon", "--listen", addr, "--data-dir", str(data),
             "--device-size", device_size, "--log-level", "warning",
             *(["--config", config] if config else [])],
            stdout=subprocess.DEVNULL, stderr=open(data / "wqsd.log", "wb"), env=env))
        servers.append(addr)
    deadline = time.monotonic() + 30
    logging.getLogger("wqs.client").setLevel(logging.ERROR)  # "cannot connect" until they listen
    with wqs.Client(servers, timeout_s=1.0, connect_timeout_s=0.5) as probe:
        while True:
            wqs_rtts = probe.ping()
            if all(v is not None for v in wqs_rtts.values()):
                return procs, servers
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                stop(procs)
                raise SystemExit(f"daemons did not start: {wqs_rtts} (logs in {workdir})")
            time.sleep(0.2)


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()


def run_side(role: str, servers: list[str], args) -> dict:
    """Run one side as its own process; its JSON report."""
    cmd = [sys.executable, str(Path(__file__).resolve()), role, "--servers", ",".join(servers),
           "--seed", str(args.seed), "--tokens", str(args.tokens), "--shape", args.shape,
           "--block-tokens", str(args.block_tokens), "--model-id", args.model_id,
           "--cache-salt", args.cache_salt, "--timeout-s", str(args.timeout_s)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{role} failed ({out.returncode}):\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("role", nargs="?", choices=["prefill", "decode"],
                    help="run one side only (default: both, as two processes)")
    ap.add_argument("--servers", default="",
                    help="host:port,... (default: start 3 local daemons)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=1000, help="prompt length")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--block-tokens", type=int, default=16, help="vLLM block size")
    ap.add_argument("--model-id", default="example-model")
    ap.add_argument("--cache-salt", default="")
    ap.add_argument("--timeout-s", type=float, default=5.0)
    args = ap.parse_args(argv)
    args.servers = [s for s in args.servers.split(",") if s]

    if args.role:
        if not args.servers:
            ap.error(f"{args.role} needs --servers")
        print(json.dumps(prefill(args) if args.role == "prefill" else decode(args)))
        return 0

    procs, workdir = [], None
    if not args.servers:
        workdir = Path(tempfile.mkdtemp(prefix="wqs-pd-"))
        procs, args.servers = start_local_cluster(3, workdir)
    try:
        p = run_side("prefill", args.servers, args)
        d = run_side("decode", list(reversed(args.servers)), args)
    finally:
        stop(procs)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"prefill ({','.join(p['servers'])}): {p['blocks']} blocks x layers, "
          f"{p['bytes'] / 2**20:.1f} MiB in {p['seconds'] * 1e3:.1f} ms ({p['GBps']} GB/s)")
    print(f"decode  ({','.join(d['servers'])}): {d['hits']}/{d['blocks']} blocks hit, "
          f"{d['bytes'] / 2**20:.1f} MiB in {d['seconds'] * 1e3:.1f} ms ({d['GBps']} GB/s), "
          f"{d['missing']} missing, {d['mismatched']} mismatched")
    good = (d["hits"] == p["blocks"] == p["committed"] and d["missing"] == 0
            and d["mismatched"] == 0 and d["sha256"] == p["sha256"])
    print("bit-exact: yes" if good else "bit-exact: NO")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
