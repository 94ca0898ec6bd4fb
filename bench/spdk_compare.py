"""WQS on its SPDK backend against SPDK's own spdk_nvme_perf, on the same NVMe-oF target
in the same invocation (and the same daemon on its AIO/O_DIRECT backend, for scale).

    python -m bench.spdk_compare --spdk-lib-dir /usr/local/lib --spdk-bin-dir /usr/local/bin \\
        --bs 64k --iodepth 32 --runtime 5 --repeat 3

What runs (everything is stopped, and the work folder removed, however the run ends):

1. SPDK's **nvmf_tgt** (from --spdk-bin-dir) with one RAM namespace (malloc bdev) of
   --size plus room, over TCP on a free loopback port, polling on the last CPU this
   process may use. Everything else below runs on the other CPUs (the reactor spins:
   sharing its core starves both).
2. **perf**: ``spdk_nvme_perf -q QD -o BS -w randread -t RUNTIME`` on the namespace
   (``--no-huge``), pinned to one core: SPDK's user-space NVMe driver in C, one queue
   pair, polling. Its CPU (getrusage of the child) per IO is the floor for a driver
   that busy-polls.
3. **wqs**: ``wqs format`` of the namespace and ``wqsd`` on it (device
   ``spdk:... ns:1``, ``engine.spdk.lib_dir``, --workers shard processes, the DRAM tier
   off so reads come from the device); then the same randread job through the SDK (one
   thread keeping QD reads in flight, wqs-bench's libaio model) over shared memory
   (``wqs``) and over TCP (``wqs-tcp``). CPU per IO: this process (the SDK) and the
   daemon (its Stats, every shard).
4. **wqs-aio**: the same daemon and job on the AIO/O_DIRECT backend, on a file as large
   as the namespace in --aio-dir (default /dev/shm: in RAM, as the namespace is), over
   shared memory.

Before the timed runs each WQS system reads for a second, which lays its blocks out
(every block written once, as fio lays out its file) and warms the daemon. Each point
then runs --repeat times, interleaved; the table shows medians: IOPS, the ratio to
perf's, latency, CPU µs and context switches per IO, and the load of other processes
on the cores the run used (the busy share of those cores that was not the run's own:
a shared machine's noise, in numbers).
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .compare import Point, Services, bench_point, log
from .fioparse import parse_size
from .nvmf import NvmfTarget
from .procs import ROOT, _wait_port, free_ports, stop

MiB = 1 << 20


@dataclass
class PerfRun:
    iops: float
    mib_s: float
    avg_us: float
    ios: int
    cpu_us_per_io: float
    ctx_per_io: float
    others_pct: float = 0.0


def run_perf(bin_dir: str, lib_dir: str, target: NvmfTarget, bs: int, qd: int,
             runtime: float, cpu: int) -> PerfRun:
    """spdk_nvme_perf randread on namespace 1, pinned to `cpu`; its CPU from wait4."""
    cmd = [os.path.join(bin_dir, "spdk_nvme_perf"), "-q", str(qd), "-o", str(bs),
           "-w", "randread", "-t", str(max(1, round(runtime))), "-c", hex(1 << cpu),
           "--no-huge", "-s", "512", "-r", f"{target.perf_target(1)}"]
    env = dict(os.environ, LD_LIBRARY_PATH=lib_dir)
    busy = CoreLoad({cpu})
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"spdk_nvme_perf failed ({proc.returncode}):\n{text[-3000:]}")
    total = next((ln for ln in text.splitlines() if ln.lstrip().startswith("Total")), None)
    if total is None:
        raise RuntimeError(f"no Total line in spdk_nvme_perf's output:\n{text[-3000:]}")
    iops, mib_s, avg_us = (float(x) for x in total.split(":", 1)[1].split()[:3])
    ios = int(iops * max(1, round(runtime)))
    cpu_s = usage.ru_utime + usage.ru_stime
    ctx = usage.ru_nvcsw + usage.ru_nivcsw
    return PerfRun(iops, mib_s, avg_us, ios, cpu_s * 1e6 / ios if ios else 0.0,
                   ctx / ios if ios else 0.0, busy.others_pct(cpu_s))


class CoreLoad:
    """How busy some cores were from now until others_pct, from /proc/stat: the time
    processes ran there (user, nice, system) out of all their time. Interrupt and
    softirq time count as not busy: it is mostly the run's own loopback TCP, and no
    process's CPU time includes it."""

    def __init__(self, cpus: set[int]) -> None:
        self.cpus = cpus
        self.start = self._ticks()

    def _ticks(self) -> tuple[int, int]:
        """(ticks processes ran, all ticks) on the cores."""
        ran = total = 0
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                core = name[3:]
                if name.startswith("cpu") and core.isdigit() and int(core) in self.cpus:
                    v = [int(x) for x in fields[:8]]  # user nice system idle iowait irq
                    ran += v[0] + v[1] + v[2]  # softirq steal
                    total += sum(v)
        return ran, total

    def others_pct(self, own_cpu_s: float) -> float:
        """Percent of the cores' time that processes other than own_cpu_s's ran."""
        ran, total = self._ticks()
        ran, total = ran - self.start[0], total - self.start[1]
        if total <= 0:
            return 0.0
        return max(0.0, 100.0 * (ran - own_cpu_s * os.sysconf("SC_CLK_TCK")) / total)


class WqsDaemon:
    """wqsd on a device (formatted first: an SPDK namespace, or a file of `file_size`
    created for it), its log in the work folder."""

    def __init__(self, work: str, device: str, workers: int, *, lib_dir: str | None = None,
                 poll_wait_us: int = 0, file_size: int | None = None) -> None:
        os.makedirs(work, exist_ok=True)
        self.port = free_ports(3)
        self.address = f"127.0.0.1:{self.port}"
        cfg = os.path.join(work, "wqsd.yaml")
        engine: dict[str, Any] = {"dram_cache_bytes": 0}
        fmt_opts = ["--shards", str(workers)]
        if lib_dir is not None:
            engine["spdk"] = {"lib_dir": lib_dir, "mem_size": "1GiB",
                              "poll_wait_us": poll_wait_us}
            fmt_opts += ["--spdk-lib-dir", lib_dir]
        if file_size is not None:
            fmt_opts += ["--size", str(file_size)]
        with open(cfg, "w") as f:
            json.dump({"device": device, "workers": workers, "metrics_listen": "off",
                       "data_dir": work, "engine": engine}, f)
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"]
                                         if env.get("PYTHONPATH") else "")
        fmt = subprocess.run([sys.executable, "-m", "wqs.cli", "format", device, "--force",
                              "-y", *fmt_opts],
                             capture_output=True, text=True, env=env, cwd=str(ROOT))
        if fmt.returncode != 0:
            raise RuntimeError(f"wqs format failed: {fmt.stderr}")
        self.log_path = Path(work) / "wqsd.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wqs.daemon", "--config", cfg, "--listen", self.address,
             "--log-level", "warning"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=str(ROOT), env=env)
        try:
            _wait_port(self.port, self.proc, 120, "wqsd", self.log_path)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        stop(self.proc)
        self._log.close()


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {__package__ or 'bench'}.spdk_compare",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--spdk-lib-dir", required=True,
                    help="directory of SPDK's shared libraries (libspdk_nvme.so, ...)")
    ap.add_argument("--spdk-bin-dir", required=True,
                    help="directory of SPDK's programs (nvmf_tgt, spdk_nvme_perf)")
    ap.add_argument("--bs", default="64k", help="block size (default 64k)")
    ap.add_argument("--iodepth", "--qd", type=int, default=32, help="queue depth (default 32)")
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds per run (default 5)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per system, medians shown")
    ap.add_argument("--size", default="512m", help="blocks WQS reads over (default 512m)")
    ap.add_argument("--workers", type=int, default=1,
                    help="daemon shard processes (default 1: one core is the target's)")
    ap.add_argument("--poll-wait-us", type=int, default=0,
                    help="the daemon's engine.spdk.poll_wait_us (default 0, as wqsd's)")
    ap.add_argument("--systems", default="perf,wqs,wqs-tcp,wqs-aio",
                    help="subset of perf,wqs,wqs-tcp,wqs-aio")
    ap.add_argument("--aio-dir", default="/dev/shm",
                    help="wqs-aio's device file goes here (default /dev/shm: in RAM, as the "
                         "target's namespace is; O_DIRECT there needs Linux 6.6+)")
    ap.add_argument("--json", metavar="FILE", help="also write every run as JSON")
    args = ap.parse_args(argv)

    bs, qd, size = parse_size(args.bs), args.iodepth, parse_size(args.size)
    systems = [s for s in args.systems.split(",") if s]
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        ap.error("needs two CPUs: one for the target's reactor, one for the rest")
    target_cpu, mine = cpus[-1], set(cpus[:-1])

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    work = tempfile.mkdtemp(prefix="wqs-spdk-compare-", dir="/var/tmp")
    services = Services()
    services.add(lambda: shutil.rmtree(work, ignore_errors=True))
    os.sched_setaffinity(0, mine)  # this process and what it starts: off the target's core
    perf_runs: list[PerfRun] = []
    points: list[Point] = []
    others: dict[int, float] = {}  # id(point) -> others' load on our cores, percent
    try:
        from .engines import WqsEngine

        ns_mib = size // MiB + 256
        target = NvmfTarget(os.path.join(args.spdk_bin_dir, "nvmf_tgt"), args.spdk_lib_dir,
                            os.path.join(work, "nvmf"), free_ports(1), [ns_mib],
                            cpu=target_cpu, interrupt=False)
        target.start()
        services.add(target.stop)
        log(f"nvmf_tgt pid {target.proc.pid} on core {target_cpu}, port {target.port}, "
            f"namespace {ns_mib} MiB")
        engines: dict[str, Any] = {}
        if "wqs" in systems or "wqs-tcp" in systems:
            daemon = WqsDaemon(os.path.join(work, "wqs"), target.device(1), args.workers,
                               lib_dir=args.spdk_lib_dir, poll_wait_us=args.poll_wait_us)
            services.add(daemon.stop)
            for name, transport in (("wqs", None), ("wqs-tcp", "tcp")):
                if name in systems:
                    engines[name] = WqsEngine([daemon.address], transport=transport)
                    services.add(engines[name].close)
        if "wqs-aio" in systems:
            # The same daemon on the AIO/O_DIRECT backend, on a file as large as the
            # namespace: what the SPDK backend costs or saves against the kernel's path.
            path = os.path.join(args.aio_dir, f"wqs-spdk-compare-{os.getpid()}.dev")
            services.add(lambda: os.path.exists(path) and os.unlink(path))
            aio = WqsDaemon(os.path.join(work, "wqs-aio"), path, args.workers,
                            file_size=ns_mib * MiB)
            services.add(aio.stop)
            engines["wqs-aio"] = WqsEngine([aio.address])
            services.add(engines["wqs-aio"].close)
            log(f"wqs-aio: on {path}")
        for s in systems:  # lay the blocks out, warm the daemon up
            if s != "perf":
                bench_point(s, engines[s], "read", bs, qd, size, 1.0)
        for k in range(args.repeat):
            for s in systems:
                if s == "perf":
                    r = run_perf(args.spdk_bin_dir, args.spdk_lib_dir, target, bs, qd,
                                 args.runtime, min(mine))
                    perf_runs.append(r)
                    log(f"run {k + 1}: perf {r.iops:,.0f} IOPS, {r.cpu_us_per_io:.1f} µs "
                        f"CPU per IO, others {r.others_pct:.0f}%")
                else:
                    busy = CoreLoad(mine)
                    p = bench_point(s, engines[s], "read", bs, qd, size, args.runtime)
                    own = (_cpu(p, "cli") + _cpu(p, "srv")) * p.ios / 1e6
                    others[id(p)] = busy.others_pct(own)
                    points.append(p)
                    log(f"run {k + 1}: {s} {p.iops:,.0f} IOPS ({p.errors} errors), "
                        f"others {others[id(p)]:.0f}%")
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        services.close()

    perf_iops = _median([r.iops for r in perf_runs])
    print(f"\nrandread, bs {bs >> 10} KiB, QD {qd}, {args.repeat} × {args.runtime:g} s, "
          f"medians; target on core {target_cpu}, the rest on {sorted(mine)}")
    print(f"{'system':8} {'IOPS':>8} {'MiB/s':>7} {'× perf':>6} {'lat µs':>12} "
          f"{'client µs/IO':>12} {'daemon µs/IO':>12} {'ctx/IO':>6} {'others':>6} "
          f"{'errors':>6}")
    if perf_runs:
        lat = f"avg {_median([r.avg_us for r in perf_runs]):,.0f}"
        print(f"{'perf':8} {perf_iops:>8,.0f} {_median([r.mib_s for r in perf_runs]):>7,.1f} "
              f"{1.0:>6.2f} {lat:>12} "
              f"{_median([r.cpu_us_per_io for r in perf_runs]):>12.1f} {'-':>12} "
              f"{_median([r.ctx_per_io for r in perf_runs]):>6.2f} "
              f"{_median([r.others_pct for r in perf_runs]):>5.0f}% {0:>6}")
    for s in systems:
        runs = [p for p in points if p.system == s]
        if not runs:
            continue
        iops = _median([p.iops for p in runs])
        ratio = f"{iops / perf_iops:.2f}" if perf_iops else "-"
        lat = f"p50 {_median([p.p50_us for p in runs]):,.0f}"
        ctx = _median([(p.cli_ctx or 0) + (p.srv_ctx or 0) for p in runs])
        print(f"{s:8} {iops:>8,.0f} {_median([p.mib_s for p in runs]):>7,.1f} {ratio:>6} "
              f"{lat:>12} {_median([_cpu(p, 'cli') for p in runs]):>12.1f} "
              f"{_median([_cpu(p, 'srv') for p in runs]):>12.1f} {ctx:>6.2f} "
              f"{_median([others[id(p)] for p in runs]):>5.0f}% "
              f"{sum(p.errors for p in runs):>6}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"perf": [asdict(r) for r in perf_runs],
                       "wqs": [dict(asdict(p), others_pct=others[id(p)]) for p in points],
                       "args": vars(args)}, f, indent=1)
    return 0


def _cpu(p: Point, who: str) -> float:
    """CPU µs per IO of the client ("cli") or the daemon ("srv")."""
    return (getattr(p, f"{who}_usr_us") or 0.0) + (getattr(p, f"{who}_sys_us") or 0.0)


if __name__ == "__main__":
    sys.exit(main())
