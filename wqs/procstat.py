"""CPU time and context switches of a process, and what they come to per request.

On a small, shared machine throughput moves from minute to minute with the neighbours,
but the CPU a request costs and the number of times it makes a thread sleep and wake
(context switches) hardly do. These are the figures the benchmarks report next to MiB/s.

* `self_usage()` reads the calling process with ``getrusage(RUSAGE_SELF)``: every thread
  of the process, including threads that have already exited.
* `pid_usage(pid)` reads another process from ``/proc`` (for servers a benchmark started
  and cannot ask, such as redis-server); see its docstring for how it differs.
* A daemon made of several processes (a supervisor and its shards) reports the sum of
  their usages: ``a + b``, ``sum(usages)`` or `total_usage`; ``processes`` counts them.
* `usage_delta` subtracts a snapshot taken before a measurement from one taken after it,
  and `per_request` turns that into microseconds of CPU and switches per request.

Linux only (getrusage exists elsewhere, but /proc and the meaning of the counters are
Linux's).
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, fields
from typing import Any, Iterable


@dataclass(frozen=True)
class ProcessUsage:
    """Cumulative counters of one or more processes since they started."""

    user_s: float = 0.0  # CPU time in user mode, seconds
    system_s: float = 0.0  # CPU time in the kernel on the process's behalf, seconds
    voluntary_ctx: int = 0  # the process gave up the CPU: it waited (IO, lock, sleep)
    involuntary_ctx: int = 0  # the scheduler took the CPU away (time slice, preemption)
    processes: int = 1  # how many processes these figures add up

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.system_s

    @property
    def ctx(self) -> int:
        return self.voluntary_ctx + self.involuntary_ctx

    def __add__(self, other: "ProcessUsage") -> "ProcessUsage":
        if not isinstance(other, ProcessUsage):
            return NotImplemented
        return ProcessUsage(self.user_s + other.user_s, self.system_s + other.system_s,
                            self.voluntary_ctx + other.voluntary_ctx,
                            self.involuntary_ctx + other.involuntary_ctx,
                            self.processes + other.processes)

    def __radd__(self, other: Any) -> "ProcessUsage":
        # sum() starts from 0; accepting it makes sum(usages) work as it reads.
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def from_rusage(ru: Any) -> ProcessUsage:
    """A ProcessUsage from a `resource.struct_rusage`."""
    return ProcessUsage(user_s=float(ru.ru_utime), system_s=float(ru.ru_stime),
                        voluntary_ctx=int(ru.ru_nvcsw), involuntary_ctx=int(ru.ru_nivcsw),
                        processes=1)


def self_usage() -> ProcessUsage:
    """The calling process, all its threads (the kernel folds in threads that exited)."""
    return from_rusage(resource.getrusage(resource.RUSAGE_SELF))


def total_usage(usages: Iterable[ProcessUsage]) -> ProcessUsage:
    """The sum of several processes' usages (an empty list gives zero processes)."""
    return sum(usages, ProcessUsage(processes=0))


def pid_usage(pid: int, proc: str = "/proc") -> ProcessUsage:
    """Another process's usage, read from /proc (OSError if it is gone or unreadable).

    CPU time is ``utime``/``stime`` of ``/proc/<pid>/stat``: the whole thread group,
    exited threads included, but counted in clock ticks (``SC_CLK_TCK``, usually 100 per
    second), so it is exact to 10 ms only; measure for seconds, not milliseconds.

    The kernel keeps no per-process context-switch total in /proc (``/proc/<pid>/status``
    counts the main thread only), so the switches are summed over the threads alive now
    (``/proc/<pid>/task/*/status``). A thread that exits between two readings takes its
    switches with it and can make the later reading smaller; `usage_delta` refuses such a
    pair instead of reporting a negative or short figure.
    """
    with open(f"{proc}/{pid}/stat", encoding="ascii") as f:
        stat = f.read()
    # The command name (field 2) is in parentheses and may contain spaces or ')': the
    # numeric fields start after the last ')'. utime and stime are fields 14 and 15.
    rest = stat[stat.rindex(")") + 2:].split()
    tick = os.sysconf("SC_CLK_TCK")
    user_s, system_s = int(rest[11]) / tick, int(rest[12]) / tick
    voluntary = involuntary = 0
    try:
        tids = os.listdir(f"{proc}/{pid}/task")
    except OSError:
        tids = [str(pid)]
    for tid in tids:
        try:
            with open(f"{proc}/{pid}/task/{tid}/status", encoding="utf-8") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        voluntary += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        involuntary += int(line.split()[1])
        except FileNotFoundError:
            continue  # the thread exited while we listed them
    return ProcessUsage(user_s, system_s, voluntary, involuntary, processes=1)


def usage_delta(before: ProcessUsage, after: ProcessUsage) -> ProcessUsage:
    """What happened between two snapshots of the same processes.

    ValueError if the two cover a different number of processes or a counter went down
    (a process restarted, or a thread's switches vanished from a /proc reading): such a
    difference would be a wrong number, not a small one.
    """
    if before.processes != after.processes:
        raise ValueError(f"the snapshots cover {before.processes} and {after.processes} "
                         "processes: one was started or stopped in between")
    delta = ProcessUsage(after.user_s - before.user_s, after.system_s - before.system_s,
                         after.voluntary_ctx - before.voluntary_ctx,
                         after.involuntary_ctx - before.involuntary_ctx, after.processes)
    # CPU seconds are sums of floats from the kernel's nanoseconds; allow rounding noise.
    if delta.user_s < -1e-6 or delta.system_s < -1e-6 or delta.voluntary_ctx < 0 \
            or delta.involuntary_ctx < 0:
        raise ValueError("a counter went backwards between the snapshots "
                         "(a process restarted, or a thread exited)")
    return ProcessUsage(max(0.0, delta.user_s), max(0.0, delta.system_s),
                        delta.voluntary_ctx, delta.involuntary_ctx, delta.processes)


@dataclass(frozen=True)
class RequestCost:
    """CPU and context switches per request over a measured interval."""

    requests: int
    usr_us: float  # user CPU microseconds per request
    sys_us: float  # system CPU microseconds per request
    voluntary_ctx: float  # per request
    involuntary_ctx: float  # per request
    usage: ProcessUsage  # the interval's totals these were divided from

    @property
    def cpu_us(self) -> float:
        return self.usr_us + self.sys_us

    @property
    def ctx(self) -> float:
        return self.voluntary_ctx + self.involuntary_ctx

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape the benchmarks report (per-request figures, then totals)."""
        u = self.usage
        # Rounded to what the counters resolve (µs of CPU); more digits would be noise
        # from float subtraction.
        return {"requests": self.requests, "usr_us_per_req": round(self.usr_us, 3),
                "sys_us_per_req": round(self.sys_us, 3), "ctx_per_req": round(self.ctx, 4),
                "vol_ctx_per_req": round(self.voluntary_ctx, 4),
                "invol_ctx_per_req": round(self.involuntary_ctx, 4),
                "usr_s": round(u.user_s, 6), "sys_s": round(u.system_s, 6),
                "voluntary_ctx": u.voluntary_ctx, "involuntary_ctx": u.involuntary_ctx,
                "processes": u.processes}


def cost_per_request(delta: ProcessUsage, requests: int) -> RequestCost:
    """An interval's usage (already a difference) divided by the requests it served."""
    if requests <= 0:
        raise ValueError(f"no requests to divide by (got {requests})")
    return RequestCost(requests=requests, usr_us=delta.user_s * 1e6 / requests,
                       sys_us=delta.system_s * 1e6 / requests,
                       voluntary_ctx=delta.voluntary_ctx / requests,
                       involuntary_ctx=delta.involuntary_ctx / requests, usage=delta)


def per_request(before: ProcessUsage, after: ProcessUsage, requests: int) -> RequestCost:
    """`usage_delta(before, after)` per request; ValueError as usage_delta, or for
    requests <= 0."""
    return cost_per_request(usage_delta(before, after), requests)
