"""Aggregate 64 KiB get throughput of 1, 2 and 3 daemons, measured in one run.

    python -m bench.cluster_scaling [--nodes 1,2,3] [--bs 64k] [--blocks 3000]
                                    [--threads 4] [--batch 32] [--runtime 5]

Starts the daemons on loopback (each with its own device file under a temp dir), loads
`--blocks` blocks through the SDK, then for `--runtime` seconds has `--threads` client
threads each issue get_many batches of `--batch` IDs. Prints MiB/s and the ratio to
one node. The DRAM tier is off so every get reads the device. Everything started is
stopped and removed at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

import wqs
from .procs import Daemon
from wqs.config import parse_size



def measure(addresses: list[str], bs: int, blocks: int, threads: int, batch: int,
            runtime: float) -> float:
    """MiB/s of get_many over the cluster."""
    client = wqs.Client(addresses, timeout_s=10.0, connections_per_node=max(2, threads))
    rng = random.Random(1)
    payload = os.urandom(bs)
    ids = [rng.getrandbits(128) for _ in range(blocks)]
    for k in range(0, blocks, 64):
        assert all(client.put_many([(i, payload) for i in ids[k : k + 64]]))
    done = [0] * threads
    stop = threading.Event()

    def worker(t: int) -> None:
        r = random.Random(t)
        while not stop.is_set():
            got = client.get_many(r.sample(ids, batch))
            done[t] += sum(len(g) for g in got if g is not None)

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    started = time.monotonic()
    for th in pool:
        th.start()
    time.sleep(runtime)
    stop.set()
    for th in pool:
        th.join()
    elapsed = time.monotonic() - started
    client.close()
    return sum(done) / elapsed / (1 << 20)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", default="1,2,3")
    ap.add_argument("--bs", default="64k")
    ap.add_argument("--blocks", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runtime", type=float, default=5.0)
    args = ap.parse_args(argv)
    counts = [int(n) for n in args.nodes.split(",")]
    bs = parse_size(args.bs)
    tmp = Path(tempfile.mkdtemp(prefix="wqs-scaling-", dir="/var/tmp"))
    daemons: list[Daemon] = []
    results: list[tuple[int, float]] = []
    try:
        for n in counts:
            while len(daemons) < n:  # DRAM tier off: every get reads the device
                daemons.append(Daemon(str(tmp / f"node{len(daemons)}"), device_size="1G"))
            addresses = [d.address for d in daemons[:n]]
            results.append((n, measure(addresses, bs, args.blocks, args.threads,
                                       args.batch, args.runtime)))
            print(f"{n} node(s): {results[-1][1]:.0f} MiB/s", file=sys.stderr)
    finally:
        for d in daemons:
            d.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    table = Table(title=f"aggregate get throughput, {args.bs} blocks, {args.threads} client "
                        f"threads x get_many({args.batch}), {os.cpu_count()} CPUs")
    for col in ("daemons", "MiB/s", "x one daemon"):
        table.add_column(col, justify="right")
    base = results[0][1]
    for n, mibs in results:
        table.add_row(str(n), f"{mibs:,.0f}", f"{mibs / base:.2f}")
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
