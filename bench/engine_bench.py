"""In-process engine micro-benchmark, side by side with fio on the same file.

    python -m bench.engine_bench [--size 1G] [--bs 64k] [--runtime 5] [--qd 1,32]
                                 [--repeat 3] [--dir DIR] [--json] [--profile DIR]
                                 [--mode threads,batch,async] [--ceiling] [--skip-fio]

One invocation:

1. creates a backing file of --size in a fresh temporary folder under --dir (default
   /var/tmp, a real disk rather than tmpfs) and fills it with one sequential O_DIRECT
   pass, so that neither fio nor the engine ever reads unwritten (all-zero, never
   touching the disk) extents;
2. runs fio on that file: randwrite, then randread, at every --qd, numjobs=1,
   direct=1, ioengine=io_uring (libaio where this fio lacks io_uring), time based;
   with --mode batch also a second fio job per point that works in batches
   (iodepth_batch_submit = iodepth_batch_complete_min = QD: submit QD IOs, wait for
   all of them, repeat), which is what one put_many/get_many call of QD blocks does;
3. formats the same file as a WQS device (dram_cache_bytes=0, so every get is an SSD
   read) and runs random puts of --bs random payloads, then random gets of IDs that are
   still resident, in each --mode: ``threads`` (QD N = N Python threads, each doing
   synchronous put/get calls through the facade, which serves one call at a time),
   ``batch`` (QD N = one thread calling put_many/get_many with N blocks, as the
   KV-cache connectors call the engine; each op's latency is its batch's) and ``async``
   (QD N = one thread keeping N single-block puts or gets in flight on the engine core,
   turning its event loop, as a daemon shard drives it). fio and WQS take turns point
   by point, so a disk whose
   speed drifts from minute to minute (shared virtual disks do) affects both alike;
   since fio's random writes land on the engine's data, the engine is formatted afresh
   and filled before the gets;
4. with --ceiling, runs every WQS point a second time on a RAM device of the same size
   (wqs/nvme/memdevice.py; rows marked "(RAM)"): the engine with no IO wait at all, bound
   by its own CPU and the GIL. Its ratio to fio on the disk is the most the engine could
   reach on this machine with any disk: a goal above it is out of reach for the code,
   not for the disk;
5. repeats every (tool, op, QD) point --repeat times and reports medians, then prints
   a table with WQS/fio ratios (threads rows against plain fio, batch rows against
   batched fio, with the ratio to plain fio beside it) and removes the file.

Latency is per-operation wall time: for WQS the time around one put()/get() call (async:
from starting the op on the core to its callback), for fio its total latency
(submission + completion, fio's ``lat``), both as p50/p99. CPU per op is the process's
getrusage (user + system, all threads) over the measured part divided by the ops; for
fio, its own usr_cpu/sys_cpu over its IOs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

from rich.console import Console
from rich.table import Table

from wqs.config import EngineConfig, parse_size
from wqs.procstat import ProcessUsage, cost_per_request, self_usage, usage_delta

MiB = 1024 * 1024
OPS = ("put", "get")
FIO_RW = {"put": "randwrite", "get": "randread"}
# --mode -> the tool name of its rows
MODES = {"threads": "wqs", "batch": "wqs-batch", "async": "wqs-async"}
CEILING = "-ram"  # with --ceiling, each mode's tool again on a RAM device: "wqs-ram", ...
WQS_TOOLS = tuple(MODES.values()) + tuple(t + CEILING for t in MODES.values())
# The fio job each WQS mode is held against: QD IOs always in flight, or batches of QD.
REFERENCE = {"wqs": "fio", "wqs-batch": "fio-batch", "wqs-async": "fio"}
REFERENCE |= {t + CEILING: REFERENCE[t] for t in MODES.values()}
MODE_OF = {tool: mode for mode, tool in MODES.items()}
PAYLOAD_POOL = 64  # distinct random payloads cycled through by the put workers


@dataclass
class Point:
    """One measurement: a tool doing one op at one queue depth for one run."""

    tool: str  # "fio", "fio-batch", "wqs" (threads mode), "wqs-batch", "wqs-async"
    op: str  # "put" or "get"
    qd: int
    iops: float
    mib_s: float
    p50_us: float
    p99_us: float
    ops: int = 0
    errors: int = 0  # WQS only: gets that missed or returned the wrong length, failed puts
    # CPU per op over the measured part: WQS, this process's getrusage (all threads);
    # fio, its job's usr_cpu/sys_cpu. None where not measured.
    cpu_usr_us: float | None = None
    cpu_sys_us: float | None = None
    ctx_per_op: float | None = None  # context switches (voluntary + involuntary) per op

    @property
    def cpu_us(self) -> float | None:
        if self.cpu_usr_us is None or self.cpu_sys_us is None:
            return None
        return self.cpu_usr_us + self.cpu_sys_us


@dataclass
class Summary:
    """The median of the repeats of one (tool, op, qd) point."""

    tool: str
    op: str
    qd: int
    iops: float
    mib_s: float
    p50_us: float
    p99_us: float
    cpu_usr_us: float | None = None
    cpu_sys_us: float | None = None
    ctx_per_op: float | None = None
    runs: list[Point] = field(default_factory=list)

    @property
    def cpu_us(self) -> float | None:
        if self.cpu_usr_us is None or self.cpu_sys_us is None:
            return None
        return self.cpu_usr_us + self.cpu_sys_us


# ------------------------------------------------------------------------------ helpers


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def percentile(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile (what fio reports) of an ascending list."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return float(sorted_values[k])


def fs_type(path: str) -> str:
    """The filesystem type holding `path`, from /proc/mounts (longest mount prefix)."""
    path = os.path.realpath(path)
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


# --------------------------------------------------------------------------------- fio


def fio_engine() -> str:
    """io_uring if this fio was built with it, else libaio."""
    try:
        out = subprocess.run(["fio", "--enghelp"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise SystemExit("fio is not installed (apt-get install -y fio)") from None
    engines = {line.strip() for line in out.stdout.splitlines()}
    return "io_uring" if "io_uring" in engines else "libaio"


def fio_fill(path: str, size: int, engine: str) -> None:
    """Write the whole file once, sequentially, so every later read touches the disk."""
    subprocess.run(
        ["fio", "--name=fill", f"--filename={path}", f"--size={size}", "--rw=write",
         "--bs=1M", "--iodepth=16", f"--ioengine={engine}", "--direct=1",
         "--output-format=terse"],
        check=True, capture_output=True, text=True,
    )


def fio_run(path: str, size: int, engine: str, op: str, qd: int, bs: int,
            runtime: float, batch: bool = False) -> Point:
    cmd = [
        "fio", "--name=wqs-bench", f"--filename={path}", f"--size={size}",
        f"--rw={FIO_RW[op]}", f"--bs={bs}", f"--iodepth={qd}", "--numjobs=1",
        f"--ioengine={engine}", "--direct=1", "--time_based", f"--runtime={runtime:g}s",
        "--lat_percentiles=1", "--percentile_list=50:99", "--randrepeat=0",
        "--output-format=json",
    ]
    if batch:
        cmd += [f"--iodepth_batch_submit={qd}", f"--iodepth_batch_complete_min={qd}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    side = job["write" if op == "put" else "read"]
    lat = side.get("lat_ns", {}).get("percentile") or side["clat_ns"]["percentile"]
    point = Point(
        tool="fio-batch" if batch else "fio", op=op, qd=qd, iops=side["iops"],
        mib_s=side["bw_bytes"] / MiB,
        p50_us=lat["50.000000"] / 1e3, p99_us=lat["99.000000"] / 1e3,
        ops=side["total_ios"], errors=job.get("error", 0),
    )
    ios = side["total_ios"]
    if ios and job.get("job_runtime"):
        # fio's usr_cpu/sys_cpu are percent of job_runtime (ms), from its job's getrusage
        us_per_pct = job["job_runtime"] * 1e3 / 100 / ios
        point.cpu_usr_us = job["usr_cpu"] * us_per_pct
        point.cpu_sys_us = job["sys_cpu"] * us_per_pct
        point.ctx_per_op = job["ctx"] / ios
    return point


# --------------------------------------------------------------------------------- WQS


class Measured:
    """What one WQS run measured: wall time, every op's latency (ns, ascending), bad
    ops, and the process's CPU usage over the run (getrusage of every thread)."""

    def __init__(self, elapsed: float, lats: list[int], errors: int,
                 usage: ProcessUsage | None) -> None:
        self.elapsed = elapsed
        self.lats = lats
        self.errors = errors
        self.usage = usage


def _dump_profiles(profiles: list, profile_dir: str | None, name: str) -> None:
    if not profile_dir:
        return
    import pstats

    stats = None
    for p in profiles:
        if p is None:
            continue
        if stats is None:
            stats = pstats.Stats(p)
        else:
            stats.add(p)
    if stats is not None:
        stats.dump_stats(os.path.join(profile_dir, f"{name}.pstats"))


def _usage_between(before: ProcessUsage, after: ProcessUsage) -> ProcessUsage | None:
    try:
        return usage_delta(before, after)
    except ValueError as e:  # cannot happen for RUSAGE_SELF; say so rather than guess
        log(f"CPU usage not measured: {e}")
        return None


def run_threads(qd: int, runtime: float, work: Callable[[int, float, list[int]], int],
                profile_dir: str | None = None, profile_name: str = "") -> Measured:
    """Run `work(thread_no, deadline, latencies)` in qd threads until the deadline.

    Returns the elapsed seconds, every latency in ns, the sum of what work returned and
    the process's CPU usage from the start signal until the last thread has finished
    (thread start-up, before the start signal, is outside it).
    """
    lats: list[list[int]] = [[] for _ in range(qd)]
    errors = [0] * qd
    ends = [0.0] * qd
    barrier = threading.Barrier(qd + 1)
    profiles: list = [None] * qd
    start_box = [0.0]

    def body(k: int) -> None:
        prof = None
        if profile_dir:
            import cProfile

            prof = cProfile.Profile()
        barrier.wait()
        deadline = start_box[0] + runtime
        if prof:
            prof.enable()
        errors[k] = work(k, deadline, lats[k])
        if prof:
            prof.disable()
            profiles[k] = prof
        ends[k] = time.perf_counter()

    threads = [threading.Thread(target=body, args=(k,), daemon=True) for k in range(qd)]
    for t in threads:
        t.start()
    usage0 = self_usage()
    start_box[0] = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    usage1 = self_usage()
    elapsed = max(ends) - start_box[0]
    _dump_profiles(profiles, profile_dir, profile_name)
    all_lats = sorted(x for lst in lats for x in lst)
    return Measured(elapsed, all_lats, sum(errors), _usage_between(usage0, usage1))


class WqsBench:
    """The engine's side of the benchmark, on the backing file or (ceiling) in RAM.

    The engine core runs on a reactor of this object's own (`open_core`, as
    `Engine.open` does). The threads and batch modes call the synchronous facade built
    over that core (`Engine(core, reactor)`), which turns the reactor inside each call;
    the async mode starts ops on the core itself and turns the reactor from this
    thread, as a daemon shard does. The modes run one after another, never at once.
    """

    def __init__(self, path: str, bs: int, runtime: float, profile_dir: str | None,
                 memory_size: int = 0) -> None:
        self.path = path
        self.memory_size = memory_size  # > 0: a MemoryDevice of this size, not the file
        self.bs = bs
        self.runtime = runtime
        self.profile_dir = profile_dir
        self.config = EngineConfig(dram_cache_bytes=0, sync=False)
        self._format()
        gen = random.Random()
        self.payloads = [gen.randbytes(bs) for _ in range(PAYLOAD_POOL)]
        self.resident: list[bytes] = []

    def _format(self) -> None:
        from wqs.engine.engine import Engine, open_core
        from wqs.loop.reactor import Reactor
        from wqs.nvme.device import DirectDevice
        from wqs.nvme.memdevice import MemoryDevice

        self.device = (MemoryDevice(self.memory_size) if self.memory_size
                       else DirectDevice(self.path))
        Engine.format(self.device, self.config, force=True)
        self.reactor = Reactor()
        try:
            self.core = open_core(self.device, self.config, self.reactor)
        except Exception:
            self.reactor.close()
            raise
        self.engine = Engine(self.core, self.reactor)  # closes the reactor and the device

    def close(self) -> None:
        try:
            self.engine.close()
        finally:
            self.device.close()

    def run(self, op: str, mode: str, qd: int, tag: str = "") -> Point:
        """One point: `op` ("put" or "get") at QD `qd` in `mode` (a key of MODES)."""
        if op == "get" and not self.resident:
            raise RuntimeError("no resident blocks to read")
        name = f"{op}{'_many' if mode == 'batch' else ''}{'_async' if mode == 'async' else ''}" \
               f"_qd{qd}{tag}{self._suffix}"
        if mode == "async":
            measured = self._run_async(op, qd, name)
        else:
            work = self._put_work if op == "put" else self._get_work
            threads, per_call = (1, qd) if mode == "batch" else (qd, 1)
            measured = run_threads(threads, self.runtime, work(per_call, mode == "batch"),
                                   self.profile_dir, name)
        return self._point(op, qd, measured, mode)

    # Kept for callers of the earlier interface: put(qd, tag, batch=...), get(...).
    def put(self, qd: int, tag: str = "", batch: bool = False) -> Point:
        return self.run("put", "batch" if batch else "threads", qd, tag)

    def get(self, qd: int, tag: str = "", batch: bool = False) -> Point:
        return self.run("get", "batch" if batch else "threads", qd, tag)

    # ---- threads and batch: the synchronous facade ----------------------------------

    def _put_work(self, per_call: int, batch: bool) -> Callable[[int, float, list[int]], int]:
        """A thread's loop of single puts, or (batch) of put_many of per_call blocks."""
        engine, payloads, n_pay = self.engine, self.payloads, len(self.payloads)

        def work(k: int, deadline: float, lats: list[int]) -> int:
            rng = random.Random()
            clock, now = time.perf_counter_ns, time.perf_counter
            i = k
            while now() < deadline:
                ids = [rng.randbytes(16) for _ in range(per_call)]
                t0 = clock()
                if batch:
                    engine.put_many([(b, payloads[(i + j) % n_pay]) for j, b in enumerate(ids)])
                else:
                    engine.put(ids[0], payloads[i % n_pay])
                lats.extend([clock() - t0] * per_call)
                i += per_call
            return 0

        return work

    def _get_work(self, per_call: int, batch: bool) -> Callable[[int, float, list[int]], int]:
        """A thread's loop of single gets, or (batch) of get_many of per_call blocks."""
        engine, ids, bs = self.engine, self.resident, self.bs

        def work(k: int, deadline: float, lats: list[int]) -> int:
            rng = random.Random()
            clock, now = time.perf_counter_ns, time.perf_counter
            bad = 0
            while now() < deadline:
                wanted = rng.choices(ids, k=per_call)
                t0 = clock()
                values = engine.get_many(wanted) if batch else [engine.get(wanted[0])]
                lats.extend([clock() - t0] * per_call)
                bad += sum(1 for v in values if v is None or len(v) != bs)
            return bad

        return work

    # ---- async: the core on its loop -------------------------------------------------

    def _run_async(self, op: str, qd: int, name: str) -> Measured:
        """QD single-block ops in flight on the core from this one thread until the
        deadline, then the ones still in flight drained (and counted, as the threads
        modes count each thread's last call).

        Each completion callback starts the next op at once, inside the same turn, so
        the turn's end submits it together with everything else that turn prepared: a
        daemon shard answering requests works the same way. An op's latency runs from
        just before core.put/core.get to its callback. A get's hit is handed back with
        core.release at once (its bytes are only checked for length)."""
        core, reactor = self.core, self.reactor
        payloads, n_pay, bs, resident = self.payloads, len(self.payloads), self.bs, self.resident
        clock = time.perf_counter_ns
        rng = random.Random()
        lats: list[int] = []
        record = lats.append
        inflight = 0  # ops started and not yet called back
        deferred = 0  # starts queued for the loop's next ready phase
        bad = 0
        issued = 0
        starting = False  # a callback run inside core.put/get (nothing to read) defers
        deadline_ns = 0

        def start() -> None:
            nonlocal inflight, issued, starting
            if clock() >= deadline_ns:
                return
            inflight += 1
            issued += 1
            starting = True
            try:
                if op == "put":
                    core.put(rng.randbytes(16), payloads[issued % n_pay], put_done, clock())
                else:
                    core.get([resident[rng.randrange(len(resident))]], get_done, clock())
            finally:
                starting = False

        def start_deferred() -> None:
            nonlocal deferred
            deferred -= 1
            start()

        def defer() -> None:
            nonlocal deferred
            deferred += 1
            reactor.call_soon(start_deferred)

        def next_op() -> None:
            if starting:  # called back from inside core.put/get: start it next, not nested
                defer()
            else:
                start()

        def put_done(put: Any) -> None:
            nonlocal inflight, bad
            record(clock() - put.arg)
            inflight -= 1
            if put.error is not None:
                bad += 1
                defer()  # a failure may be called back from the turn's end: start next turn
                return
            next_op()

        def get_done(get: Any) -> None:
            nonlocal inflight, bad
            record(clock() - get.arg)
            inflight -= 1
            result = get.results[0]
            if result is None:
                bad += 1
            else:
                if result.nbytes != bs:
                    bad += 1
                core.release(result)
            next_op()

        prof = None
        if self.profile_dir:
            import cProfile

            prof = cProfile.Profile()
        usage0 = self_usage()
        t_start = time.perf_counter()
        deadline_ns = clock() + int(self.runtime * 1e9)
        if prof:
            prof.enable()
        for _ in range(qd):
            start()
        # Work started outside a turn: one turn that does not wait submits it first.
        reactor.run_once(0.0)
        while inflight or deferred:
            reactor.run_once()
        if prof:
            prof.disable()
        elapsed = time.perf_counter() - t_start
        usage1 = self_usage()
        _dump_profiles([prof], self.profile_dir, name)
        lats.sort()
        return Measured(elapsed, lats, bad, _usage_between(usage0, usage1))

    # ---- the gets' data set --------------------------------------------------------

    def prepare_gets(self) -> int:
        """Format afresh (fio's writes went over the engine's data), then fill the device
        to 80 % so reads span it. Returns how many blocks were put."""
        self.close()
        self._format()
        engine = self.engine
        self.resident = []
        capacity = engine.sb.num_regions * engine.sb.region_size
        want = int(0.8 * capacity // (self.bs + 4096))
        rng = random.Random()
        added = 0
        while len(self.resident) < want:
            batch = [(rng.randbytes(16), self.payloads[j % len(self.payloads)]) for j in range(32)]
            engine.put_many(batch)
            self.resident.extend(b for b, _ in batch)
            added += len(batch)
        self.resident = [b for b in self.resident if engine.exists(b)]
        return added

    @property
    def _suffix(self) -> str:
        return CEILING if self.memory_size else ""

    def _point(self, op: str, qd: int, m: Measured, mode: str) -> Point:
        n = len(m.lats)
        point = Point(
            tool=MODES[mode] + self._suffix, op=op, qd=qd,
            iops=n / m.elapsed if m.elapsed else 0.0, mib_s=n * self.bs / m.elapsed / MiB
            if m.elapsed else 0.0,
            p50_us=percentile(m.lats, 50) / 1e3, p99_us=percentile(m.lats, 99) / 1e3,
            ops=n, errors=m.errors,
        )
        if m.usage is not None and n:
            cost = cost_per_request(m.usage, n)
            point.cpu_usr_us, point.cpu_sys_us = cost.usr_us, cost.sys_us
            point.ctx_per_op = cost.ctx
        return point


# ----------------------------------------------------------------------------- report


def summarise(points: list[Point]) -> dict[tuple[str, str, int], Summary]:
    groups: dict[tuple[str, str, int], list[Point]] = {}
    for p in points:
        groups.setdefault((p.tool, p.op, p.qd), []).append(p)
    out = {}
    for key, runs in groups.items():
        out[key] = Summary(
            tool=key[0], op=key[1], qd=key[2],
            iops=statistics.median(r.iops for r in runs),
            mib_s=statistics.median(r.mib_s for r in runs),
            p50_us=statistics.median(r.p50_us for r in runs),
            p99_us=statistics.median(r.p99_us for r in runs),
            cpu_usr_us=_median_of(r.cpu_usr_us for r in runs),
            cpu_sys_us=_median_of(r.cpu_sys_us for r in runs),
            ctx_per_op=_median_of(r.ctx_per_op for r in runs),
            runs=runs,
        )
    return out


def _median_of(values: Iterable[float | None]) -> float | None:
    """The median of the runs that measured it; None if none did."""
    have = [v for v in values if v is not None]
    return statistics.median(have) if have else None


def ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs else float("nan")


def row_name(tool: str, op: str) -> str:
    """put/get for threads mode, put_many/get_many for batch mode, "put (async)" for async
    mode; "RAM" marks the ceiling rows: "get (RAM)", "put (async, RAM)"."""
    name = f"{op}_many" if tool.startswith("wqs-batch") else op
    tags = (["async"] if tool.startswith("wqs-async") else []) + \
        (["RAM"] if tool.endswith(CEILING) else [])
    return f"{name} ({', '.join(tags)})" if tags else name


def _cpu_cell(s: Summary | None) -> str:
    cpu = s.cpu_us if s is not None else None
    return "-" if cpu is None else f"{cpu:,.1f}"


def render(summary: dict[tuple[str, str, int], Summary], qds: list[int], header: str,
           console: Console) -> None:
    table = Table(title=header, title_justify="left")
    for name, justify in [("op", "left"), ("QD", "right"),
                          ("fio IOPS", "right"), ("WQS IOPS", "right"), ("×", "right"),
                          ("fio MiB/s", "right"), ("WQS MiB/s", "right"), ("×", "right"),
                          ("fio p50 µs", "right"), ("WQS p50 µs", "right"), ("×", "right"),
                          ("fio p99 µs", "right"), ("WQS p99 µs", "right"), ("×", "right"),
                          ("fio CPU µs/op", "right"), ("WQS CPU µs/op", "right"),
                          ("×", "right")]:
        table.add_column(name, justify=justify, no_wrap=name == "op")  # type: ignore[arg-type]
    for op in OPS:
        for tool in WQS_TOOLS:
            for qd in qds:
                f, w = summary.get((REFERENCE[tool], op, qd)), summary.get((tool, op, qd))
                if f is None or w is None:
                    continue
                cells = [row_name(tool, op), str(qd)]
                for attr, fmt in (("iops", "{:,.0f}"), ("mib_s", "{:,.0f}"),
                                  ("p50_us", "{:,.0f}"), ("p99_us", "{:,.0f}")):
                    a, b = getattr(f, attr), getattr(w, attr)
                    r = ratio(b, a)
                    good = r >= 0.9 if attr in ("iops", "mib_s") else r <= 1 / 0.9
                    cells += [fmt.format(a), fmt.format(b),
                              f"[{'green' if good else 'red'}]{r:.2f}[/]"]
                fc, wc = f.cpu_us, w.cpu_us
                cells += [_cpu_cell(f), _cpu_cell(w),
                          f"{ratio(wc, fc):.1f}" if fc and wc is not None else "-"]
                table.add_row(*cells)
    console.print(table)
    console.print("× = WQS / fio (IOPS, MiB/s: higher is better; latency, CPU: lower is "
                  "better). Medians of the repeats. CPU µs/op: user + system CPU per op; "
                  "WQS: getrusage of this process (all threads) over the run; fio: its "
                  "job's usr_cpu + sys_cpu.")
    if any(key[0] == "fio-batch" for key in summary):
        console.print("put/get rows: fio with QD IOs always in flight. put_many/get_many rows: "
                      "fio in batches (iodepth_batch_submit = iodepth_batch_complete_min = QD: "
                      "QD IOs submitted together, all awaited), as one call of QD blocks does.")
    if any(key[0].startswith("wqs-async") for key in summary):
        console.print("async rows: QD single-block ops in flight on the engine core from one "
                      "thread turning its event loop (as a daemon shard), against plain fio.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {__package__ or 'bench'}.engine_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1G", help="backing file size (default 1G)")
    ap.add_argument("--bs", default="64k", help="block size (default 64k)")
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds per point (default 5)")
    ap.add_argument("--qd", default="1,32", help="queue depths, comma separated (default 1,32)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per point; medians reported")
    ap.add_argument("--dir", default=None, help="where the backing file goes (default /var/tmp)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--profile", metavar="DIR", default=None,
                    help="cProfile every WQS worker thread; merged .pstats per point go to DIR")
    ap.add_argument("--skip-fio", action="store_true", help="measure WQS only (no ratios)")
    ap.add_argument("--ceiling", action="store_true",
                    help="also run every WQS mode on a RAM device (rows marked RAM): the "
                         "engine's CPU ceiling, what it could do on a disk that never waits")
    ap.add_argument("--mode", default="threads,batch,async",
                    help="how WQS is driven at QD N: threads (N threads of single calls to "
                         "the facade), batch (put_many/get_many of N), async (N single ops in "
                         "flight on the engine core from one thread turning its loop); comma "
                         "separated (default all three)")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        ap.error(f"--mode takes {', '.join(MODES)} (comma separated), got {args.mode!r}")
    tools = [MODES[m] for m in modes]

    size, bs = parse_size(args.size), parse_size(args.bs)
    qds = [int(q) for q in args.qd.split(",") if q.strip()]
    if bs % 4096 or size % (1024 * 1024):
        ap.error("--bs must be a multiple of 4k and --size a multiple of 1M")
    base = args.dir or "/var/tmp"
    fstype = fs_type(base)
    if fstype in ("tmpfs", "ramfs"):
        log(f"warning: {base} is on {fstype}: O_DIRECT may fail and numbers mean little")
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)

    workdir = tempfile.mkdtemp(prefix="wqs-bench-", dir=base)
    path = os.path.join(workdir, "bench.dev")
    points: list[Point] = []
    started = time.monotonic()
    engine = fio_engine()
    try:
        log(f"filling {path} ({size / MiB:.0f} MiB on {fstype}) ...")
        fio_fill(path, size, engine)
        fio_tools = [] if args.skip_fio else (
            ["fio"] + (["fio-batch"] if "wqs-batch" in tools else []))
        benches = [WqsBench(path, bs, args.runtime, args.profile)]
        if args.ceiling:
            benches.append(WqsBench(path, bs, args.runtime, args.profile, memory_size=size))
            tools += [t + CEILING for t in tools]
        try:
            for op in OPS:
                if op == "get":
                    for b in benches:
                        added = b.prepare_gets()
                        log(f"formatted {b.device.path} afresh; reading from "
                            f"{len(b.resident):,} of the {added:,} blocks put since")
                for rep in range(args.repeat):
                    for qd in qds:
                        for tool in fio_tools + tools:
                            if tool.startswith("fio"):
                                p = fio_run(path, size, engine, op, qd, bs, args.runtime,
                                            batch=tool == "fio-batch")
                            else:
                                b = benches[tool.endswith(CEILING)]
                                p = b.run(op, MODE_OF[tool.removesuffix(CEILING)], qd,
                                          f"_run{rep + 1}")
                            name = row_name(tool, op) if tool in WQS_TOOLS else op
                            log(f"{tool} {name} qd{qd} run {rep + 1}: "
                                f"{p.iops:,.0f} IOPS, p50 {p.p50_us:.0f} µs, "
                                f"p99 {p.p99_us:.0f} µs"
                                + (f", CPU {p.cpu_us:.1f} µs/op" if p.cpu_us is not None
                                   else "")
                                + (f", {p.errors} bad {op}s" if p.errors else ""))
                            points.append(p)
            engine_stats = benches[0].engine.stats().as_dict()
        finally:
            for b in benches:
                b.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    summary = summarise(points)
    total = time.monotonic() - started
    errors = sum(p.errors for p in points if p.tool in WQS_TOOLS)
    bad_gets = sum(p.errors for p in points if p.tool in WQS_TOOLS and p.op == "get")
    if args.json:
        json.dump({
            "size": size, "bs": bs, "runtime": args.runtime, "qd": qds, "repeat": args.repeat,
            "modes": modes,
            "fio_ioengine": engine, "filesystem": fstype, "cpus": os.cpu_count(),
            "wall_s": round(total, 1), "wqs_bad_gets": bad_gets,
            "wqs_failed_puts": errors - bad_gets, "engine_stats": engine_stats,
            "summary": [
                {k: v for k, v in asdict(s).items() if k != "runs"}
                | {"cpu_us": s.cpu_us}
                | {"runs": [asdict(r) | {"cpu_us": r.cpu_us} for r in s.runs]}
                for s in summary.values()
            ],
        }, sys.stdout, indent=2)
        print()
        return 1 if errors else 0
    console = Console(width=max(Console().width, 180))
    header = (f"WQS engine vs fio: {bs // 1024} KiB random, {size / MiB:.0f} MiB file on "
              f"{fstype}, fio ioengine={engine}, {args.runtime:g} s x {args.repeat} per point, "
              f"{os.cpu_count()} CPUs")
    if args.skip_fio:
        table = Table(title=header, title_justify="left")
        for c in ("op", "QD", "IOPS", "MiB/s", "p50 µs", "p99 µs", "CPU µs/op"):
            table.add_column(c, justify="left" if c == "op" else "right", no_wrap=c == "op")
        for op in OPS:
            for tool in tools:
                for qd in qds:
                    w = summary[(tool, op, qd)]
                    table.add_row(row_name(tool, op), str(qd), f"{w.iops:,.0f}",
                                  f"{w.mib_s:,.0f}", f"{w.p50_us:,.0f}", f"{w.p99_us:,.0f}",
                                  _cpu_cell(w))
        console.print(table)
    else:
        render(summary, qds, header, console)
        q = max(qds)
        for op in OPS:
            for tool in tools:
                ours = summary[(tool, op, q)].iops
                r = ratio(ours, summary[(REFERENCE[tool], op, q)].iops)
                verdict = "[green]meets[/]" if r >= 0.9 else "[red]misses[/]"
                versus = "fio" if REFERENCE[tool] == "fio" else "batched fio"
                plain = ("" if REFERENCE[tool] == "fio" else
                         f" ({ratio(ours, summary[('fio', op, q)].iops):.2f}x plain fio)")
                if tool.endswith(CEILING):  # not held to the goal: it bounds the goal
                    console.print(f"ceiling at QD{q}, {row_name(tool, op)}: {r:.2f}x "
                                  f"{versus}{plain}, with no IO wait (the bound on the row above)")
                else:
                    console.print(f"goal WQS >= 0.9x {versus} IOPS at QD{q}, "
                                  f"{row_name(tool, op)}: {r:.2f}x {verdict}{plain}")
    if bad_gets:
        console.print(f"[red]{bad_gets} WQS gets missed or returned the wrong length[/]")
    if errors - bad_gets:
        console.print(f"[red]{errors - bad_gets} WQS puts failed[/]")
    console.print(f"total wall time {total:.0f} s")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
