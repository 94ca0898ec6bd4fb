"""bench.engine_bench end to end on a small file: both modes measured beside fio.

Checks what the benchmark reports (every point present, no bad gets), never how fast.
"""

from __future__ import annotations

import json
import shutil

import pytest

from bench import engine_bench

needs_fio = pytest.mark.skipif(shutil.which("fio") is None,
                               reason="fio is not installed (apt-get install fio)")


@needs_fio
def test_both_modes_beside_fio(tmp_path, capsys):
    rc = engine_bench.main(["--size", "64M", "--runtime", "0.3", "--repeat", "1",
                            "--qd", "1,4", "--dir", str(tmp_path), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["wqs_bad_gets"] == 0
    points = {(s["tool"], s["op"], s["qd"]) for s in report["summary"]}
    assert points == {(tool, op, qd) for tool in ("fio", "fio-batch", "wqs", "wqs-batch")
                      for op in ("put", "get") for qd in (1, 4)}
    assert all(s["iops"] > 0 for s in report["summary"])
    assert report["engine_stats"]["checksum_failures"] == 0
    assert not list(tmp_path.iterdir())  # the backing file is removed


def test_unknown_mode_is_refused(capsys):
    with pytest.raises(SystemExit):
        engine_bench.main(["--mode", "threads,async"])
    assert "--mode takes threads, batch" in capsys.readouterr().err


@needs_fio
def test_ceiling_rows_run_the_engine_in_ram(tmp_path, capsys):
    rc = engine_bench.main(["--size", "64M", "--runtime", "0.2", "--repeat", "1",
                            "--qd", "4", "--mode", "batch", "--ceiling",
                            "--dir", str(tmp_path), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["wqs_bad_gets"] == 0
    points = {(s["tool"], s["op"]) for s in report["summary"]}
    assert points == {(tool, op) for tool in ("fio", "fio-batch", "wqs-batch", "wqs-batch-ram")
                      for op in ("put", "get")}
    ram = [s for s in report["summary"] if s["tool"] == "wqs-batch-ram"]
    assert all(s["iops"] > 0 and s["runs"][0]["errors"] == 0 for s in ram)


def test_memory_device_holds_an_engine():
    from wqs.nvme.memdevice import MemoryDevice
    from wqs.config import EngineConfig
    from wqs.engine.engine import Engine

    device = MemoryDevice(64 << 20)
    config = EngineConfig(dram_cache_bytes=0, region_size=4 << 20)
    Engine.format(device, config, force=True)
    with Engine.open(device, config) as engine:
        blocks = {bytes([i]) * 16: bytes([i]) * (1000 * i + 1) for i in range(1, 40)}
        engine.put_many(list(blocks.items()))
        assert engine.get_many(list(blocks)) == list(blocks.values())
