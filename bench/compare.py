"""Side by side, in one invocation on one machine: fio on the daemon's backing file, WQS
through a daemon, Redis, a file-per-block store, and the raw-socket transport ceiling.

    python -m bench.compare --bs 64k,1m --iodepth 1,32 --runtime 5 --repeat 3

What runs, in order (everything is started on free loopback ports and stopped, and the
work folder removed, however the run ends):

1. **fio** on ``<work>/wqs/wqs.dev`` -- the file the daemon will then own -- filled
   once, then ``randwrite`` and ``randread`` over the first ``--size`` bytes at every
   block size and queue depth (``direct=1``, io_uring or libaio, one job). The file is
   then formatted in place for the daemon (``wqs format``): its extents stay written, as
   they were for fio (a fresh file would make WQS's first writes convert unwritten
   extents, a filesystem cost fio never paid).
2. **wqs**: ``python -m wqs.daemon`` on that file (``--device-size``, the DRAM tier off
   by default so that reads come from the device as fio's do; ``--wqs-dram`` turns it
   on), driven through the SDK. The daemon is on this host, so the SDK moves blocks
   through shared memory (its buffers are slots of ``Client.shared_memory``, where the
   device reads and writes them directly); **wqs-bounce** keeps the job's buffers in its
   own memory, as LMCache and vLLM do (the SDK copies each block once through its bounce
   memory); **wqs-tcp** is the same daemon through TCP (``transport: tcp``), the same job.
3. **redis**: Debian's ``redis-server`` with ``--save '' --appendonly no``, through
   redis-py (a pool with a connection per client thread).
4. **files** and **files-odirect**: one file per block under ``<work>/files``, written
   with open/write/close and read with open/read (page cache), or with O_DIRECT.
5. **rawsock**: `bench.rawsock`, a minimal TCP sender/receiver moving the same blocks
   with nothing stored: the ceiling for anything behind a TCP round trip in Python.

With ``--iodepth-batch B`` each call carries B blocks (wqs: one get_many/put_many of B;
redis: a pipeline of B commands; rawsock: B requests back to back), N/B calls in flight.

Every system except fio is driven by the same wqs-bench job, in this process, with QD N
requests of one block each in flight over ``--size`` bytes of blocks (``randwrite``,
then ``randread`` after any missing blocks are laid out, outside the timed part), for
``--runtime`` seconds: for wqs and rawsock one thread keeps the N requests in flight
(the SDK's start_*_many and wait_any; rawsock a connection per request), as fio's
libaio engine does; redis and the file stores, which have no asynchronous interface,
get N threads with one request each (bench/WQS_BENCH.md, "IO model"). Each point is
run ``--repeat`` times, interleaved across systems, and the table shows medians: MiB/s,
IOPS, p50 and p99 of the per-request latency, throughput as a fraction of the raw-socket
ceiling and of fio on the device, and the CPU and context switches each request cost:

* **cli** (client): this process, getrusage(RUSAGE_SELF) around the timed part (every
  thread: the wqs-bench IO threads and whatever the system's client library runs), divided
  by the requests. For fio: fio's own ``usr_cpu``/``sys_cpu``/``ctx`` of its job.
* **srv** (server): for wqs the daemon's getrusage through its control plane (Stats);
  for redis-server and the raw-socket sink, which this command starts, /proc/<pid> (CPU
  in 10 ms ticks, switches summed over its threads). fio and the file stores have no
  server: their whole cost is in the cli columns.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from .fioparse import build_job, parse_size

SYSTEMS = ("fio", "wqs", "wqs-bounce", "wqs-tcp", "redis", "files", "files-odirect",
           "rawsock")
OPS = ("write", "read")
MiB = 1 << 20


@dataclass
class Point:
    system: str
    op: str
    bs: int
    qd: int
    mib_s: float
    iops: float
    p50_us: float
    p99_us: float
    ios: int = 0
    errors: int = 0
    # Per request: CPU µs (user, system) and context switches, of the client and of the
    # server (see the module doc); None where not measured or not meaningful.
    cli_usr_us: float | None = None
    cli_sys_us: float | None = None
    cli_ctx: float | None = None
    srv_usr_us: float | None = None
    srv_sys_us: float | None = None
    srv_ctx: float | None = None
    srv_note: str = ""  # why the server columns are empty, when they should not be


@dataclass
class Row:
    system: str
    op: str
    bs: int
    qd: int
    mib_s: float
    iops: float
    p50_us: float
    p99_us: float
    cli_usr_us: float | None = None
    cli_sys_us: float | None = None
    cli_ctx: float | None = None
    srv_usr_us: float | None = None
    srv_sys_us: float | None = None
    srv_ctx: float | None = None
    runs: list[Point] = field(default_factory=list)


USAGE_FIELDS = ("cli_usr_us", "cli_sys_us", "cli_ctx", "srv_usr_us", "srv_sys_us", "srv_ctx")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bs_label(bs: int) -> str:
    return f"{bs // MiB} MiB" if bs >= MiB and bs % MiB == 0 else f"{bs // 1024} KiB"


# --------------------------------------------------------------------------------- fio


def fio_point(path: str, size: int, engine: str, op: str, bs: int, qd: int,
              runtime: float, keep: dict[str, Any] | None = None) -> Point:
    cmd = ["fio", "--name=compare", f"--filename={path}", f"--size={size}",
           f"--rw=rand{op}", f"--bs={bs}", f"--iodepth={qd}", "--numjobs=1",
           f"--ioengine={engine}", "--direct=1", "--time_based",
           # in ms: fio reads no decimals ("0.3s" would be 0, a run of one pass over size)
           f"--runtime={max(1, round(runtime * 1000))}ms",
           "--lat_percentiles=1", "--percentile_list=1:5:10:20:30:40:50:60:70:80:90:95:99:99.5:99.9:99.99",
           "--randrepeat=0", "--output-format=json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    side = job[op]
    pct = side["lat_ns"]["percentile"]
    if keep is not None:
        keep["fio"] = {float(k): v for k, v in pct.items()}
    p = Point("fio", op, bs, qd, side["bw_bytes"] / MiB, side["iops"],
              pct["50.000000"] / 1e3, pct["99.000000"] / 1e3, side["total_ios"],
              job.get("error", 0))
    ios = side["total_ios"]
    if ios and job["job_runtime"]:
        # fio's usr_cpu/sys_cpu are percent of job_runtime (ms), from its job's getrusage
        cpu_us = job["job_runtime"] * 1e3 / 100 / ios
        p.cli_usr_us, p.cli_sys_us = job["usr_cpu"] * cpu_us, job["sys_cpu"] * cpu_us
        p.cli_ctx = job["ctx"] / ios
    return p


# ------------------------------------------------------------------- wqs-bench points


def bench_point(system: str, engine: Any, op: str, bs: int, qd: int, size: int,
                runtime: float, keep: dict[str, Any] | None = None, batch: int = 1) -> Point:
    from .runner import Clone, run_group

    opts = {"rw": f"rand{op}", "bs": str(bs), "size": str(size), "iodepth": str(qd),
            "runtime": f"{runtime}", "time_based": "1", "filename": f"compare-{bs}",
            "ioengine": engine.name}
    if batch > 1:
        opts["iodepth_batch"] = str(min(batch, qd))
    spec = build_job(f"{system}-{op}", opts, opts)
    clone = Clone(spec, 0, 0, engine, seed=int(time.time_ns() % 1_000_000_007))
    (res,) = run_group([clone], "never", lambda m: log(f"  {system}: {m}"))
    d = res.dirs[op]
    secs = res.runtime_ns / 1e9
    lat = d.lat
    if keep is not None:
        keep[system] = lat.copy()
    p50, p99 = (np.percentile(lat, [50, 99], method="inverted_cdf") / 1e3) if lat.size else (0, 0)
    errors = res.misses + res.failed_puts + (1 if res.error else 0)
    if res.errors:
        log(f"  {system}: {res.errors[0]}")
    p = Point(system, op, bs, qd, d.io_bytes / secs / MiB if secs else 0.0,
              d.n / secs if secs else 0.0, float(p50), float(p99), d.n, errors)
    cli, srv = res.cpu_client or {}, res.cpu_daemon
    if "usr_us_per_req" in cli:
        p.cli_usr_us, p.cli_sys_us, p.cli_ctx = (cli["usr_us_per_req"], cli["sys_us_per_req"],
                                                 cli["ctx_per_req"])
    if srv is not None and "usr_us_per_req" in srv:
        p.srv_usr_us, p.srv_sys_us, p.srv_ctx = (srv["usr_us_per_req"], srv["sys_us_per_req"],
                                                 srv["ctx_per_req"])
    elif srv is not None:  # a server whose usage could not be read: say so, once per point
        p.srv_note = str(srv.get("error", "not measured"))
        log(f"  {system}: server CPU {p.srv_note}")
    return p


def _usage_log(p: Point) -> str:
    out = ""
    if p.cli_usr_us is not None and p.cli_sys_us is not None:
        out += f", cli {p.cli_usr_us + p.cli_sys_us:,.0f} µs/req"
    if p.srv_usr_us is not None and p.srv_sys_us is not None:
        out += f", srv {p.srv_usr_us + p.srv_sys_us:,.0f} µs/req"
    return out


# ------------------------------------------------------------------------------ table


def summarise(points: list[Point]) -> list[Row]:
    groups: dict[tuple, list[Point]] = {}
    for p in points:
        groups.setdefault((p.system, p.op, p.bs, p.qd), []).append(p)
    rows = []
    for (system, op, bs, qd), runs in groups.items():
        row = Row(system, op, bs, qd,
                  statistics.median(r.mib_s for r in runs),
                  statistics.median(r.iops for r in runs),
                  statistics.median(r.p50_us for r in runs),
                  statistics.median(r.p99_us for r in runs), runs=runs)
        for name in USAGE_FIELDS:  # median of the runs that measured it
            values = [getattr(r, name) for r in runs if getattr(r, name) is not None]
            setattr(row, name, statistics.median(values) if values else None)
        rows.append(row)
    return rows


def _us(v: float) -> str:
    return f"{v:.1f}" if v < 10 else f"{v:,.0f}"


def usage_cells(r: Row) -> list[str]:
    """cli µs usr/sys, cli ctx, srv µs usr/sys, srv ctx; '-' where there is none."""
    cells = []
    for side in ("cli", "srv"):
        usr, sys_, ctx = (getattr(r, f"{side}_{k}") for k in ("usr_us", "sys_us", "ctx"))
        cells.append(f"{_us(usr)}/{_us(sys_)}" if usr is not None and sys_ is not None else "-")
        cells.append(f"{ctx:.2f}" if ctx is not None else "-")
    return cells


USAGE_COLUMNS = ("cli µs usr/sys", "cli ctx", "srv µs usr/sys", "srv ctx")
USAGE_LEGEND = ("cli/srv µs usr/sys, ctx: CPU microseconds (user/system) and context "
                "switches per request, of the client process (getrusage; for fio, fio's "
                "own) and of the server (wqs: the daemon's getrusage via its control plane; "
                "redis, rawsock: /proc of the process started here; '-': no server, or "
                "not measured).")


def render(rows: list[Row], systems: list[str], bss: list[int], qds: list[int],
           title: str) -> str:
    from rich.console import Console
    from rich.table import Table

    by = {(r.system, r.op, r.bs, r.qd): r for r in rows}
    table = Table(title=title, title_justify="left", show_lines=False)
    for name, just in (("op", "left"), ("bs", "right"), ("QD", "right"), ("system", "left"),
                       ("MiB/s", "right"), ("IOPS", "right"), ("p50 µs", "right"),
                       ("p99 µs", "right"), ("× rawsock", "right"), ("× fio", "right"),
                       *((c, "right") for c in USAGE_COLUMNS)):
        table.add_column(name, justify=just)  # type: ignore[arg-type]
    for op in OPS:
        for bs in bss:
            for qd in qds:
                ceiling = by.get(("rawsock", op, bs, qd))
                fio = by.get(("fio", op, bs, qd))
                first = True
                for s in systems:
                    r = by.get((s, op, bs, qd))
                    if r is None:
                        continue
                    x_ceil = f"{r.mib_s / ceiling.mib_s:.2f}" if ceiling and ceiling.mib_s else "-"
                    x_fio = f"{r.mib_s / fio.mib_s:.2f}" if fio and fio.mib_s else "-"
                    errs = sum(p.errors for p in r.runs)
                    table.add_row(op if first else "", bs_label(bs) if first else "",
                                  str(qd) if first else "",
                                  s + (f" [red]({errs} err)[/]" if errs else ""),
                                  f"{r.mib_s:,.1f}", f"{r.iops:,.0f}", f"{r.p50_us:,.0f}",
                                  f"{r.p99_us:,.0f}", x_ceil, x_fio, *usage_cells(r))
                    first = False
                if not first:
                    table.add_section()
    console = Console(width=max(160, Console().width), record=True, file=sys.stdout)
    console.print(table)
    console.print("MiB/s, IOPS, p50/p99 of per-request latency: medians of the repeats. "
                  "× rawsock: throughput / the raw-socket ceiling (transport with nothing "
                  "stored); × fio: throughput / fio on the same file (the device). "
                  + USAGE_LEGEND)
    return console.export_text()


def markdown(rows: list[Row], systems: list[str], bss: list[int], qds: list[int]) -> str:
    by = {(r.system, r.op, r.bs, r.qd): r for r in rows}
    lines = ["| op | bs | QD | system | MiB/s | IOPS | p50 µs | p99 µs | × rawsock | × fio | "
             + " | ".join(USAGE_COLUMNS) + " |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(USAGE_COLUMNS)]
    for op in OPS:
        for bs in bss:
            for qd in qds:
                ceiling, fio = by.get(("rawsock", op, bs, qd)), by.get(("fio", op, bs, qd))
                for s in systems:
                    r = by.get((s, op, bs, qd))
                    if r is None:
                        continue
                    xc = f"{r.mib_s / ceiling.mib_s:.2f}" if ceiling and ceiling.mib_s else "-"
                    xf = f"{r.mib_s / fio.mib_s:.2f}" if fio and fio.mib_s else "-"
                    lines.append(f"| {op} | {bs_label(bs)} | {qd} | {s} | {r.mib_s:,.1f} | "
                                 f"{r.iops:,.0f} | {r.p50_us:,.0f} | {r.p99_us:,.0f} | {xc} | {xf} | "
                                 + " | ".join(usage_cells(r)) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- main


class Services:
    """Everything the comparison started, stopped in reverse order."""

    def __init__(self) -> None:
        self.stops: list[Callable[[], None]] = []

    def add(self, fn: Callable[[], None]) -> None:
        self.stops.append(fn)

    def close(self) -> None:
        while self.stops:
            fn = self.stops.pop()
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - keep cleaning up
                log(f"cleanup: {e}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {__package__ or 'bench'}.compare",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--bs", default="64k,1m", help="block sizes (default 64k,1m)")
    ap.add_argument("--iodepth", "--qd", default="1,32", help="queue depths (default 1,32)")
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds per point (default 5)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per point, medians shown")
    ap.add_argument("--size", default="256m", help="data set per block size (default 256m)")
    ap.add_argument("--device-size", default="1G", help="daemon device file (default 1G)")
    ap.add_argument("--wqs-dram", default="0", help="daemon DRAM tier (default 0: off)")
    ap.add_argument("--workers", default=None,
                    help="daemon shard processes (default: wqsd's auto, one per core)")
    ap.add_argument("--iodepth-batch", type=int, default=1,
                    help="blocks per call (wqs-bench --iodepth_batch): at QD N, N/B calls "
                         "of B blocks in flight; redis gets a pipeline of B commands")
    ap.add_argument("--systems", default=",".join(SYSTEMS),
                    help=f"subset of {','.join(SYSTEMS)}")
    ap.add_argument("--ops", default="write,read", help="write,read (default both)")
    ap.add_argument("--dir", default=None,
                    help="where the work folder goes (default /var/tmp: a disk, not tmpfs)")
    ap.add_argument("--json", metavar="FILE", help="also write every run as JSON")
    ap.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown")
    ap.add_argument("--cdf", metavar="DIR", help="write a latency CDF PNG per point (matplotlib)")
    args = ap.parse_args(argv)

    bss = [parse_size(b) for b in args.bs.split(",") if b.strip()]
    qds = [int(q) for q in args.iodepth.split(",") if q.strip()]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    for s in systems:
        if s not in SYSTEMS:
            ap.error(f"unknown system {s!r}")
    for o in ops:
        if o not in OPS:
            ap.error(f"unknown op {o!r}")
    size, device_size = parse_size(args.size), parse_size(args.device_size)
    if size + 4 * 16 * MiB > device_size:
        ap.error("--size must leave room on the device (at least 64 MiB less than --device-size)")
    if args.cdf:
        from .cdf import _pyplot

        _pyplot()  # fail now, not after the run
        os.makedirs(args.cdf, exist_ok=True)

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    base = args.dir or "/var/tmp"
    work = tempfile.mkdtemp(prefix="wqs-compare-", dir=base)
    services = Services()
    services.add(lambda: shutil.rmtree(work, ignore_errors=True))
    points: list[Point] = []
    latencies: dict[tuple, dict[str, Any]] = {}
    started = time.monotonic()
    meta: dict[str, Any] = {}
    try:
        from .engine_bench import fio_engine, fio_fill, fs_type
        from .engines import FilesEngine, RedisEngine, WqsEngine
        from .procs import Daemon, RawSink, Redis
        from .rawsock import RawSockEngine
        from .usage import PidUsage

        wqs_dir = os.path.join(work, "wqs")
        os.makedirs(wqs_dir)
        dev = os.path.join(wqs_dir, "wqs.dev")
        fstype = fs_type(work)
        meta = {"cpus": os.cpu_count(), "filesystem": fstype, "size": size,
                "device_size": device_size, "runtime": args.runtime, "repeat": args.repeat,
                "wqs_dram": args.wqs_dram, "load_before": os.getloadavg()}
        if "fio" in systems:
            engine = fio_engine()
            meta["fio_ioengine"] = engine
            log(f"fio: filling {dev} ({device_size // MiB} MiB on {fstype}) ...")
            fio_fill(dev, device_size, engine)
            for rep in range(args.repeat):
                for op in ops:
                    for bs in bss:
                        for qd in qds:
                            keep: dict[str, Any] = {}
                            p = fio_point(dev, size, engine, op, bs, qd, args.runtime, keep)
                            latencies.setdefault((op, bs, qd), {}).update(keep)
                            log(f"fio {op} {bs_label(bs)} QD{qd} run {rep + 1}: "
                                f"{p.mib_s:,.1f} MiB/s, p50 {p.p50_us:,.0f} µs, p99 {p.p99_us:,.0f} µs"
                                + _usage_log(p))
                            points.append(p)
        else:
            fio_fill(dev, device_size, fio_engine())
        # The daemon gets the same file, formatted in place: its extents are written, as
        # fio's were (a freshly allocated file would make every first write convert an
        # unwritten extent, a cost fio never paid).
        subprocess.run([sys.executable, "-m", "wqs.cli", "format", dev, "--force", "-y",
                        "--shards", args.workers or "auto"], check=True, capture_output=True)
        engines: dict[str, Any] = {}
        threads = max(qds)
        if {"wqs", "wqs-bounce", "wqs-tcp"} & set(systems):
            d = Daemon(wqs_dir, device_size=str(device_size), dram_cache=args.wqs_dram,
                       keep_dir=True, workers=int(args.workers) if args.workers else None)
            services.add(d.stop)
            for name, transport in (("wqs", None), ("wqs-bounce", None), ("wqs-tcp", "tcp")):
                if name in systems:
                    engines[name] = WqsEngine([d.address], transport=transport,
                                              own_buffers=name == "wqs-bounce")
                    services.add(engines[name].close)
                    log(f"{name}: {engines[name].describe()}")
            log(f"wqs: daemon pid {d.proc.pid} on {d.address}, device {dev}")
        if "redis" in systems:
            r = Redis(os.path.join(work, "redis"))
            services.add(r.stop)
            engines["redis"] = RedisEngine(r.address, connections=threads + 4)
            engines["redis"].server_usage = [PidUsage(r.proc.pid, "redis-server")]
            services.add(engines["redis"].close)
            log(f"redis: pid {r.proc.pid} on {r.address}")
        if "files" in systems:
            engines["files"] = FilesEngine(os.path.join(work, "files"))
        if "files-odirect" in systems:
            engines["files-odirect"] = FilesEngine(os.path.join(work, "files-odirect"),
                                                   direct=True)
        if "rawsock" in systems:
            sink = RawSink()
            services.add(sink.stop)
            engines["rawsock"] = RawSockEngine(sink.address)
            engines["rawsock"].server_usage = [PidUsage(sink.proc.pid, "bench.rawsock")]
            services.add(engines["rawsock"].close)
            log(f"rawsock: sink pid {sink.proc.pid} on {sink.address}")
        for rep in range(args.repeat):
            for op in ops:
                for bs in bss:
                    for qd in qds:
                        for s in systems:
                            if s == "fio":
                                continue
                            keep = {}
                            p = bench_point(s, engines[s], op, bs, qd, size, args.runtime, keep,
                                            args.iodepth_batch)
                            latencies.setdefault((op, bs, qd), {}).update(keep)
                            log(f"{s} {op} {bs_label(bs)} QD{qd} run {rep + 1}: "
                                f"{p.mib_s:,.1f} MiB/s, p50 {p.p50_us:,.0f} µs, "
                                f"p99 {p.p99_us:,.0f} µs" + (f", {p.errors} errors" if p.errors else "")
                                + _usage_log(p))
                            points.append(p)
        meta["load_after"] = os.getloadavg()
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        services.close()
        return 130
    finally:
        services.close()

    rows = summarise(points)
    wall = time.monotonic() - started
    title = (f"WQS vs fio, Redis, file-per-block and the raw-socket ceiling: random IO over "
             f"{size // MiB} MiB, {args.runtime:g} s x {args.repeat} per point, "
             f"{meta.get('cpus')} CPUs, {meta.get('filesystem')}, load "
             f"{meta['load_before'][0]:.1f}")
    render(rows, systems, bss, qds, title)
    print(f"total wall time {wall:.0f} s")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows, systems, bss, qds) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "wall_s": round(wall, 1),
                       "rows": [{k: v for k, v in asdict(r).items() if k != "runs"}
                                for r in rows],
                       "runs": [asdict(p) for p in points]}, f, indent=2)
    if args.cdf:
        from .cdf import plot_series

        for (op, bs, qd), lats in latencies.items():
            series = []
            for s in systems:
                v = lats.get(s)
                if v is None:
                    continue
                if s == "fio":  # fio gives percentiles, not samples: one per 0.01 %
                    qs = sorted(v.items())
                    weights = np.diff([0.0] + [q for q, _ in qs]) * 100
                    v = np.repeat([x for _, x in qs], np.maximum(1, weights.round().astype(int)))
                series.append((s if s != "fio" else "fio (from its percentiles)", v))
            plot_series(series, os.path.join(args.cdf, f"cdf-{op}-{bs // 1024}k-qd{qd}.png"),
                        f"{op}, {bs_label(bs)}, QD {qd} (last run of each system)")
    bad = sum(p.errors for p in points if p.system != "fio")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
