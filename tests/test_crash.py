"""Crash consistency: SIGKILL a writer mid-stream; every acknowledged block survives.

The writer stays well below the device's capacity, so nothing may be missing because
the cache evicted it: every acknowledged block must read back identical.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import pytest
import xxhash

from tests.conftest import ROOT
from tests.crash_writer import DEVICE_SIZE
from wqs.config import EngineConfig
from wqs.engine import open_or_create

MiB = 1024 * 1024


def run_writer_until(path: str, seed: int, kill_after_acks: int) -> list[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    stderr = open(path + f".{seed}.stderr", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.crash_writer", path, str(seed)],
        stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=str(ROOT), env=env,
    )
    assert proc.stdout is not None
    lines = []
    acks = 0
    try:
        first = proc.stdout.readline()
        if first.strip() != "ready":
            stderr.seek(0)
            raise AssertionError(f"writer failed to start: {stderr.read()}")
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("ack"):
                acks += 1
                if acks >= kill_after_acks:
                    break
    finally:
        proc.send_signal(signal.SIGKILL)  # mid-stream: the next op is already under way
        # The writer may have run ahead of us; what it printed before dying counts too.
        # (Read through the same buffered reader: lines it already buffered count.)
        rest = proc.stdout.read()
        proc.wait()
        stderr.close()
    assert acks == kill_after_acks
    if rest and not rest.endswith("\n"):
        rest = rest[: rest.rfind("\n") + 1]  # a line cut by the kill is not a report
    return lines + rest.splitlines()


@pytest.mark.parametrize("seed", [11, 22, 33, 44])
def test_acknowledged_blocks_survive_sigkill(tmp_path, seed):
    path = str(tmp_path / "dev")
    config = EngineConfig(region_size=1 * MiB, max_block_size=4 * MiB, dram_cache_bytes=0)
    rng = random.Random(seed)
    expected: dict[str, str | None] = {}  # id -> digest, None = deleted
    for round_ in range(3):  # later rounds start from a crash-recovered device
        lines = run_writer_until(path, seed * 10 + round_, rng.randrange(30, 150))
        uncertain: dict[str, set[str | None]] = {}
        pending: tuple[str, str | None] | None = None
        for line in lines:
            op, *args = line.split()
            if op == "ack":
                assert pending is not None
                expected[pending[0]] = pending[1]
                pending = None
            elif op == "put":
                pending = (args[0], args[1])
            elif op == "del":
                pending = (args[0], None)
        if pending is not None:
            # Killed during this op: either outcome is correct, nothing else is.
            key = pending[0]
            uncertain[key] = {pending[1], expected.get(key, None)}
        engine = open_or_create(path, DEVICE_SIZE, config)
        try:
            stats = engine.stats()
            assert stats.evicted_blocks == 0
            assert stats.used_bytes < stats.capacity_bytes  # nothing could be evicted
            for key, digest in expected.items():
                got = engine.get(bytes.fromhex(key))
                got_digest = None if got is None else xxhash.xxh3_64_hexdigest(got)
                allowed = uncertain.get(key, {digest})
                assert got_digest in allowed, f"round {round_}: block {key} is wrong or lost"
            assert stats.checksum_failures == 0
            for key in uncertain:  # settle the uncertain op for the next round
                got = engine.get(bytes.fromhex(key))
                expected[key] = None if got is None else xxhash.xxh3_64_hexdigest(got)
        finally:
            engine.close()
    assert sum(d is not None for d in expected.values()) > 50
