"""The SPDK backend against a real SPDK: an NVMe-oF TCP target (nvmf_tgt) with RAM
namespaces on 127.0.0.1, driven by SPDK's user-space NVMe driver through ctypes.

Skipped, with the reason, unless the machine has an SPDK (tests/spdk_target.py: the
WQS_TEST_SPDK_LIB_DIR and WQS_TEST_NVMF_TGT variables). Runs the engine's device-level
tests on a namespace (in a pytest of their own, tests/spdk_mode.py), then `wqs format`
and wqsd on another: data through the daemon, `wqs stat`, a kill -9 in the middle of a
stream of puts, and a block damaged on the namespace; a namespace of 4 KiB sectors; and
the errors an operator meets (a controller not reachable, a namespace missing, one of
sectors the engine cannot use, one too small).

The namespaces are files in /dev/shm and the target sleeps while idle where that
works, malloc bdevs and a spinning target elsewhere (tests/spdk_target.py).

Every process of the test but the target keeps off the target's core.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import threading
import time

import pytest
import xxhash

from tests import spdk_target
from tests.conftest import ROOT
from tests.daemons import DaemonProcess, pick_ports

REASON = spdk_target.missing()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

ENGINE_NS, DAEMON_NS, SPARE_NS = 1, 2, 3
# Namespaces for the errors and edge cases: 4 KiB sectors (usable), 8 KiB sectors (not:
# the engine's 4 KiB units must be whole sectors), one too small for a device.
NS_4K, NS_8K, NS_TINY = 4, 5, 6
# Tests of tests/test_engine.py that take small_config but make devices of their own out
# of files (an ext4 image, a blank or tiny file, the device file reopened or rewritten
# with open()): they test the engine on those files, not device IO, and stay on files.
FILE_ONLY = ("test_format_refuses_a_filesystem_unless_forced",
             "test_open_refuses_a_device_without_superblock",
             "test_format_refuses_a_device_too_small",
             "test_format_refuses_a_wqs_device_unless_forced",
             "test_a_checkpoint_without_superseded_marks_assumes_every_region_has_some")


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    t = spdk_target.target(tmp_path_factory.mktemp("nvmf"), pick_ports(span=1),
                           [256, 128, 64, 16, 16, 1], [512, 512, 512, 4096, 8192, 512])
    with t:
        yield t


@pytest.fixture(autouse=True)
def off_the_target_core():
    """This process and what it starts (daemons, tools) keep off the target's core."""
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, spdk_target.other_cpus())
    yield
    os.sched_setaffinity(0, saved)


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), **extra)


def test_the_engines_device_tests_pass_on_an_spdk_namespace(target):
    deselect = " and ".join(f"not {name}" for name in FILE_ONLY)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         "tests/test_engine.py", "tests/test_device.py", "-k", f"spdk and {deselect}"],
        cwd=str(ROOT), capture_output=True, text=True, timeout=1200,
        env=_env(WQS_TEST_SPDK_DEVICE=target.device(ENGINE_NS),
                 WQS_TEST_SPDK_LIB_DIR=target.lib_dir))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    passed = int(re.search(r"(\d+) passed", out).group(1))
    assert passed >= 40, out[-2000:]  # every engine test on a device (43), not a handful
    assert " skipped" not in out.splitlines()[-1], out[-2000:]


def _format(target, ns: int, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wqs.cli", "format", target.device(ns), "--yes",
         "--spdk-lib-dir", target.lib_dir, "--region-size", "1M", *extra],
        cwd=str(ROOT), capture_output=True, text=True, timeout=120, env=_env())


def _daemon(tmp_path, target, ns: int) -> DaemonProcess:
    return DaemonProcess(tmp_path / "d", pick_ports(), device_size=None, config={
        "device": target.device(ns), "workers": "auto", "metrics_listen": "off",
        "engine": {"region_size": "1M", "max_block_size": "4M", "dram_cache_bytes": 0,
                   "spdk": {"lib_dir": target.lib_dir, "mem_size": "256MiB"}}})


def _digest(data: bytes) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def test_format_serve_kill_and_recover_on_spdk(target, tmp_path):
    import wqs

    fmt = _format(target, DAEMON_NS, "--force", "--shards", "2")
    assert fmt.returncode == 0, fmt.stderr
    assert "formatted" in fmt.stdout and "shards" in fmt.stdout
    again = _format(target, DAEMON_NS)  # a WQS device: refused without --force
    assert again.returncode == 1 and "already holds a WQS device" in again.stderr

    d = _daemon(tmp_path, target, DAEMON_NS)
    d.start(timeout_s=60)
    try:
        stat = subprocess.run([sys.executable, "-m", "wqs.cli", "stat", "--servers",
                               d.address], cwd=str(ROOT), capture_output=True, text=True,
                              timeout=60, env=_env())
        assert stat.returncode == 0 and "device io: spdk" in stat.stdout, stat.stdout
        client = wqs.Client([d.address], timeout_s=10)
        rng = random.Random(5)
        first = {i: rng.randbytes(rng.choice([4096, 65536, 300_000])) for i in range(64)}
        assert all(client.put_many(list(first.items())))
        assert client.get_many(list(first)) == list(first.values())
        # A client on this host moves blocks through shared memory, which NVMe/TCP
        # reads into and writes from directly (no copy through the engine's buffers).
        slots = client.shared_memory(64 << 20).block_views(300_000, len(first))
        got = client.get_many(list(first), outs=slots)
        assert [bytes(g) for g in got] == list(first.values())
        stats = json.loads(subprocess.run(
            [sys.executable, "-m", "wqs.cli", "stat", "--json", "--servers", d.address],
            cwd=str(ROOT), capture_output=True, text=True, timeout=60, env=_env()).stdout)
        engine = stats[0]["stats"]["engine"]
        assert engine["direct_reads"] == len(first), json.dumps(engine)
        assert engine["direct_writes"] == len(first), json.dumps(engine)

        # A stream of puts, killed with SIGKILL in the middle: every acknowledged put
        # must be there after the restart (the device is scanned, not checkpointed).
        acked: dict[int, str] = {}
        stop = threading.Event()

        def writer() -> None:
            c = wqs.Client([d.address], timeout_s=5)
            k = 1000
            while not stop.is_set():
                data = random.Random(k).randbytes(65536 + k % 5000)
                try:
                    ok = c.put(k, data)
                except Exception:  # noqa: BLE001 - the daemon is being killed
                    return
                if not ok:
                    return
                acked[k] = _digest(data)
                k += 1

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        deadline = time.monotonic() + 30
        while len(acked) < 150 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(acked) >= 150
        d.kill()
        stop.set()
        t.join(20)
        client.close()
        d.start(timeout_s=60)
        assert "recovered" in d.stderr_text() and "scan" in d.stderr_text()
        client = wqs.Client([d.address], timeout_s=10)
        back = client.get_many(list(acked))
        assert [_digest(b) if b is not None else None for b in back] == list(acked.values())
        assert client.get_many(list(first)) == list(first.values())
        client.close()
        assert d.terminate() == 0
        assert "clean shutdown" in d.stderr_text()
    finally:
        d.kill()


def test_a_block_damaged_on_the_namespace_is_a_miss_and_the_rest_intact(target, tmp_path):
    import wqs

    fmt = _format(target, SPARE_NS, "--force", "--shards", "1")
    assert fmt.returncode == 0, fmt.stderr
    d = _daemon(tmp_path, target, SPARE_NS)
    d.start(timeout_s=60)
    try:
        client = wqs.Client([d.address], timeout_s=10)
        blocks = {i: random.Random(i).randbytes(50_000) for i in range(20)}
        assert all(client.put_many(list(blocks.items())))
        client.close()
        assert d.terminate() == 0
        victim = 7
        tool = subprocess.run([sys.executable, "-m", "tests.spdk_tool", "flip",
                               target.device(SPARE_NS), target.lib_dir,
                               blocks[victim][1000:1064].hex()],
                              cwd=str(ROOT), capture_output=True, text=True, timeout=120,
                              env=_env())
        assert tool.returncode == 0, tool.stderr
        d.start(timeout_s=60)
        client = wqs.Client([d.address], timeout_s=10)
        got = client.get_many(list(blocks))
        assert got[victim] is None  # damaged: a miss, never wrong bytes
        assert all(g == blocks[i] for i, g in zip(blocks, got) if i != victim)
        stats = subprocess.run([sys.executable, "-m", "wqs.cli", "stat", "--json",
                                "--servers", d.address], cwd=str(ROOT), capture_output=True,
                               text=True, timeout=60, env=_env())
        assert '"checksum_failures": 1' in stats.stdout
        client.close()
        assert d.terminate() == 0
    finally:
        d.kill()


def test_a_namespace_of_4k_sectors_serves(target, tmp_path):
    import wqs

    fmt = _format(target, NS_4K, "--force", "--shards", "1")
    assert fmt.returncode == 0, fmt.stderr
    d = _daemon(tmp_path, target, NS_4K)
    d.start(timeout_s=60)
    try:
        client = wqs.Client([d.address], timeout_s=10)
        blocks = {i: random.Random(i).randbytes(4096 * (1 + i % 20) - i % 3)
                  for i in range(40)}
        assert all(client.put_many(list(blocks.items())))
        assert client.get_many(list(blocks)) == list(blocks.values())
        client.close()
        assert d.terminate() == 0
    finally:
        d.kill()


def test_unreachable_controller_missing_namespace_and_unusable_ones_are_clear_errors(
        target, tmp_path):
    closed = pick_ports(span=1)
    unreachable = _format(target, 1).args  # same options, another port
    unreachable[4] = target.device(1).replace(f"trsvcid:{target.port}", f"trsvcid:{closed}")
    proc = subprocess.run(unreachable, cwd=str(ROOT), capture_output=True, text=True,
                          timeout=120, env=_env())
    assert proc.returncode == 1
    assert f"NVMe-oF TCP controller 127.0.0.1:{closed}" in proc.stderr
    assert "is not reachable" in proc.stderr
    proc = _format(target, 9)
    assert proc.returncode == 1
    assert "namespace 9 does not exist or is not active (active namespaces: 1, 2, 3, 4, " \
        "5, 6)" in proc.stderr
    proc = _format(target, NS_8K)
    assert proc.returncode == 1
    assert f"namespace {NS_8K} has 8192 B sectors; WQS needs a sector size that divides " \
        "4096" in proc.stderr
    proc = _format(target, NS_TINY)
    assert proc.returncode == 1
    assert "1048576 bytes hold 0 regions of 1048576; need at least 3" in proc.stderr
    d = _daemon(tmp_path, target, 9)
    d.spawn()
    assert d.wait(60) == 1
    assert "namespace 9 does not exist" in d.stderr_text()
