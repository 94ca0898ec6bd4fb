"""wqs.procstat: the counters move when the process does what they count, /proc readings
of another process add up its threads, and the arithmetic is right."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from wqs.procstat import (ProcessUsage, cost_per_request, per_request, pid_usage,
                          self_usage, total_usage, usage_delta)

# CPU to burn per test: well above getrusage's and /proc's resolution (10 ms ticks).
BURN_S = 0.2


def _burn_user(cpu_s: float) -> None:
    """Spin in Python until this process has used cpu_s more CPU time.

    time.process_time() is CLOCK_PROCESS_CPUTIME_ID, another kernel interface than
    getrusage, so the tests compare procstat against an independent clock. The wall
    time guard only ends a run where that clock does not move at all."""
    start, wall_end = time.process_time(), time.monotonic() + 60
    x = 0
    while time.process_time() - start < cpu_s and time.monotonic() < wall_end:
        for i in range(10_000):
            x += i * i


def test_burning_cpu_raises_user_time():
    before = self_usage()
    _burn_user(BURN_S)
    d = usage_delta(before, self_usage())
    assert d.cpu_s >= BURN_S * 0.9
    assert d.user_s > d.system_s  # a Python loop with no syscalls is user time
    assert d.processes == 1


def test_exited_threads_are_counted():
    """RUSAGE_SELF covers every thread, also those that are gone by the second reading."""
    before = self_usage()
    t = threading.Thread(target=_burn_user, args=(BURN_S,))
    t.start()
    t.join()
    assert not t.is_alive()
    assert usage_delta(before, self_usage()).user_s >= BURN_S * 0.8


def test_syscalls_raise_system_time():
    before = self_usage()
    start = time.process_time()
    with open("/dev/zero", "rb", buffering=0) as f:
        buf = bytearray(1 << 20)
        while time.process_time() - start < BURN_S:
            f.readinto(buf)  # the kernel zero-fills 1 MiB: system time
    d = usage_delta(before, self_usage())
    assert d.system_s > d.user_s
    assert d.system_s >= BURN_S * 0.5


def test_sleeping_raises_voluntary_switches():
    before = self_usage()
    for _ in range(50):
        time.sleep(0.001)  # each sleep blocks the thread: one voluntary switch at least
    d = usage_delta(before, self_usage())
    assert d.voluntary_ctx >= 50
    assert d.ctx >= d.voluntary_ctx


CHILD = textwrap.dedent("""
    import sys, threading, time
    start = time.process_time()
    while time.process_time() - start < {burn}:
        sum(range(10_000))
    done = threading.Event()
    def sleeper():
        for _ in range(100):
            time.sleep(0.001)
        done.set()
        threading.Event().wait()  # stay alive: its switches must still be readable
    threading.Thread(target=sleeper, daemon=True).start()
    done.wait()
    print("ready", flush=True)
    sys.stdin.read()
""")


def test_pid_usage_reads_another_process_and_all_its_threads():
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(burn=BURN_S)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        u = pid_usage(child.pid)
        # the interpreter's start-up adds CPU; the burn alone is BURN_S (to a tick)
        assert u.user_s + u.system_s >= BURN_S - 0.02
        # the 100 sleeps were made by a second thread: the main thread's own status
        # shows only a handful, so this fails unless the threads are summed
        assert u.voluntary_ctx >= 100
        assert u.processes == 1
        with open(f"/proc/{child.pid}/status") as f:
            leader = next(int(line.split()[1]) for line in f
                          if line.startswith("voluntary_ctxt_switches:"))
        assert u.voluntary_ctx > leader
    finally:
        child.stdin.close()
        child.wait(10)
    with pytest.raises(OSError):
        pid_usage(child.pid)  # reaped: gone from /proc


def test_pid_usage_of_self_agrees_with_getrusage():
    _burn_user(BURN_S)
    mine, theirs = self_usage(), pid_usage(os.getpid())
    # /proc counts ticks (10 ms); both read the same kernel totals a moment apart
    assert abs(mine.cpu_s - theirs.cpu_s) < 0.1


def test_sums_add_every_field_and_count_processes():
    a = ProcessUsage(1.0, 0.5, 10, 2)
    b = ProcessUsage(0.25, 0.25, 5, 1)
    s = a + b
    assert s == ProcessUsage(1.25, 0.75, 15, 3, processes=2)
    assert sum([a, b, b]) == ProcessUsage(1.5, 1.0, 20, 4, processes=3)
    assert total_usage([a, b]) == s
    assert total_usage([]) == ProcessUsage(processes=0)
    assert s.as_dict() == {"user_s": 1.25, "system_s": 0.75, "voluntary_ctx": 15,
                           "involuntary_ctx": 3, "processes": 2}


def test_delta_refuses_restarts_and_changed_process_sets():
    before = ProcessUsage(2.0, 1.0, 100, 10)
    with pytest.raises(ValueError, match="backwards"):
        usage_delta(before, ProcessUsage(0.1, 0.1, 5, 1))  # the process restarted
    with pytest.raises(ValueError, match="processes"):
        usage_delta(before, before + ProcessUsage())
    assert usage_delta(before, before) == ProcessUsage(0.0, 0.0, 0, 0)


def test_per_request_figures():
    before = ProcessUsage(10.0, 5.0, 1000, 100, processes=3)
    after = ProcessUsage(11.0, 5.5, 1300, 200, processes=3)
    c = per_request(before, after, 1000)
    assert c.requests == 1000 and c.usage.processes == 3
    assert c.usr_us == pytest.approx(1000.0) and c.sys_us == pytest.approx(500.0)
    assert c.voluntary_ctx == pytest.approx(0.3) and c.involuntary_ctx == pytest.approx(0.1)
    assert c.ctx == pytest.approx(0.4) and c.cpu_us == pytest.approx(1500.0)
    d = c.as_dict()
    assert d["usr_us_per_req"] == pytest.approx(1000.0) and d["ctx_per_req"] == pytest.approx(0.4)
    assert d["requests"] == 1000 and d["processes"] == 3 and d["voluntary_ctx"] == 300
    with pytest.raises(ValueError, match="no requests"):
        cost_per_request(ProcessUsage(), 0)
