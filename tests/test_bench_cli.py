"""wqs-bench: fio's option semantics and JSON keys checked against real fio, --verify
against a corrupted block, the prefix workload, job files and the comparison harness."""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import subprocess


import numpy as np
import pytest

import wqs

from bench import cli
from bench.blocks import MAGIC, block_id, check, content
from bench.fioparse import (FioOptionError, assign_groups, build_jobs, parse_job_file,
                            parse_size, parse_time, split_argv)
from tests.daemons import daemon_factory  # noqa: F401 (fixture)

FIO = shutil.which("fio")
needs_fio = pytest.mark.skipif(FIO is None, reason="fio is not installed (apt-get install fio)")


def run_fio(args: list[str]) -> dict:
    out = subprocess.run([FIO, "--output-format=json", *args], check=True,
                         capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout[out.stdout.index("{"):])


LAST_ERR: list[str] = [""]


def run_bench(args: list[str], capsys) -> tuple[int, dict]:
    rc = cli.main(["--output-format=json", "--eta=never", *args])
    captured = capsys.readouterr()
    LAST_ERR[0] = captured.err
    return rc, json.loads(captured.out)


# ------------------------------------------------------------------------ option parsing

SIZE_CASES = [  # (bs, size): fio's reading of each decides the IO count
    ("4k", "1m"), ("4KiB", "1m"), ("4kb", "1MiB"), ("64K", "2M"), ("1m", "8m"),
    ("512", "64k"), ("8KB", "1mb"), ("128k", "1g"), ("3k", "1500k"),
]


@needs_fio
def test_sizes_and_io_counts_match_fio(capsys):
    """bs/size strings (k, KiB, kb, M...) mean what fio means, and a sized job does as
    many IOs as fio's."""
    args = ["--ioengine=null", "--rw=write"]
    for i, (bs, size) in enumerate(SIZE_CASES):
        args += [f"--name=j{i}", f"--bs={bs}", f"--size={size}"]
    args += ["--name=kb1000", "--kb_base=1000", "--bs=4k", "--size=1m"]
    fio = run_fio(args)
    rc, ours = run_bench(args, capsys)
    assert rc == 0
    specs, _ = build_jobs(split_argv(args))
    for fj, oj, spec in zip(fio["jobs"], ours["jobs"], specs):
        assert fj["jobname"] == oj["jobname"] == spec.name
        fio_bs = fj["write"]["io_bytes"] // fj["write"]["total_ios"]
        assert spec.bs[1] == fio_bs, (spec.name, spec.options)
        assert oj["write"]["total_ios"] == fj["write"]["total_ios"], spec.options
        assert oj["write"]["io_bytes"] == fj["write"]["io_bytes"], spec.options
    assert parse_size("4KiB") == 4000 and parse_size("4k") == 4096  # fio's compat quirk
    assert parse_size("4KiB", kb_base=1000) == 4096 and parse_size("4k", kb_base=1000) == 4000


@needs_fio
def test_name_scoping_and_rwmix_match_fio(capsys):
    """Options before the first --name are global, options after a --name belong to that
    job only (so job b keeps the default bs), and rwmixread splits like fio's."""
    args = ["--ioengine=null", "--size=16m", "--name=a", "--bs=8k", "--rw=randrw",
            "--rwmixread=70", "--name=b", "--rw=write", "--name=c", "--rw=randrw",
            "--rwmixwrite=90", "--bs=4k,16k"]
    fio = run_fio(args)
    rc, ours = run_bench(args, capsys)
    assert rc == 0
    for fj, oj in zip(fio["jobs"], ours["jobs"]):
        assert fj["job options"] == oj["job options"]
        for d in ("read", "write"):
            fb = fj[d]["io_bytes"] // max(1, fj[d]["total_ios"])
            ob = oj[d]["io_bytes"] // max(1, oj[d]["total_ios"])
            assert fb == ob, (fj["jobname"], d)
        if fj["jobname"] != "c":  # fio's total with mixed block sizes is not size
            f_total = fj["read"]["io_bytes"] + fj["write"]["io_bytes"]
            o_total = oj["read"]["io_bytes"] + oj["write"]["io_bytes"]
            assert f_total == o_total, fj["jobname"]
        f_mix = fj["read"]["total_ios"] / (fj["read"]["total_ios"] + fj["write"]["total_ios"])
        o_mix = oj["read"]["total_ios"] / (oj["read"]["total_ios"] + oj["write"]["total_ios"])
        assert abs(f_mix - o_mix) < 0.05, (fj["jobname"], f_mix, o_mix)
    b = ours["jobs"][1]
    assert b["read"]["total_ios"] == 0 and b["write"]["io_bytes"] // b["write"]["total_ios"] == 4096


@needs_fio
def test_times_match_fio(capsys):
    args = ["--ioengine=null", "--rw=read", "--size=1g", "--time_based",
            "--name=a", "--runtime=300ms", "--name=b", "--runtime=200msec"]
    fio = run_fio(args)
    rc, ours = run_bench(args, capsys)
    assert rc == 0
    for fj, oj in zip(fio["jobs"], ours["jobs"]):
        assert abs(fj["job_runtime"] - oj["job_runtime"]) < 60, (fj["job_runtime"], oj["job_runtime"])
    assert parse_time("10") == 10 and parse_time("2m") == 120 and parse_time("1h") == 3600
    assert parse_time("250us") == pytest.approx(250e-6)


def test_bad_options_are_refused(capsys):
    assert cli.main(["--name=x", "--rw=trim", "--size=1m", "--ioengine=null"]) == 1
    assert "rw: unsupported mode" in capsys.readouterr().err
    assert cli.main(["--name=x", "--bogus=1"]) == 1
    assert "unrecognized option '--bogus'" in capsys.readouterr().err
    assert cli.main(["--name=x", "--rw=read", "--servers=127.0.0.1:1"]) == 1
    assert "you need to specify size=" in capsys.readouterr().err
    with pytest.raises(FioOptionError):
        parse_size("12q")
    with pytest.raises(FioOptionError):  # fio would read this as 1 byte
        parse_size("1.5k")


def test_job_file_sections_and_stonewall(tmp_path, capsys):
    job = tmp_path / "kv.fio"
    job.write_text("""
; a fio-style job file
[global]
ioengine=null
bs=64k
size=${BENCH_SIZE}
time_based
runtime=100ms

[writer]
rw=randwrite
iodepth=4          ; four in flight

[reader]
stonewall
rw=randread
bs=1m
""")
    os.environ["BENCH_SIZE"] = "32m"
    try:
        jobs = parse_job_file(job.read_text())
        inv = split_argv([str(job), "--iodepth=2"])
        specs, _ = build_jobs(inv)
    finally:
        del os.environ["BENCH_SIZE"]
    assert [j[0] for j in jobs] == ["writer", "reader"]
    assert specs[0].iodepth == 4 and specs[1].iodepth == 2  # own section beats globals
    assert specs[1].bs == (1 << 20, 1 << 20) and specs[0].size == 32 << 20
    assert assign_groups(specs) == [0, 1]
    os.environ["BENCH_SIZE"] = "32m"
    try:
        rc, doc = run_bench([str(job)], capsys)
    finally:
        del os.environ["BENCH_SIZE"]
    assert rc == 0
    assert [(j["jobname"], j["groupid"]) for j in doc["jobs"]] == [("writer", 0), ("reader", 1)]
    assert doc["jobs"][0]["write"]["total_ios"] > 0 and doc["jobs"][1]["read"]["total_ios"] > 0


# ---------------------------------------------------------------------------- JSON keys


def _key_paths(doc, path="", out=None):
    """Every dict key path, with list items folded into '[]'."""
    out = set() if out is None else out
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.add(f"{path}/{k}")
            _key_paths(v, f"{path}/{k}", out)
    elif isinstance(doc, list):
        for v in doc:
            _key_paths(v, f"{path}[]", out)
    return out


@needs_fio
def test_json_has_fios_keys(capsys):
    """Same jobs through fio and wqs-bench: every key path of fio's JSON is in ours, the
    only extra is our 'wqs' section, and the types and units line up."""
    args = ["--ioengine=null", "--size=4m", "--group_reporting", "--name=mix", "--rw=randrw",
            "--bs=4k", "--numjobs=2", "--iodepth=2", "--lat_percentiles=1",
            "--percentile_list=1:5:10:50:90:95:99:99.5:99.9:99.99"]
    fio = run_fio(args)
    rc, ours = run_bench(args, capsys)
    assert rc == 0
    fio_paths, our_paths = _key_paths(fio), _key_paths(ours)
    missing = sorted(fio_paths - our_paths)
    assert not missing, missing
    extra = {p for p in our_paths - fio_paths
             if not (p.startswith("/wqs") or p.startswith("/jobs[]/wqs"))}
    assert not extra, sorted(extra)
    fj, oj = fio["jobs"][0], ours["jobs"][0]
    assert set(fj["read"]["clat_ns"]["percentile"]) == set(oj["read"]["clat_ns"]["percentile"]) \
        == {"1.000000", "5.000000", "10.000000", "50.000000", "90.000000", "95.000000",
            "99.000000", "99.500000", "99.900000", "99.990000"}
    assert fio["global options"] == ours["global options"]
    assert fj["job options"] == oj["job options"]
    for d in ("read", "write"):
        for k in ("io_bytes", "bw_bytes", "bw", "runtime", "total_ios", "iops"):
            assert type(fj[d][k]) is type(oj[d][k]), (d, k)
        assert oj[d]["bw"] == oj[d]["bw_bytes"] // 1024  # KiB/s, as fio
        assert oj[d]["io_bytes"] + fj[d]["io_bytes"] > 0
    assert oj["read"]["io_bytes"] + oj["write"]["io_bytes"] == 2 * (4 << 20)  # 2 jobs x size


def test_default_percentiles_and_normal_output(capsys):
    rc = cli.main(["--eta=never", "--ioengine=null", "--name=n", "--rw=randread",
                   "--bs=64k", "--size=8m"])
    out = capsys.readouterr().out
    assert rc == 0
    for needle in ["n: (groupid=0, jobs=1): err= 0", "read: IOPS=", "clat percentiles",
                   " 1.00th=[", " 5.00th=[", "10.00th=[", "50.00th=[", "90.00th=[",
                   "95.00th=[", "99.00th=[", "99.50th=[", "99.90th=[", "99.99th=[",
                   "Run status group 0 (all jobs):", "   READ: bw=", "issued rwts: total=128,0,0,0"]:
        assert needle in out, needle


# ------------------------------------------------------------------------------ verify


def test_content_check_catches_every_kind_of_damage():
    bid = block_id("x.0.0", 0, 4096)
    good = content(bid, 4096)
    assert check(bid, good) is None
    assert "missing" in check(bid, None)
    bad = bytearray(good)
    bad[3000] ^= 1
    assert "content mismatch at byte 3000" in check(bid, bad)
    assert "header holds block" in check(block_id("x.0.0", 4096, 4096), good)
    assert "says 4096 bytes" in check(bid, good[:2048])


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    from bench.procs import Daemon

    d = Daemon(str(tmp_path_factory.mktemp("wqsd")), device_size="128M", dram_cache="0")
    yield d
    d.stop()


def _flip_in_device(path: str, bid: bytes, skip: int = 512) -> int:
    """Flip bytes inside every stored copy of block `bid`'s payload on the device file."""
    flipped = 0
    with open(path, "r+b") as f:
        with mmap.mmap(f.fileno(), 0) as m:
            at = m.find(MAGIC + bid)
            while at >= 0:
                for i in range(at + skip, at + skip + 8):
                    m[i] ^= 0xFF
                flipped += 1
                at = m.find(MAGIC + bid, at + 1)
            m.flush()
        os.fsync(f.fileno())
    return flipped


def test_verify_catches_a_corrupted_block_on_the_device(daemon, capsys):
    """A flipped byte on the daemon's device: the engine's checksum turns the block into a
    miss, and --verify reports the block that was written but did not come back."""
    common = [f"--servers={daemon.address}", "--name=vcorrupt", "--bs=64k", "--size=1m",
              "--verify=crc32c"]
    rc, doc = run_bench([*common, "--rw=write"], capsys)
    assert rc == 0
    job = doc["jobs"][0]
    assert job["error"] == 0 and job["wqs"]["verified_blocks"] == 16
    assert job["wqs"]["verify_errors"] == 0
    victim = block_id("vcorrupt.0.0", 5 * 65536, 65536)
    assert _flip_in_device(daemon.device, victim) >= 1
    rc, doc = run_bench([*common, "--rw=randread"], capsys)
    assert rc != 0
    job = doc["jobs"][0]
    assert job["error"] == 84  # EILSEQ, fio's verify error
    assert job["wqs"]["verify_errors"] == 1 and job["wqs"]["misses"] == 1
    assert job["wqs"]["verified_blocks"] == 15
    assert job["wqs"]["layout_blocks"] == 0  # the blocks were there: no layout
    assert victim.hex() in job["wqs"]["errors"][0]
    assert "verify failure" in LAST_ERR[0]


def test_verify_catches_wrong_bytes_from_a_store(tmp_path, capsys):
    """The file-per-block store has no checksum: a flipped byte comes back as data, and
    --verify reports the mismatch."""
    store = tmp_path / "files"
    common = ["--ioengine=files", f"--files_dir={store}", "--name=vf", "--bs=16k",
              "--size=256k", "--verify=md5"]
    rc, _ = run_bench([*common, "--rw=randwrite"], capsys)
    assert rc == 0
    victim = block_id("vf.0.0", 3 * 16384, 16384).hex()
    path = store / victim[:2] / victim[2:4] / victim
    data = bytearray(path.read_bytes())
    data[9000] ^= 0x40
    path.write_bytes(bytes(data))
    rc, doc = run_bench([*common, "--rw=read"], capsys)
    assert rc == 1
    w = doc["jobs"][0]["wqs"]
    assert w["verify_errors"] == 1 and w["misses"] == 0
    assert "content mismatch at byte 9000" in w["errors"][0]


def test_read_job_lays_out_its_blocks_first(daemon, capsys):
    args = [f"--servers={daemon.address}", "--name=layout", "--rw=randread", "--bs=32k",
            "--size=512k", "--verify=crc32c"]
    rc, doc = run_bench(args, capsys)
    assert rc == 0
    w = doc["jobs"][0]["wqs"]
    assert w["layout_blocks"] == 16 and w["misses"] == 0 and w["verified_blocks"] == 16
    assert doc["jobs"][0]["read"]["total_ios"] == 16  # each block once, like fio
    rc, doc = run_bench(args, capsys)
    assert rc == 0 and doc["jobs"][0]["wqs"]["layout_blocks"] == 0


# ------------------------------------------------------------------- CPU per request


def _assert_measured(rep: dict, requests: int) -> None:
    """A per-request usage object with plausible numbers (no timing assumptions)."""
    assert "error" not in rep, rep
    assert rep["requests"] == requests > 0
    assert rep["usr_us_per_req"] >= 0 and rep["sys_us_per_req"] >= 0
    assert rep["usr_us_per_req"] + rep["sys_us_per_req"] > 0  # serving requests costs CPU
    assert rep["usr_s"] + rep["sys_s"] > 0
    assert rep["ctx_per_req"] == pytest.approx(rep["vol_ctx_per_req"] + rep["invol_ctx_per_req"],
                                               abs=1e-3)
    assert rep["voluntary_ctx"] + rep["involuntary_ctx"] > 0  # the threads waited on sockets
    assert rep["ctx_per_req"] == pytest.approx(
        (rep["voluntary_ctx"] + rep["involuntary_ctx"]) / requests, abs=1e-3)


def test_cpu_per_request_of_client_and_daemon(daemon, capsys):
    args = [f"--servers={daemon.address}", "--name=cpu", "--rw=randrw", "--bs=16k",
            "--size=4m", "--iodepth=4"]
    rc, doc = run_bench(args, capsys)
    assert rc == 0
    job = doc["jobs"][0]
    ios = job["read"]["total_ios"] + job["write"]["total_ios"]
    client, srv = job["wqs"]["cpu_client"], job["wqs"]["cpu_daemon"]
    _assert_measured(client, ios)
    assert client["scope"] == "job" and client["processes"] == 1
    _assert_measured(srv, ios)
    with wqs.Client([daemon.address]) as c:  # the supervisor and one process per shard
        assert srv["processes"] == 1 + c.shards(daemon.address)
    host, port = daemon.address.rsplit(":", 1)
    (only,) = srv["servers"].items()
    assert only[0] == daemon.address and only[1]["via"] == f"control {host}:{int(port) + 1}"
    assert only[1]["usr_s"] == srv["usr_s"]  # one server: its share is the sum

    # Text, and with a ramp: the readings start after it, like the IO counts.
    rc = cli.main(["--eta=never", "--ramp_time=200ms", *args])
    out = capsys.readouterr().out
    assert rc == 0
    client_line = next(x for x in out.splitlines() if x.startswith("  cpu client   : "))
    daemon_line = next(x for x in out.splitlines() if x.startswith("  cpu daemon   : "))
    issued = re.search(r"issued rwts: total=(\d+),(\d+),", out)
    counted = int(issued.group(1)) + int(issued.group(2))
    assert f"per request ({counted} requests)" in client_line
    assert re.search(r"usr=\d+\.\d\dus, sys=\d+\.\d\dus, ctx=\d+\.\d\d per", client_line)
    assert f"per request ({counted} requests, 1 server" in daemon_line


def test_unreachable_control_plane_is_reported_not_zero(daemon, capsys):
    # Port 1: nothing listens there, so the Stats calls are refused.
    rc, doc = run_bench([f"--servers={daemon.address}", "--control_servers=127.0.0.1:1",
                         "--name=noctl", "--rw=write", "--bs=16k", "--size=1m"], capsys)
    assert rc == 0  # the IO worked; only the measurement did not
    job = doc["jobs"][0]
    _assert_measured(job["wqs"]["cpu_client"], job["write"]["total_ios"])
    srv = job["wqs"]["cpu_daemon"]
    assert "unreachable" in srv["error"] and srv["error"].startswith("not measured")
    assert "usr_us_per_req" not in srv
    assert "usr_us_per_req" not in srv["servers"][daemon.address]
    rc = cli.main(["--eta=never", f"--servers={daemon.address}", "--control_servers=127.0.0.1:1",
                   "--name=noctl", "--rw=write", "--bs=16k", "--size=1m"])
    out = capsys.readouterr().out
    assert "  cpu daemon   : not measured: " in out and "unreachable" in out
    # one control address per server, or a clear refusal
    assert cli.main([f"--servers={daemon.address}", "--control_servers=127.0.0.1:1,127.0.0.1:2",
                     "--name=x", "--rw=write", "--size=1m"]) == 1
    assert "control_servers lists 2 addresses for 1 servers" in capsys.readouterr().err


def test_daemon_cpu_with_the_configs_auth_token(daemon_factory, tmp_path, capsys):
    """The control plane is asked with the client config's token, as the data plane."""
    token = "bench-token-1"
    d = daemon_factory(config={"auth_token": token, "metrics_listen": "off"})
    cfg = tmp_path / "client.yaml"
    cfg.write_text(f"servers: [{d.address}]\nauth_token: {token}\n")
    rc, doc = run_bench([f"--config={cfg}", "--name=auth", "--rw=write", "--bs=16k",
                         "--size=1m"], capsys)
    assert rc == 0
    job = doc["jobs"][0]
    _assert_measured(job["wqs"]["cpu_daemon"], job["write"]["total_ios"])


def test_jobs_of_one_group_share_per_group_figures(daemon, capsys):
    rc, doc = run_bench([f"--servers={daemon.address}", "--bs=16k", "--size=1m",
                         "--name=g1", "--rw=write", "--name=g2", "--rw=write"], capsys)
    assert rc == 0
    j1, j2 = doc["jobs"]
    ios = j1["write"]["total_ios"] + j2["write"]["total_ios"]
    for j in (j1, j2):
        for key in ("cpu_client", "cpu_daemon"):
            _assert_measured(j["wqs"][key], ios)
            assert j["wqs"][key]["scope"] == "group"
    assert j1["wqs"]["cpu_daemon"] == j2["wqs"]["cpu_daemon"]


def test_cpu_of_engines_without_a_daemon(capsys):
    from bench.procs import RawSink

    rc, doc = run_bench(["--ioengine=null", "--name=n", "--rw=randread", "--bs=4k",
                         "--size=4m"], capsys)
    assert rc == 0
    w = doc["jobs"][0]["wqs"]
    # the harness's own cost: requests counted, CPU spent, whatever its size
    assert w["cpu_client"]["requests"] == 1024 and "error" not in w["cpu_client"]
    assert w["cpu_client"]["usr_s"] + w["cpu_client"]["sys_s"] > 0
    assert "cpu_daemon" not in w  # nothing outside this process
    sink = RawSink()
    try:
        rc, doc = run_bench(["--ioengine=rawsock", f"--rawsock={sink.address}", "--name=r",
                             "--rw=read", "--bs=16k", "--size=1m"], capsys)
    finally:
        sink.stop()
    assert rc == 0
    srv = doc["jobs"][0]["wqs"]["cpu_daemon"]
    assert "not started by this benchmark" in srv["error"] and "usr_us_per_req" not in srv


# ------------------------------------------------------------------------- KV workloads


def test_model_shapes_and_conversations():
    from bench.kvcache import make_conversation, model_shape, system_prompt

    assert model_shape("Llama-3-8B").kv_bytes_per_token() == 128 * 1024
    assert model_shape("DeepSeek-V3").kv_bytes_per_token() == 61 * 576 * 2
    assert model_shape("deepseek-v3").attention == "MLA"
    assert model_shape("llama-3-70b").kv_bytes_per_token("fp8") == 160 * 1024
    sysp = system_prompt(7, 32)
    a, b = make_conversation(7, 0, 3, sysp), make_conversation(7, 0, 3, sysp)
    assert a.turns == b.turns and all(np.array_equal(x, y) for x, y in zip(a.users, b.users))
    assert not np.array_equal(make_conversation(8, 0, 3, sysp).users[0], a.users[0])
    for t in range(1, a.turns):  # each prompt extends the previous one
        prev = a.prompt(t - 1)
        assert np.array_equal(a.prompt(t)[: len(prev)], prev)
    convs = [make_conversation(1, 0, i, sysp[:0]) for i in range(2000)]
    turns = np.array([c.turns for c in convs])
    users = np.array([len(u) for c in convs for u in c.users])
    assert 2.9 < turns.mean() < 3.8 and 2 <= np.median(turns) <= 3 and turns.max() >= 10
    assert 0.26 < (turns == 1).mean() < 0.34
    assert 50 < np.median(users) < 80 and users.mean() > 1.5 * np.median(users)  # long tail


def test_prefix_workload_hits_on_the_second_pass(daemon, capsys):
    args = [f"--servers={daemon.address}", "--name=chat", "--workload=prefix",
            "--model=deepseek-v2-lite", "--kv_bytes_per_token=4k", "--block_tokens=16",
            "--conversations=4", "--iodepth=2",
            "--system_prompt_tokens=64", "--seed=11", "--verify=crc32c"]
    rc, doc = run_bench(args, capsys)
    assert rc == 0
    kv1 = doc["jobs"][0]["wqs"]["kvcache"]
    assert kv1["conversations"] == 4 and kv1["turns"] >= 4
    assert kv1["block_bytes"] == 16 * 4096 and kv1["kv_bytes_per_token"] == 4096
    assert kv1["bytes_stored"] > 0
    # later turns reuse earlier turns' blocks, so even the first pass hits
    assert 0 < kv1["token_hit_rate"] < 1
    rc, doc = run_bench(args, capsys)
    assert rc == 0
    job = doc["jobs"][0]
    kv2 = job["wqs"]["kvcache"]
    assert kv2["token_hit_rate"] > kv1["token_hit_rate"] and kv2["block_hit_rate"] == 1.0
    assert kv2["bytes_loaded"] == kv2["hit_blocks"] * kv2["block_bytes"]
    assert kv2["bytes_recomputed"] < kv1["bytes_recomputed"]
    assert job["read"]["total_ios"] > 0 and job["wqs"]["lookup_lat_ns"]["N"] == kv2["turns"]
    assert job["wqs"]["verify_errors"] == 0 and job["wqs"]["verified_blocks"] == kv2["hit_blocks"]


# -------------------------------------------------------------------- engines, compare


def test_rawsock_and_null_engines(capsys):
    from bench.procs import RawSink

    sink = RawSink()
    try:
        rc, doc = run_bench(["--ioengine=rawsock", f"--rawsock={sink.address}", "--name=r",
                             "--rw=randrw", "--bs=64k", "--size=4m", "--iodepth=4"], capsys)
    finally:
        sink.stop()
    assert rc == 0
    j = doc["jobs"][0]
    assert j["read"]["io_bytes"] + j["write"]["io_bytes"] == 4 << 20
    # driven like WQS: one thread, a connection per call in flight
    assert j["wqs"]["io_model"] == "async" and j["wqs"]["io_threads"] == 1
    assert j["wqs"]["inflight_max"] == 4
    assert cli.main(["--ioengine=null", "--name=x", "--size=1m", "--verify=md5"]) == 1
    assert "verify needs an engine that stores" in capsys.readouterr().err


def test_lat_cdf_plot(tmp_path, capsys):
    png = tmp_path / "cdf.png"
    rc = cli.main(["--eta=never", "--ioengine=null", "--name=c", "--rw=randread", "--bs=4k",
                   "--size=1m", f"--lat_cdf={png}"])
    err = capsys.readouterr().err
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert rc == 1 and "needs matplotlib" in err
        return
    assert rc == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_fio
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_compare_runs_everything_and_cleans_up(tmp_path, capsys):
    from bench import compare

    before = set(os.listdir(tmp_path))
    rc = compare.main(["--bs", "64k", "--iodepth", "2", "--runtime", "0.3", "--repeat", "1",
                       "--size", "2m", "--device-size", "128m", "--dir", str(tmp_path),
                       "--json", str(tmp_path / "cmp.json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    doc = json.loads((tmp_path / "cmp.json").read_text())
    systems = {(r["system"], r["op"]) for r in doc["rows"]}
    for s in ("fio", "wqs", "wqs-bounce", "wqs-tcp", "redis", "files", "files-odirect",
              "rawsock"):
        assert (s, "read") in systems and (s, "write") in systems, s
        assert s in out
    assert all(r["mib_s"] > 0 for r in doc["rows"])
    assert "× rawsock" in out
    for c in ("cli µs usr/sys", "cli ctx", "srv µs usr/sys", "srv ctx"):
        assert c in out
    for r in doc["rows"]:
        # every system has a client side: this process, or fio's own job
        assert r["cli_usr_us"] >= 0 and r["cli_sys_us"] >= 0, r
        assert r["cli_usr_us"] + r["cli_sys_us"] > 0 and r["cli_ctx"] >= 0, r
        if r["system"] in ("wqs", "wqs-bounce", "wqs-tcp", "redis", "rawsock"):  # a server
            assert r["srv_usr_us"] >= 0 and r["srv_sys_us"] >= 0, r
            assert r["srv_ctx"] > 0, r  # it waited for every request
        else:
            assert r["srv_usr_us"] is None and r["srv_ctx"] is None, r
    wqs_rows = [r for r in doc["rows"] if r["system"] == "wqs"]
    # the daemon's getrusage has µs resolution (redis's /proc ticks are 10 ms: no such check)
    assert all(r["srv_usr_us"] + r["srv_sys_us"] > 0 for r in wqs_rows)
    assert set(os.listdir(tmp_path)) - before == {"cmp.json"}  # work folder removed
    stray = subprocess.run(["pgrep", "-f", f"--data-dir {tmp_path}"], capture_output=True,
                           text=True).stdout.strip()
    assert not stray


def test_ids_follow_fio_file_naming():
    spec, _ = build_jobs(split_argv(["--ioengine=null", "--name=a", "--size=1m", "--numjobs=2"]))
    from bench.engines import NullEngine
    from bench.runner import Clone

    c0, c1 = (Clone(spec[0], k, 0, NullEngine(), 1) for k in range(2))
    assert c0.namespace == "a.0.0" and c1.namespace == "a.1.0"
    assert c0.block(3) == block_id("a.0.0", 3 * 4096, 4096) != c1.block(3)
    spec2, _ = build_jobs(split_argv(["--ioengine=null", "--name=b", "--size=1m",
                                      "--filename=shared"]))
    assert Clone(spec2[0], 0, 0, NullEngine(), 1).namespace == "shared"


def test_wqs_engine_needs_servers(capsys):
    assert cli.main(["--name=x", "--size=1m"]) == 1
    assert "--servers" in capsys.readouterr().err



# ------------------------------------------------------------ iodepth: the async model


class _CountingWqs:
    """Wraps a WqsEngine's asynchronous calls: which threads start calls, and how many
    blocks each thread has in flight (started, not yet finished) at most."""

    def __init__(self, engine) -> None:
        import threading

        self.engine = engine
        self.lock = threading.Lock()
        self.threads: set[int] = set()
        self.now: dict[int, int] = {}
        self.max: dict[int, int] = {}
        self.calls_now: dict[int, int] = {}
        self.calls_max: dict[int, int] = {}
        self.blocks = {}

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def _started(self, handle, n):
        import threading

        me = threading.get_ident()
        with self.lock:
            self.threads.add(me)
            self.now[me] = self.now.get(me, 0) + n
            self.max[me] = max(self.max.get(me, 0), self.now[me])
            self.calls_now[me] = self.calls_now.get(me, 0) + 1
            self.calls_max[me] = max(self.calls_max.get(me, 0), self.calls_now[me])
            self.blocks[id(handle)] = (me, n)
        return handle

    def _finished(self, handle):
        with self.lock:
            me, n = self.blocks.pop(id(handle))
            self.now[me] -= n
            self.calls_now[me] -= 1

    def start_put(self, ids, bufs):
        return self._started(self.engine.start_put(ids, bufs), len(ids))

    def start_get(self, ids, outs):
        return self._started(self.engine.start_get(ids, outs), len(ids))

    def finish_put(self, handle):
        self._finished(handle)
        return self.engine.finish_put(handle)

    def finish_get(self, handle):
        self._finished(handle)
        return self.engine.finish_get(handle)


@pytest.fixture
def counting_wqs(monkeypatch):
    made = []
    real = cli.make_engine

    def make(*args, **kwargs):
        made.append(_CountingWqs(real(*args, **kwargs)))
        return made[-1]

    monkeypatch.setattr(cli, "make_engine", make)
    return made


@pytest.mark.parametrize("numjobs", [1, 2])
def test_iodepth_is_n_blocks_in_flight_from_one_thread_per_job(daemon, counting_wqs, capsys,
                                                               numjobs):
    """fio's libaio model: --iodepth=8 keeps 8 requests in flight from one job thread
    (numjobs threads in all), through the SDK's start_*_many and wait_any."""
    rc, doc = run_bench([f"--servers={daemon.address}", "--name=qd8", "--rw=randrw",
                         "--bs=16k", "--size=1m", "--iodepth=8", f"--numjobs={numjobs}"],
                        capsys)
    assert rc == 0, LAST_ERR[0]
    (eng,) = counting_wqs
    assert len(eng.threads) == numjobs  # one IO thread per job clone
    assert all(m == 8 for m in eng.max.values()), eng.max  # each reached iodepth, no more
    assert all(n == 0 for n in eng.now.values())  # every call finished
    for job in doc["jobs"]:
        w = job["wqs"]
        assert w["io_model"] == "async" and w["io_threads"] == 1 and w["inflight_max"] == 8
        ios = job["read"]["total_ios"] + job["write"]["total_ios"]
        assert ios == 64  # each slot once, like fio
        # fio's libaio reports: submission latency per IO, depths measured
        for d in ("read", "write"):
            assert job[d]["slat_ns"]["N"] == job[d]["total_ios"] == job[d]["lat_ns"]["N"]
            if job[d]["total_ios"]:
                assert job[d]["slat_ns"]["max"] <= job[d]["lat_ns"]["max"]
        assert job["iodepth_level"]["8"] > 0
        assert sum(job["iodepth_level"].values()) == pytest.approx(100.0)
        assert job["iodepth_submit"]["4"] == 100.0  # one block per submission


def test_iodepth_batch_is_calls_of_b_blocks(daemon, counting_wqs, capsys):
    """--iodepth=8 --iodepth_batch=4: calls of 4 blocks (one start_get_many each), two
    calls and 8 blocks in flight, one thread; --verify checks every block read into the
    slots' own out buffers."""
    common = [f"--servers={daemon.address}", "--name=qd8b4", "--bs=32k", "--size=2m",
              "--iodepth=8", "--iodepth_batch=4", "--verify=crc32c"]
    rc, doc = run_bench([*common, "--rw=randwrite"], capsys)
    assert rc == 0, LAST_ERR[0]
    assert doc["jobs"][0]["wqs"]["verified_blocks"] == 64  # read back after the writes
    counting_wqs.clear()
    rc, doc = run_bench([*common, "--rw=randread"], capsys)
    assert rc == 0, LAST_ERR[0]
    (eng,) = counting_wqs
    (me,) = eng.threads
    assert eng.max[me] == 8 and eng.calls_max[me] == 2
    w = doc["jobs"][0]["wqs"]
    assert w["verified_blocks"] == 64 and w["verify_errors"] == 0 and w["misses"] == 0
    assert w["layout_blocks"] == 0 and w["inflight_max"] == 8 and w["io_threads"] == 1
    assert doc["jobs"][0]["iodepth_submit"]["4"] == 100.0
    assert doc["jobs"][0]["read"]["total_ios"] == 64


def test_verify_at_depth_catches_a_corrupted_block(daemon, capsys):
    """At iodepth 8 the corrupted block is still the only one reported: each call in
    flight reads into buffers of its own."""
    common = [f"--servers={daemon.address}", "--name=vqd", "--bs=64k", "--size=1m",
              "--iodepth=8", "--iodepth_batch=2", "--verify=crc32c"]
    rc, _ = run_bench([*common, "--rw=write"], capsys)
    assert rc == 0
    victim = block_id("vqd.0.0", 9 * 65536, 65536)
    assert _flip_in_device(daemon.device, victim) >= 1
    rc, doc = run_bench([*common, "--rw=randread"], capsys)
    assert rc != 0
    w = doc["jobs"][0]["wqs"]
    assert w["verify_errors"] == 1 and w["misses"] == 1 and w["verified_blocks"] == 15
    assert victim.hex() in w["errors"][0]


@needs_fio
def test_null_engine_at_depth_matches_fio(capsys):
    """The null engine is asynchronous like fio's: same IO counts and JSON keys at
    iodepth 8 in batches of 4, with submission latency reported as fio does."""
    args = ["--ioengine=null", "--rw=randread", "--bs=4k", "--size=4m", "--name=q",
            "--iodepth=8", "--iodepth_batch=4", "--numjobs=2"]
    fio = run_fio(args)
    rc, ours = run_bench(args, capsys)
    assert rc == 0
    missing = sorted(_key_paths(fio) - _key_paths(ours))
    assert not missing, missing
    for fj, oj in zip(fio["jobs"], ours["jobs"]):
        assert oj["read"]["total_ios"] == fj["read"]["total_ios"] == 1024
        assert oj["read"]["slat_ns"]["N"] == fj["read"]["slat_ns"]["N"] == 1024
        assert oj["wqs"]["io_model"] == "async" and oj["wqs"]["io_threads"] == 1
        assert oj["wqs"]["inflight_max"] == 8
    rc = cli.main(["--eta=never", *args])
    out = capsys.readouterr().out
    assert rc == 0 and re.search(r"\n    slat \((nsec|usec)\): min=", out)
    assert "  wqs io       : async, 1 thread, at most 8 blocks in flight" in out


def test_engines_without_an_async_api_keep_a_thread_per_call(tmp_path, capsys):
    rc, doc = run_bench(["--ioengine=files", f"--files_dir={tmp_path}", "--name=f",
                         "--rw=randwrite", "--bs=4k", "--size=256k", "--iodepth=8",
                         "--iodepth_batch=2"], capsys)
    assert rc == 0
    job = doc["jobs"][0]
    w = job["wqs"]
    assert w["io_model"] == "threads" and w["io_threads"] == 4
    assert 2 <= w["inflight_max"] <= 8  # the runner counts them; how many overlap is luck
    assert job["write"]["slat_ns"]["N"] == 0  # synchronous calls: no separate submission


def test_failed_blocks_report_why(capsys):
    """An asynchronous engine's per-block failures (results.errors) are counted by kind
    with the first message, in JSON and text; the job itself goes on."""
    from bench.engines import NullEngine
    from bench.report import normal_text, to_json
    from bench.runner import Clone, run_group

    class Flaky(NullEngine):
        def finish_put(self, handle):
            ok = [k % 4 != 0 for k in range(len(handle.values))]
            return ok, {k: "NodeUnavailable: 127.0.0.1:1: down" for k, good in
                        enumerate(ok) if not good}

    specs, _ = build_jobs(split_argv(["--ioengine=null", "--name=flaky", "--rw=write",
                                      "--bs=4k", "--size=64k", "--iodepth=4",
                                      "--iodepth_batch=4"]))
    (res,) = run_group([Clone(specs[0], 0, 0, Flaky(), 1)], "never", lambda m: None)
    assert res.failed_puts == 4 and res.error == 0
    assert res.item_errors == {"NodeUnavailable": {"count": 4,
                                                   "first": "NodeUnavailable: 127.0.0.1:1: down"}}
    doc = to_json([res], {}, 0.0)
    assert doc["jobs"][0]["wqs"]["item_errors"]["NodeUnavailable"]["count"] == 4
    text = normal_text([res], doc)
    assert "  failed blocks: NodeUnavailable x4 (first: NodeUnavailable: 127.0.0.1:1: down)" \
        in text


def test_fio_depth_buckets():
    from bench.runner import batch_bucket, depth_bucket

    # fio's io_u_map: 1, 2-3, 4-7, 8-15, 16-31, 32-63, >=64
    assert [depth_bucket(n) for n in (1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 63, 64, 500)] == \
        [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    # fio's io_u_submit / io_u_complete: 0, 1-4, 5-8, 9-16, 17-32, 33-64, >64
    assert [batch_bucket(n) for n in (0, 1, 4, 5, 8, 9, 16, 17, 32, 33, 64, 65)] == \
        [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
