"""Results the way fio prints them: the normal text report and fio's JSON.

JSON keys, units and layout follow fio 3.33 (``fio --output-format=json``): per job
``read``/``write``/``trim``/``sync`` with ``io_bytes``, ``bw`` (KiB/s), ``bw_bytes``,
``iops``, ``runtime`` (ms), ``slat_ns``/``clat_ns``/``lat_ns`` (``min``, ``max``,
``mean``, ``stddev``, ``N`` and, when there were IOs, ``percentile`` keyed like
``"99.000000"``), bandwidth and IOPS samples (every 500 ms, like fio's bw_avg_time),
``iodepth_level``, ``latency_ns``/``latency_us``/``latency_ms`` distributions, CPU and
context-switch counters, so tools that parse fio's JSON parse this too. What fio has no
key for goes under ``"wqs"`` (per job: misses, verify errors, engine; CPU and context
switches per request of wqs-bench itself, ``cpu_client``, and of the servers,
``cpu_daemon`` (see `bench.usage`); for prefix workloads the KV-cache figures).

Latency percentiles are exact (nearest rank over every sample), where fio reads them off
a log-linear histogram (within ~1.6 %).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .fioparse import JobSpec, describe_bs, num2str

SAMPLE_MS = 500  # fio's bw_avg_time / iops_avg_time default
DDIRS = ("read", "write")

_NS_KEYS = ["2", "4", "10", "20", "50", "100", "250", "500", "750", "1000"]
_MS_KEYS = _NS_KEYS + ["2000", ">=2000"]


@dataclass
class DirData:
    """Every IO of one direction: total latency, submission latency, completion time, size."""

    lat: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    slat: np.ndarray | None = None  # None: a synchronous engine, no separate submission
    end: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # ns from start
    nbytes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def n(self) -> int:
        return int(self.lat.size)

    @property
    def io_bytes(self) -> int:
        return int(self.nbytes.sum()) if self.nbytes.size else 0

    @staticmethod
    def merge(parts: list["DirData"]) -> "DirData":
        if not parts:
            return DirData()
        slats = [p.slat for p in parts if p.slat is not None]
        return DirData(
            lat=np.concatenate([p.lat for p in parts]),
            slat=np.concatenate(slats) if len(slats) == len(parts) and slats else None,
            end=np.concatenate([p.end for p in parts]),
            nbytes=np.concatenate([p.nbytes for p in parts]),
        )


@dataclass
class JobResult:
    """One job clone (or, after grouping, a group of them)."""

    spec: JobSpec
    name: str
    groupid: int
    clone: int
    jobs: int = 1
    dirs: dict[str, DirData] = field(default_factory=lambda: {d: DirData() for d in DDIRS})
    runtime_ns: int = 0
    error: int = 0
    errors: list[str] = field(default_factory=list)
    misses: int = 0
    verify_errors: int = 0
    verified: int = 0
    failed_puts: int = 0
    layout_blocks: int = 0
    usr_cpu: float = 0.0
    sys_cpu: float = 0.0
    ctx: int = 0
    majf: int = 0
    minf: int = 0
    pid: int = field(default_factory=os.getpid)
    started: float = field(default_factory=time.time)
    engine: str = ""
    kvcache: dict[str, Any] | None = None
    extra_lat: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. lookup latency
    # Per-request CPU and context switches (bench.usage): of this process, and of the
    # servers (None: the engine has no server). Per run group, see runner._attach_usage.
    cpu_client: dict[str, Any] | None = None
    cpu_daemon: dict[str, Any] | None = None
    # How the IO was driven (bench.runner): "async" (one thread, calls in flight),
    # "threads" (a thread per call) or "streams" (prefix replay); the threads that did it;
    # the most blocks in flight at once (timed part); failed blocks' reasons by kind.
    io_model: str = ""
    io_threads: int = 0
    inflight_max: int = 0
    item_errors: dict[str, dict[str, Any]] = field(default_factory=dict)
    # fio's io_u_map / io_u_submit / io_u_complete counts (7 buckets each), measured by
    # the runner; None: not measured (iodepth_level then shows the configured depth)
    depth_hist: list[int] | None = None
    submit_hist: list[int] | None = None
    complete_hist: list[int] | None = None


def _sum_hists(hists: list[list[int] | None]) -> list[int] | None:
    if not hists or any(h is None for h in hists):
        return None
    return [sum(x) for x in zip(*hists)]  # type: ignore[misc]


def merge_results(results: list[JobResult]) -> JobResult:
    """fio's group_reporting: the group's jobs as one."""
    first = results[0]
    out = JobResult(spec=first.spec, name=first.name, groupid=first.groupid, clone=0,
                    jobs=len(results), pid=first.pid, started=first.started,
                    engine=first.engine)
    for d in DDIRS:
        out.dirs[d] = DirData.merge([r.dirs[d] for r in results])
    out.runtime_ns = max(r.runtime_ns for r in results)
    out.error = next((r.error for r in results if r.error), 0)
    out.errors = [e for r in results for e in r.errors]
    for attr in ("misses", "verify_errors", "verified", "failed_puts", "layout_blocks"):
        setattr(out, attr, sum(getattr(r, attr) for r in results))
    out.usr_cpu, out.sys_cpu = first.usr_cpu, first.sys_cpu  # process-wide already
    models = sorted({r.io_model for r in results if r.io_model})
    out.io_model = "+".join(models)
    out.io_threads = sum(r.io_threads for r in results)
    out.inflight_max = max(r.inflight_max for r in results)  # per job: the deepest one
    for r in results:
        for kind, e in r.item_errors.items():
            mine = out.item_errors.setdefault(kind, {"count": 0, "first": e["first"]})
            mine["count"] += e["count"]
    out.depth_hist = _sum_hists([r.depth_hist for r in results])
    out.submit_hist = _sum_hists([r.submit_hist for r in results])
    out.complete_hist = _sum_hists([r.complete_hist for r in results])
    out.ctx, out.majf, out.minf = first.ctx, first.majf, first.minf
    # Per group already; with group_reporting the group is this one job.
    out.cpu_client = first.cpu_client and {**first.cpu_client, "scope": "job"}
    out.cpu_daemon = first.cpu_daemon and {**first.cpu_daemon, "scope": "job"}
    kv = [r.kvcache for r in results if r.kvcache]
    if kv:
        out.kvcache = merge_kvcache(kv)
    keys = {k for r in results for k in r.extra_lat}
    out.extra_lat = {k: np.concatenate([r.extra_lat[k] for r in results if k in r.extra_lat])
                     for k in keys}
    return out


def merge_kvcache(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in parts:
        for k, v in p.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith(
                    ("_rate", "_ratio", "_bytes_per_token", "block_bytes", "block_tokens")):
                out[k] = out.get(k, 0) + v
            else:
                out.setdefault(k, v)
    finish_kvcache(out)
    return out


def finish_kvcache(kv: dict[str, Any]) -> None:
    """Derived ratios from the counters (after a merge, too)."""
    looked = kv.get("prompt_tokens", 0)
    kv["token_hit_rate"] = kv.get("hit_tokens", 0) / looked if looked else 0.0
    blocks = kv.get("lookup_blocks", 0)
    kv["block_hit_rate"] = kv.get("hit_blocks", 0) / blocks if blocks else 0.0
    total = kv.get("bytes_loaded", 0) + kv.get("bytes_recomputed", 0)
    kv["loaded_ratio"] = kv.get("bytes_loaded", 0) / total if total else 0.0


# ------------------------------------------------------------------------------ numbers


def lat_stats(values: np.ndarray | None, percentiles: list[float] | None) -> dict[str, Any]:
    if values is None or values.size == 0:
        return {"min": 0, "max": 0, "mean": 0.0, "stddev": 0.0, "N": 0}
    v = values.astype(np.float64)
    out: dict[str, Any] = {
        "min": int(values.min()), "max": int(values.max()), "mean": float(v.mean()),
        "stddev": float(v.std(ddof=1)) if v.size > 1 else 0.0, "N": int(values.size),
    }
    if percentiles:
        qs = np.percentile(values, percentiles, method="inverted_cdf")
        out["percentile"] = {f"{p:f}": int(q) for p, q in zip(percentiles, qs)}
    return out


def _samples(d: DirData, runtime_ns: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-500 ms bandwidth (KiB/s) and IOPS over the whole windows of the run."""
    windows = int(runtime_ns // (SAMPLE_MS * 1_000_000))
    if windows <= 0 or d.n == 0:
        return np.zeros(0), np.zeros(0)
    idx = (d.end // (SAMPLE_MS * 1_000_000)).astype(np.int64)
    keep = idx < windows
    by = np.bincount(idx[keep], weights=d.nbytes[keep], minlength=windows)[:windows]
    ios = np.bincount(idx[keep], minlength=windows)[:windows]
    scale = 1000.0 / SAMPLE_MS
    return by * scale / 1024.0, ios * scale


def _sample_stats(x: np.ndarray) -> tuple[int, int, float, float, int]:
    if x.size == 0:
        return 0, 0, 0.0, 0.0, 0
    dev = float(x.std(ddof=1)) if x.size > 1 else 0.0
    return int(x.min()), int(x.max()), float(x.mean()), dev, int(x.size)


def dir_json(d: DirData, runtime_ns: int, spec: JobSpec, group_kib_s: float) -> dict[str, Any]:
    runtime_ms = int(round(runtime_ns / 1e6)) if d.n else 0
    secs = runtime_ns / 1e9 if runtime_ns else 0.0
    io_bytes = d.io_bytes
    bw_bytes = int(io_bytes / secs) if secs and d.n else 0
    iops = d.n / secs if secs and d.n else 0.0
    clat_p = spec.percentile_list if spec.clat_percentiles and d.n else None
    lat_p = spec.percentile_list if spec.lat_percentiles and d.n else None
    slat_p = spec.percentile_list if spec.slat_percentiles and d.n and d.slat is not None else None
    clat = d.lat - d.slat if d.slat is not None else d.lat
    bw_s, iops_s = _samples(d, runtime_ns)
    bmin, bmax, bmean, bdev, bn = _sample_stats(bw_s)
    imin, imax, imean, idev, inn = _sample_stats(iops_s)
    return {
        "io_bytes": io_bytes, "io_kbytes": io_bytes // 1024, "bw_bytes": bw_bytes,
        "bw": bw_bytes // 1024, "iops": iops, "runtime": runtime_ms, "total_ios": d.n,
        "short_ios": 0, "drop_ios": 0,
        "slat_ns": lat_stats(d.slat, slat_p),
        "clat_ns": lat_stats(clat, clat_p),
        "lat_ns": lat_stats(d.lat, lat_p),
        "bw_min": bmin, "bw_max": bmax,
        "bw_agg": (bmean / group_kib_s * 100.0) if group_kib_s and bn else 0.0,
        "bw_mean": bmean, "bw_dev": bdev, "bw_samples": bn,
        "iops_min": imin, "iops_max": imax, "iops_mean": imean, "iops_stddev": idev,
        "iops_samples": inn,
    }


def _empty_dir() -> dict[str, Any]:
    z = {"min": 0, "max": 0, "mean": 0.0, "stddev": 0.0, "N": 0}
    return {"io_bytes": 0, "io_kbytes": 0, "bw_bytes": 0, "bw": 0, "iops": 0.0, "runtime": 0,
            "total_ios": 0, "short_ios": 0, "drop_ios": 0, "slat_ns": dict(z),
            "clat_ns": dict(z), "lat_ns": dict(z), "bw_min": 0, "bw_max": 0, "bw_agg": 0.0,
            "bw_mean": 0.0, "bw_dev": 0.0, "bw_samples": 0, "iops_min": 0, "iops_max": 0,
            "iops_mean": 0.0, "iops_stddev": 0.0, "iops_samples": 0}


def lat_distribution(lat: np.ndarray) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """fio's latency_ns / latency_us / latency_ms: % of IOs per bucket, tiny ones as 0.01."""
    total = lat.size
    ns = {k: 0.0 for k in _NS_KEYS}
    us = {k: 0.0 for k in _NS_KEYS}
    ms = {k: 0.0 for k in _MS_KEYS}
    if not total:
        return ns, us, ms

    def fill(target: dict[str, float], values: np.ndarray, keys: list[str]) -> None:
        # a value counts under the first key it is below (">=2000": at or above 2000)
        if not values.size:
            return
        bounds = np.array([int(k) for k in keys if not k.startswith(">")])
        idx = np.minimum(np.searchsorted(bounds, values, side="right"), len(keys) - 1)
        for k, c in zip(keys, np.bincount(idx, minlength=len(keys))):
            if c:
                pct = c / total * 100.0
                target[k] = pct if pct >= 0.01 else 0.01

    fill(ns, lat[lat < 1000], _NS_KEYS)
    fill(us, lat[(lat >= 1000) & (lat < 1_000_000)] // 1000, _NS_KEYS)
    fill(ms, lat[lat >= 1_000_000] // 1_000_000, _MS_KEYS)
    return ns, us, ms


def _depth_key(n: int, keys: list[str]) -> str:
    nums = [int(k) for k in keys if not k.startswith(">")]
    best = keys[0]
    for k, v in zip(keys, nums):
        if n >= v:
            best = k
    if n >= 64:
        best = ">=64"
    return best


def job_json(r: JobResult, group_kib: dict[str, float], elapsed_s: int) -> dict[str, Any]:
    spec = r.spec
    all_lat = np.concatenate([r.dirs[d].lat for d in DDIRS])
    lns, lus, lms = lat_distribution(all_lat)
    depth_keys = ["1", "2", "4", "8", "16", "32", ">=64"]
    depth = {k: 0.0 for k in depth_keys}
    batch_keys = ["0", "4", "8", "16", "32", "64", ">=64"]
    submit = {k: 0.0 for k in batch_keys}
    complete = {k: 0.0 for k in batch_keys}
    if all_lat.size and r.depth_hist is not None and sum(r.depth_hist):
        # measured, as fio counts them: IOs by blocks in flight when their call was
        # submitted; submissions and reaps by how many blocks each carried
        for dist, hist, keys in ((depth, r.depth_hist, depth_keys),
                                 (submit, r.submit_hist, batch_keys),
                                 (complete, r.complete_hist, batch_keys)):
            total = sum(hist or ())
            for k, n in zip(keys, hist or ()):
                dist[k] = n / total * 100.0 if total else 0.0
    elif all_lat.size:
        depth[_depth_key(spec.iodepth, depth_keys)] = 100.0
        bk = "4" if spec.iodepth_batch <= 4 else _depth_key(spec.iodepth_batch, batch_keys)
        submit[bk] = 100.0
        complete[bk] = 100.0
    out: dict[str, Any] = {
        "jobname": r.name, "groupid": r.groupid, "error": r.error, "eta": 0,
        "elapsed": elapsed_s,
        "job options": {k: v for k, v in spec.options.items() if v != ""},
    }
    for d in DDIRS:
        out[d] = dir_json(r.dirs[d], r.runtime_ns, spec, group_kib.get(d, 0.0)) \
            if r.dirs[d].n else _empty_dir()
    out["trim"] = _empty_dir()
    out["sync"] = {"total_ios": 0, "lat_ns": {"min": 0, "max": 0, "mean": 0.0, "stddev": 0.0,
                                              "N": 0}}
    out.update({
        "job_runtime": int(r.runtime_ns // 1_000_000), "usr_cpu": r.usr_cpu,
        "sys_cpu": r.sys_cpu, "ctx": r.ctx, "majf": r.majf, "minf": r.minf,
        "iodepth_level": depth, "iodepth_submit": submit, "iodepth_complete": complete,
        "latency_ns": lns, "latency_us": lus, "latency_ms": lms,
        "latency_depth": spec.iodepth, "latency_target": 0, "latency_percentile": 100.0,
        "latency_window": 0,
    })
    wqs: dict[str, Any] = {
        "engine": r.engine, "jobs": r.jobs, "misses": r.misses,
        "verify": spec.verify is not None, "verified_blocks": r.verified,
        "verify_errors": r.verify_errors, "failed_puts": r.failed_puts,
        "layout_blocks": r.layout_blocks, "errors": r.errors[:20],
        "io_model": r.io_model, "io_threads": r.io_threads, "inflight_max": r.inflight_max,
    }
    if r.item_errors:
        wqs["item_errors"] = r.item_errors
    for k, v in r.extra_lat.items():
        wqs[f"{k}_lat_ns"] = lat_stats(v, spec.percentile_list)
    if r.cpu_client is not None:
        wqs["cpu_client"] = r.cpu_client
    if r.cpu_daemon is not None:
        wqs["cpu_daemon"] = r.cpu_daemon
    if r.kvcache is not None:
        wqs["kvcache"] = r.kvcache
    out["wqs"] = wqs
    return out


@dataclass
class GroupStatus:
    groupid: int
    agg: dict[str, float]  # bytes/s
    min_bw: dict[str, float]
    max_bw: dict[str, float]
    io: dict[str, int]
    min_run: dict[str, int]  # ms
    max_run: dict[str, int]


def group_status(results: list[JobResult], gid: int) -> GroupStatus:
    gs = GroupStatus(gid, {}, {}, {}, {}, {}, {})
    for d in DDIRS:
        rs = [r for r in results if r.groupid == gid and r.dirs[d].n]
        if not rs:
            continue
        runs = [max(1, int(round(r.runtime_ns / 1e6))) for r in rs]
        bws = [r.dirs[d].io_bytes / (run / 1e3) for r, run in zip(rs, runs)]
        gs.io[d] = sum(r.dirs[d].io_bytes for r in rs)
        gs.max_run[d], gs.min_run[d] = max(runs), min(runs)
        gs.agg[d] = gs.io[d] / (gs.max_run[d] / 1e3)
        gs.min_bw[d], gs.max_bw[d] = min(bws), max(bws)
    return gs


# ------------------------------------------------------------------------------- JSON


def to_json(results: list[JobResult], global_options: dict[str, str], started: float,
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    groups = sorted({r.groupid for r in results})
    status = {g: group_status(results, g) for g in groups}
    elapsed = int(round(time.time() - started))
    doc: dict[str, Any] = {
        "fio version": "fio-3.33",
        "timestamp": int(started),
        "timestamp_ms": int(started * 1000),
        "time": time.strftime("%a %b %d %H:%M:%S %Y", time.localtime(started)),
    }
    if global_options:
        shown = {k: v for k, v in global_options.items() if v != ""}  # bare flags: not listed
        if shown:
            doc["global options"] = shown
    doc["jobs"] = [job_json(r, {d: status[r.groupid].agg.get(d, 0.0) / 1024 for d in DDIRS},
                            elapsed) for r in results]
    doc["wqs"] = {"wqs-bench": True, **(extra or {})}
    return doc


# ------------------------------------------------------------------------ normal text


def _lat_line(name: str, stats: dict[str, Any]) -> str:
    mn, mx, mean, dev = stats["min"], stats["max"], stats["mean"], stats["stddev"]
    base = "nsec"
    if mn > 1_000_000 and mean > 1_000_000:
        base, div = "msec", 1_000_000
    elif mn > 1000 and mean > 1000:
        base, div = "usec", 1000
    else:
        div = 1
    mn, mx, mean, dev = mn // div, mx // div, mean / div, dev / div
    return (f"    {name} ({base}): min={num2str(mn, 6)}, max={num2str(mx, 6)}, "
            f"avg={mean:5.2f}, stdev={dev:5.2f}")


def _percentile_lines(title: str, pct: dict[str, int]) -> list[str]:
    plist = [float(k) for k in pct]
    vals = list(pct.values())
    minv, maxv = min(vals), max(vals)
    if minv > 2_000_000 and maxv > 99_999_999:
        unit, scale = "msec", 2
    elif minv > 2000 and maxv > 99_999:
        unit, scale = "usec", 1
    else:
        unit, scale = "nsec", 0
    shown = []
    for v in vals:
        for _ in range(scale):
            v = (v + 999) // 1000
        shown.append(v)
    width = max(5, len(str(max(shown))))
    precision = max((len(f"{p:g}".split(".")[1]) if "." in f"{p:g}" else 0) for p in plist)
    precision = max(2, precision)
    lines = [f"    {title} percentiles ({unit}):"]
    row = "     |"
    for j, (p, v) in enumerate(zip(plist, shown)):
        last = j == len(plist) - 1
        row += f" {p:{precision + 3}.{precision}f}th=[{v:{width}d}]" + ("" if last else ",")
        if last or j % 4 == 3:
            lines.append(row)
            row = "     |"
    return lines


def _dir_lines(d: str, j: dict[str, Any], spec: JobSpec) -> list[str]:
    secs_ms = j["runtime"]
    iops = num2str(j["iops"], 4)
    bw = num2str(j["bw_bytes"], 4, 1024, "B/s")
    bw_alt = num2str(j["bw_bytes"], 4, 1000, "B/s")
    io = num2str(j["io_bytes"], 4, 1024, "B")
    lines = [f"  {d}: IOPS={iops}, BW={bw} ({bw_alt})({io}/{secs_ms}msec)"]
    if j["slat_ns"]["N"]:
        lines.append(_lat_line("slat", j["slat_ns"]))
    if j["clat_ns"]["N"]:
        lines.append(_lat_line("clat", j["clat_ns"]))
    if j["lat_ns"]["N"]:
        lines.append(_lat_line(" lat", j["lat_ns"]))
    for key, title in (("slat_ns", "slat"), ("clat_ns", "clat"), ("lat_ns", " lat")):
        if "percentile" in j[key]:
            lines.extend(_percentile_lines(title.strip() if key != "lat_ns" else "lat",
                                           j[key]["percentile"]))
    if j["bw_samples"]:
        mn, mx, mean, dev = j["bw_min"], j["bw_max"], j["bw_mean"], j["bw_dev"]
        unit = "KiB"
        if mean > 1024 * 1024:
            mn, mx, mean, dev, unit = mn // 1024, mx // 1024, mean / 1024, dev / 1024, "MiB"
        lines.append(f"   bw ({unit:>5s}/s): min={mn:5d}, max={mx:5d}, per={j['bw_agg']:3.2f}%, "
                     f"avg={mean:5.2f}, stdev={dev:5.2f}, samples={j['bw_samples']}")
        lines.append(f"   iops        : min={j['iops_min']:5d}, max={j['iops_max']:5d}, "
                     f"avg={j['iops_mean']:5.2f}, stdev={j['iops_stddev']:5.2f}, "
                     f"samples={j['iops_samples']}")
    return lines


def _dist_lines(name: str, dist: dict[str, float]) -> list[str]:
    lines, cur, count = [], "", 0
    for k, v in dist.items():
        if v <= 0:
            continue
        if count == 0:
            cur = f"  lat ({name})   : "
        else:
            cur += ", "
        cur += f"{k}={v:3.2f}%"
        count += 1
        if count == 5:
            lines.append(cur)
            count = 0
    if count:
        lines.append(cur)
    return lines


def header_lines(specs: list[JobSpec], groups: list[int], engine_desc: str) -> list[str]:
    """What fio prints before a run: one line per job section, version, 'Starting'."""
    lines = []
    total = 0
    for spec, g in zip(specs, groups):
        eng = spec.ioengine
        if spec.workload == "prefix":
            lines.append(f"{spec.name}: (g={g}): workload=prefix, model={spec.model}, "
                         f"block_tokens={spec.block_tokens}, kv_dtype={spec.kv_dtype}, "
                         f"conversations={spec.conversations}, ioengine={eng}, "
                         f"iodepth={spec.iodepth}")
        else:
            lines.append(f"{spec.name}: (g={g}): rw={spec.rw}, bs={describe_bs(spec)}, "
                         f"ioengine={eng}, iodepth={spec.iodepth}")
        if spec.numjobs > 1:
            lines.append("...")
        total += spec.numjobs
    from wqs import __version__

    lines.append(f"wqs-bench-{__version__} ({engine_desc})")
    lines.append(f"Starting {total} thread{'s' if total != 1 else ''}")
    return lines


def normal_text(results: list[JobResult], doc: dict[str, Any]) -> str:
    out: list[str] = []
    for r, j in zip(results, doc["jobs"]):
        when = time.strftime("%a %b %d %H:%M:%S %Y", time.localtime(r.started))
        out.append("")
        out.append(f"{r.name}: (groupid={r.groupid}, jobs={r.jobs}): err={r.error:2d}: "
                   f"pid={r.pid}: {when}")
        if r.spec.workload == "prefix" and r.kvcache:
            out.extend(kvcache_lines(r.kvcache))
        for d in DDIRS:
            if j[d]["total_ios"]:
                label = d
                if r.spec.workload == "prefix":
                    label = {"read": "read (get hits, per turn)",
                             "write": "write (put misses, per turn)"}[d]
                out.extend(_dir_lines(label, j[d], r.spec))
        for k, v in j["wqs"].items():
            if k.endswith("_lat_ns") and v["N"]:
                out.append(_lat_line(k[: -len("_lat_ns")], v).replace("    ", "  ", 1))
                if "percentile" in v:
                    out.extend(_percentile_lines(k[: -len("_lat_ns")], v["percentile"]))
        out.extend(_dist_lines("nsec", j["latency_ns"]))
        out.extend(_dist_lines("usec", j["latency_us"]))
        out.extend(_dist_lines("msec", j["latency_ms"]))
        out.append(f"  cpu          : usr={j['usr_cpu']:3.2f}%, sys={j['sys_cpu']:3.2f}%, "
                   f"ctx={j['ctx']}, majf={j['majf']}, minf={j['minf']}")
        out.extend(cpu_lines("cpu client", j["wqs"].get("cpu_client"), r.groupid))
        out.extend(cpu_lines("cpu daemon", j["wqs"].get("cpu_daemon"), r.groupid))
        dl = j["iodepth_level"]
        out.append("  IO depths    : " + ", ".join(f"{k}={v:3.1f}%" for k, v in dl.items()))
        out.append("     submit    : " + ", ".join(f"{k}={v:3.1f}%" for k, v in j["iodepth_submit"].items()))
        out.append("     complete  : " + ", ".join(f"{k}={v:3.1f}%" for k, v in j["iodepth_complete"].items()))
        out.append(f"     issued rwts: total={j['read']['total_ios']},{j['write']['total_ios']},0,0 "
                   f"short=0,0,0,0 dropped=0,0,0,0")
        out.append(f"     latency   : target=0, window=0, percentile=100.00%, "
                   f"depth={j['latency_depth']}")
        w = j["wqs"]
        line = f"  wqs          : engine={w['engine']}, misses={w['misses']}"
        if w["verify"]:
            line += f", verified={w['verified_blocks']}, verify_errors={w['verify_errors']}"
        if w["failed_puts"]:
            line += f", failed_puts={w['failed_puts']}"
        if w["layout_blocks"]:
            line += f", laid_out={w['layout_blocks']}"
        out.append(line)
        if w.get("io_model"):
            threads = w["io_threads"]
            most = w["inflight_max"]
            out.append(f"  wqs io       : {w['io_model']}, {threads} thread"
                       f"{'s' if threads != 1 else ''}, at most {most} block"
                       f"{'s' if most != 1 else ''} in flight")
        for kind, e in (w.get("item_errors") or {}).items():
            out.append(f"  failed blocks: {kind} x{e['count']} (first: {e['first']})")
        for e in r.errors[:5]:
            out.append(f"  {e}")
        if len(r.errors) > 5:
            out.append(f"  ... {len(r.errors) - 5} more")
    for g in sorted({r.groupid for r in results}):
        gs = group_status(results, g)
        out.append("")
        out.append(f"Run status group {g} (all jobs):")
        for d, label in (("read", "   READ"), ("write", "  WRITE")):
            if d not in gs.agg:
                continue
            out.append(
                f"{label}: bw={num2str(gs.agg[d], 4, 1024, 'B/s')} "
                f"({num2str(gs.agg[d], 4, 1000, 'B/s')}), "
                f"{num2str(gs.min_bw[d], 4, 1024, 'B/s')}-{num2str(gs.max_bw[d], 4, 1024, 'B/s')} "
                f"({num2str(gs.min_bw[d], 4, 1000, 'B/s')}-{num2str(gs.max_bw[d], 4, 1000, 'B/s')}), "
                f"io={num2str(gs.io[d], 4, 1024, 'B')} ({num2str(gs.io[d], 4, 1000, 'B')}), "
                f"run={gs.min_run[d]}-{gs.max_run[d]}msec")
    return "\n".join(out) + "\n"


def _per_req(rep: dict[str, Any]) -> str:
    return (f"usr={rep['usr_us_per_req']:.2f}us, sys={rep['sys_us_per_req']:.2f}us, "
            f"ctx={rep['ctx_per_req']:.2f}")


def cpu_lines(label: str, rep: dict[str, Any] | None, groupid: int) -> list[str]:
    """fio's ``cpu :`` line, per request: ``cpu client`` (wqs-bench) and ``cpu daemon``
    (the servers: their sum, then each server's share when there are several)."""
    if rep is None:
        return []
    head = f"  {label:<13s}: "
    servers = rep.get("servers") or {}
    if "error" in rep:
        err = rep["error"]
        return [head + (err if err.startswith("not measured") else f"not measured: {err}")]
    where = f"{rep['requests']} requests"
    if rep.get("scope") == "group":
        where += f" of run group {groupid}"
    if servers:
        where += f", {len(servers)} server{'s' if len(servers) != 1 else ''}"
        if rep["processes"] != len(servers):
            where += f" in {rep['processes']} processes"
    lines = [head + f"{_per_req(rep)} per request ({where})"]
    if len(servers) > 1:
        for name, srv in servers.items():
            lines.append(f"     {name}: {_per_req(srv)} ({srv['via']})")
    return lines


def kvcache_lines(kv: dict[str, Any]) -> list[str]:
    gib = 1024 ** 3

    def b(n: float) -> str:
        return num2str(n, 4, 1024, "B")

    return [
        f"  kvcache      : model={kv['model']}, block={kv['block_tokens']} tokens x "
        f"{b(kv['kv_bytes_per_token'])}/token = {b(kv['block_bytes'])}",
        f"  conversations: {kv['conversations']} ({kv['turns']} turns, "
        f"{kv['prompt_tokens']} prompt tokens)",
        f"  hit rate     : tokens={kv['token_hit_rate'] * 100:.2f}%, "
        f"blocks={kv['block_hit_rate'] * 100:.2f}% ({kv['hit_blocks']}/{kv['lookup_blocks']}), "
        f"lost hits={kv.get('lost_hits', 0)}",
        f"  KV bytes     : loaded={b(kv['bytes_loaded'])}, recomputed={b(kv['bytes_recomputed'])} "
        f"({kv['loaded_ratio'] * 100:.2f}% loaded), stored={b(kv['bytes_stored'])}"
        + (f" [{kv['bytes_loaded'] / gib:.2f} GiB loaded]" if kv["bytes_loaded"] > gib else ""),
    ]


def mean_us(values: np.ndarray) -> float:
    return float(values.mean() / 1e3) if values.size else math.nan
