"""Bytes per block of the engine's in-memory index (wqs.engine.index.Index).

    python -m bench.index_footprint [--counts 1M,10M] [--seed 1]

Inserts N random nonzero 64-bit tags through Index.put (the same path the engine's
writes take, growth included) and prints nbytes / count for each N. The index stores
20 B per slot (tag u64, loc u32, meta u32, stamp u32) and grows by 1.5x past a 0.75
load, so the figure moves between about 27 B (just before a growth) and 40 B (just
after one).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from wqs.engine.index import MAX_LOAD, SLOT_BYTES, Index


def parse_count(text: str) -> int:
    """1M / 10M / 250k / 1000000 (decimal suffixes: a count, not a size)."""
    text = text.strip().lower()
    mult = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:], 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def measure(n: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    tags = rng.integers(1, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True).tolist()
    index = Index()
    put = index.put
    payload_len = 64 * 1024
    t0 = time.perf_counter()
    for loc, tag in enumerate(tags):
        put(tag, loc & 0xFFFFFFFF, payload_len)
    elapsed = time.perf_counter() - t0
    return {
        "n": n,
        "count": index.count,
        "capacity": index.capacity,
        "nbytes": index.nbytes,
        "bytes_per_block": index.nbytes / index.count,
        "load": index.count / index.capacity,
        "seconds": elapsed,
        "inserts_per_s": n / elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {__package__ or 'bench'}.index_footprint", description=__doc__.split("\n")[0])
    ap.add_argument("--counts", default="1M,10M", help="block counts, comma separated")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    counts = [parse_count(c) for c in args.counts.split(",") if c.strip()]

    table = Table(title="WQS index footprint (wqs.engine.index.Index, Python put loop)",
                  title_justify="left")
    for c in ("blocks", "capacity", "load", "index MiB", "B / block", "insert time s",
              "inserts/s"):
        table.add_column(c, justify="right", no_wrap=True)
    rows = []
    for n in counts:
        print(f"inserting {n:,} tags ...", file=sys.stderr, flush=True)
        r = measure(n, args.seed)
        rows.append(r)
        table.add_row(f"{r['count']:,}", f"{r['capacity']:,}", f"{r['load']:.2f}",
                      f"{r['nbytes'] / 2**20:,.1f}", f"{r['bytes_per_block']:.1f}",
                      f"{r['seconds']:.1f}", f"{r['inserts_per_s']:,.0f}")
    console = Console(width=max(Console().width, 110))
    console.print(table)
    console.print(f"{SLOT_BYTES} B per slot; growth at load {MAX_LOAD} by 1.5x, so B/block "
                  f"ranges from {SLOT_BYTES / MAX_LOAD:.1f} to {SLOT_BYTES / (MAX_LOAD / 1.5):.1f}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
