"""bench.engine_bench end to end on a small file: every mode measured beside fio.

Checks what the benchmark reports (every point present, no bad gets, CPU per op), and
that the async mode really keeps QD ops in flight on the core from one thread; never
how fast.
"""

from __future__ import annotations

import json
import shutil
import threading

import pytest

from bench import engine_bench

needs_fio = pytest.mark.skipif(shutil.which("fio") is None,
                               reason="fio is not installed (apt-get install fio)")


@needs_fio
def test_every_mode_beside_fio(tmp_path, capsys):
    rc = engine_bench.main(["--size", "64M", "--runtime", "0.3", "--repeat", "1",
                            "--qd", "1,4", "--dir", str(tmp_path), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["wqs_bad_gets"] == 0 and report["wqs_failed_puts"] == 0
    assert report["modes"] == ["threads", "batch", "async"]  # the default: all three
    points = {(s["tool"], s["op"], s["qd"]) for s in report["summary"]}
    assert points == {(tool, op, qd)
                      for tool in ("fio", "fio-batch", "wqs", "wqs-batch", "wqs-async")
                      for op in ("put", "get") for qd in (1, 4)}
    assert all(s["iops"] > 0 for s in report["summary"])
    for s in report["summary"]:  # CPU per op: every WQS row (getrusage), fio's from fio
        run = s["runs"][0]
        assert run["cpu_usr_us"] >= 0 and run["cpu_sys_us"] >= 0, s
        assert s["cpu_us"] == pytest.approx(s["cpu_usr_us"] + s["cpu_sys_us"])
        if s["tool"].startswith("wqs"):
            assert s["cpu_us"] > 0 and run["ctx_per_op"] >= 0, s
    assert report["engine_stats"]["checksum_failures"] == 0
    assert not list(tmp_path.iterdir())  # the backing file is removed


def test_unknown_mode_is_refused(capsys):
    with pytest.raises(SystemExit):
        engine_bench.main(["--mode", "threads,uring"])
    assert "--mode takes threads, batch, async" in capsys.readouterr().err


@needs_fio
def test_ceiling_rows_run_the_engine_in_ram(tmp_path, capsys):
    rc = engine_bench.main(["--size", "64M", "--runtime", "0.2", "--repeat", "1",
                            "--qd", "4", "--mode", "batch,async", "--ceiling",
                            "--dir", str(tmp_path), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["wqs_bad_gets"] == 0
    points = {(s["tool"], s["op"]) for s in report["summary"]}
    assert points == {(tool, op) for tool in ("fio", "fio-batch", "wqs-batch", "wqs-batch-ram",
                                              "wqs-async", "wqs-async-ram")
                      for op in ("put", "get")}
    ram = [s for s in report["summary"] if s["tool"].endswith("-ram")]
    assert all(s["iops"] > 0 and s["runs"][0]["errors"] == 0 for s in ram)
    assert all(s["cpu_us"] > 0 for s in ram)


def test_row_names():
    assert engine_bench.row_name("wqs", "put") == "put"
    assert engine_bench.row_name("wqs-batch-ram", "get") == "get_many (RAM)"
    assert engine_bench.row_name("wqs-async", "get") == "get (async)"
    assert engine_bench.row_name("wqs-async-ram", "put") == "put (async, RAM)"
    assert engine_bench.REFERENCE["wqs-async"] == engine_bench.REFERENCE["wqs-async-ram"] == "fio"


@pytest.mark.parametrize("op", ["put", "get"])
def test_async_mode_keeps_qd_ops_in_flight_on_the_core_from_one_thread(op, monkeypatch):
    """The async mode drives the core itself: QD ops outstanding at once (counted by
    wrapping core.put/core.get and their callbacks), all started from one thread, every
    completion counted, and the facade (the threads/batch modes' path) not used."""
    qd = 6
    bench = engine_bench.WqsBench("", 64 << 10, 0.15, None, memory_size=64 << 20)
    try:
        if op == "get":
            bench.prepare_gets()
        core = bench.core
        seen = {"now": 0, "max": 0, "started": 0, "done": 0, "threads": set()}

        def counting(real):
            def start(*args):  # core.put(id, data, callback, arg) / core.get(ids, callback, arg)
                *head, callback, arg = args
                seen["threads"].add(threading.get_ident())
                seen["started"] += 1
                seen["now"] += 1
                seen["max"] = max(seen["max"], seen["now"])

                def called_back(result):
                    seen["now"] -= 1
                    seen["done"] += 1
                    callback(result)

                return real(*head, called_back, arg)
            return start

        monkeypatch.setattr(core, "put", counting(core.put))
        monkeypatch.setattr(core, "get", counting(core.get))
        facade = type(bench.engine)
        for name in ("put", "get", "put_many", "get_many"):
            monkeypatch.setattr(facade, name, lambda *a: pytest.fail("went through the facade"))
        point = bench.run(op, "async", qd, "_test")
    finally:
        monkeypatch.undo()
        bench.close()
    assert point.tool == "wqs-async-ram" and point.qd == qd and point.errors == 0
    assert seen["max"] == qd, seen  # QD ops outstanding at once, never more
    assert seen["threads"] == {threading.get_ident()}  # all started from this one thread
    assert seen["now"] == 0 and seen["done"] == seen["started"] == point.ops > qd
    assert point.cpu_us is not None and point.cpu_us > 0


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
