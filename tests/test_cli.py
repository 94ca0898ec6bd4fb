"""The `wqs` command-line tool, in-process through `main([...])` and as a subprocess,
against a real wqsd started as a subprocess."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from wqs import cli
from tests.daemons import DaemonProcess, start_daemon
from wqs.cli import main, parse_block_id

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


# --------------------------------------------------------------------------- helpers


def closed_port() -> int:
    """A port nothing listens on (connections are refused at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("WQS_AUTH_TOKEN", None)
    return env


def start_wqsd(data_dir: Path, auth_token: str | None = None) -> DaemonProcess:
    """wqsd on free ports (tests.daemons), blind to a token in the test's environment."""
    env = {k: v for k, v in os.environ.items() if k != "WQS_AUTH_TOKEN"}
    config = {"auth_token": auth_token} if auth_token is not None else None
    return start_daemon(data_dir, config=config, env=env)


@pytest.fixture(scope="module")
def wqsd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    daemon = start_wqsd(tmp_path_factory.mktemp("wqsd"))
    try:
        yield daemon
    finally:
        daemon.cleanup()


@pytest.fixture(autouse=True)
def _no_env_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WQS_AUTH_TOKEN", raising=False)


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_cli(*args: str, stdin: bytes | None = None,
            timeout: float = 20.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wqs.cli", *args], input=stdin,
                          capture_output=True, env=_env(), cwd=str(ROOT), timeout=timeout)


# --------------------------------------------------------------------------- block IDs


def test_parse_block_id_forms() -> None:
    assert parse_block_id("42") == (42).to_bytes(16, "big")
    assert parse_block_id("0x2a") == parse_block_id("0X2A") == (42).to_bytes(16, "big")
    canonical = "2ee69744743d87e98383d8fc652dba7f"
    assert parse_block_id(canonical) == bytes.fromhex(canonical)
    # 32 characters are always the canonical hex form, even when they are all digits.
    assert parse_block_id("0" * 30 + "10") == (16).to_bytes(16, "big")
    assert parse_block_id(str(2**128 - 1)) == b"\xff" * 16
    assert parse_block_id("0x" + "f" * 32) == b"\xff" * 16


@pytest.mark.parametrize("bad", ["", "zz", "-1", "0x", "0xg1", "1.5", "abc",
                                 "f" * 31, "f" * 33, str(2**128), "0x1" + "0" * 32, "٣"])
def test_parse_block_id_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid block ID"):
        parse_block_id(bad)


def test_bad_block_id_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--servers", "127.0.0.1:1", "get", "not-an-id"]) == 2
    err = capsys.readouterr().err
    assert "invalid block ID 'not-an-id'" in err
    assert "32 hex digits" in err


def test_usage_errors_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["--timeout", "-1", "ping"]) == 2
    capsys.readouterr()
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("format", "put", "get", "exists", "delete", "stat", "ping"):
        assert command in out


# --------------------------------------------------------------------------- format


def test_format_fresh_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dev = tmp_path / "wqs.dev"
    assert main(["format", str(dev), "--size", "64M", "--region-size", "16M"]) == 0
    out = capsys.readouterr().out
    assert dev.stat().st_size == 64 * MiB
    assert "uuid" in out and "3 × 16.0 MiB" in out and "48.0 MiB" in out

    # The engine opens what the CLI formatted.
    from wqs.config import EngineConfig
    from wqs.engine import Engine
    from wqs.nvme.device import DirectDevice

    engine = Engine.open(DirectDevice(str(dev)), EngineConfig(dram_cache_bytes=0))
    try:
        assert engine.info()["num_regions"] == 3
    finally:
        engine.close()


def test_format_json_geometry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dev = tmp_path / "d"
    assert main(["format", str(dev), "--size", "16M", "--region-size", "1M",
                 "--max-block-size", "4M", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["created"] is True
    assert info["region_size"] == MiB and info["max_block_size"] == 4 * MiB
    assert info["num_regions"] >= 3
    assert info["capacity_bytes"] == info["num_regions"] * MiB
    assert len(info["uuid"]) == 36


def test_format_missing_device_needs_size(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["format", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "--size" in err
    assert not (tmp_path / "nope").exists()


def test_format_too_small_removes_the_file_it_created(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dev = tmp_path / "small"
    assert main(["format", str(dev), "--size", "8M"]) == 1
    assert "need at least 3" in capsys.readouterr().err
    assert not dev.exists()


def test_format_bad_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["format", str(tmp_path / "d"), "--size", "lots"]) == 2
    assert main(["format", str(tmp_path / "d"), "--size", "64M", "--region-size", "3k"]) == 1
    assert "region_size" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None or shutil.which("blkid") is None,
                    reason="needs mkfs.ext4 and blkid")
def test_format_refuses_ext4_without_force(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "ext4.img"
    with open(img, "wb") as f:
        f.truncate(32 * MiB)
    subprocess.run(["mkfs.ext4", "-F", "-q", str(img)], check=True, capture_output=True)
    before = img.read_bytes()[:2 * MiB]

    assert main(["format", str(img), "--yes"]) == 1
    err = capsys.readouterr().err
    assert "ext4" in err and "--force" in err
    assert err.count("\n") == 1  # one line
    assert img.read_bytes()[:2 * MiB] == before  # untouched

    assert main(["format", str(img), "--yes", "--force", "--region-size", "1M"]) == 0
    assert "formatted" in capsys.readouterr().out


def test_format_refuses_reformat_without_force(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    dev = tmp_path / "wqs.dev"
    assert main(["format", str(dev), "--size", "16M", "--region-size", "1M", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)["uuid"]

    assert main(["format", str(dev), "--yes"]) == 1
    err = capsys.readouterr().err
    assert f"already holds a WQS device ({first})" in err and "--force" in err

    assert main(["format", str(dev), "--force", "--yes", "--region-size", "1M", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["created"] is False and info["uuid"] != first


def test_format_existing_device_needs_confirmation(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    dev = tmp_path / "blank"
    with open(dev, "wb") as f:
        f.truncate(16 * MiB)  # exists, holds nothing: formattable, but ask first
    args = ["format", str(dev), "--region-size", "1M"]

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # not a TTY
    assert main(args) == 1
    assert "--yes" in capsys.readouterr().err

    monkeypatch.setattr(sys, "stdin", FakeTty("n\n"))
    assert main(args) == 1
    assert "aborted" in capsys.readouterr().err
    assert dev.read_bytes()[:4096] == bytes(4096)

    monkeypatch.setattr(sys, "stdin", FakeTty("y\n"))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[y/N]" in out and "formatted" in out
    assert dev.read_bytes()[:8] in (b"WQS-DEV\0", b"WQS-SHD\0")  # one shard, or a table


def test_format_cuts_the_device_into_shards(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from wqs.config import EngineConfig
    from wqs.engine import Engine
    from wqs.engine.node import read_shards
    from wqs.nvme.device import DevicePart, DirectDevice

    dev = tmp_path / "d"
    assert main(["format", str(dev), "--size", "64M", "--region-size", "1M", "--shards", "3",
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shards"] == 3 and len(info["partitions"]) == 3
    assert info["num_regions"] == sum(p["num_regions"] for p in info["partitions"])
    assert dev.read_bytes()[:8] == b"WQS-SHD\0"
    device = DirectDevice(str(dev))
    try:
        table = read_shards(device)
        assert table is not None and table.uuid_str() == info["uuid"]
        for k, (offset, size) in enumerate(table.partitions):  # each one an engine of its own
            engine = Engine.open(DevicePart(device, offset, size, k),
                                 EngineConfig(dram_cache_bytes=0, region_size=MiB))
            engine.put(bytes(16), b"shard %d" % k)
            assert engine.get(bytes(16)) == b"shard %d" % k
            engine.close()
    finally:
        device.close()
    assert main(["format", str(dev), "--shards", "1", "--force", "-y", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shards"] == 1
    assert dev.read_bytes()[:8] == b"WQS-DEV\0"  # one shard is the plain layout
    assert main(["format", str(dev), "--region-size", "1M", "--shards", "40", "--force",
                 "-y"]) == 1
    assert "at most" in capsys.readouterr().err
    assert main(["format", str(dev), "--shards", "none", "--force", "-y"]) == 1
    assert "--shards must be" in capsys.readouterr().err


def test_format_size_mismatch_on_existing_file(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    dev = tmp_path / "d"
    with open(dev, "wb") as f:
        f.truncate(16 * MiB)
    assert main(["format", str(dev), "--size", "32M", "--yes"]) == 1
    assert "--size only applies" in capsys.readouterr().err


# --------------------------------------------------------------------------- data plane


def test_put_get_exists_delete_round_trip(wqsd: DaemonProcess, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    srv = ["--servers", wqsd.address]
    src = tmp_path / "block.bin"
    payload = os.urandom(300_000)
    src.write_bytes(payload)
    block = "0x1234abcd"
    canonical = "000000000000000000000000" + "1234abcd"

    assert main([*srv, "put", block, str(src)]) == 0
    assert canonical in capsys.readouterr().out

    out = tmp_path / "out.bin"
    # The same ID in its decimal and canonical forms; options after the command too.
    assert main(["get", str(0x1234ABCD), "-o", str(out), *srv]) == 0
    assert out.read_bytes() == payload
    out.unlink()
    assert main([*srv, "get", canonical, "-o", str(out)]) == 0
    assert out.read_bytes() == payload
    capsys.readouterr()

    assert main([*srv, "exists", block, "0x1234abce"]) == 1  # one is missing
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{canonical} yes", "000000000000000000000000" + "1234abce no"]
    assert main([*srv, "exists", block]) == 0
    capsys.readouterr()

    assert main([*srv, "delete", block, "0x1234abce"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{canonical} deleted", "000000000000000000000000" + "1234abce not found"]
    assert main([*srv, "exists", block]) == 1
    capsys.readouterr()
    assert main([*srv, "get", block, "-o", str(tmp_path / "gone.bin")]) == 1
    assert "not found" in capsys.readouterr().err


def test_get_miss_exit_code(wqsd: DaemonProcess, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "miss.bin"
    assert main(["--servers", wqsd.address, "get", "987654321", "-o", str(target)]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == \
        f"wqs: block {(987654321).to_bytes(16, 'big').hex()} not found"
    assert not target.exists()


def test_get_to_stdout_is_binary(wqsd: DaemonProcess, tmp_path: Path,
                                 capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    payload = bytes(range(256)) * 17
    (tmp_path / "b").write_bytes(payload)
    assert main(["--servers", wqsd.address, "put", "-q", "77", str(tmp_path / "b")]) == 0
    assert capsysbinary.readouterr().out == b""
    assert main(["--servers", wqsd.address, "get", "77"]) == 0
    assert capsysbinary.readouterr().out == payload


def test_subprocess_put_stdin_and_get_stdout(wqsd: DaemonProcess) -> None:
    payload = os.urandom(70_000)
    block = "2ee69744743d87e98383d8fc652dba7f"
    put = run_cli("--servers", wqsd.address, "put", block, "-", stdin=payload)
    assert put.returncode == 0, put.stderr
    assert block.encode() in put.stdout
    got = run_cli("--servers", wqsd.address, "get", block)
    assert got.returncode == 0, got.stderr
    assert got.stdout == payload
    miss = run_cli("--servers", wqsd.address, "get", "0x5")
    assert miss.returncode == 1 and b"not found" in miss.stderr and miss.stdout == b""


def test_config_file_and_token(wqsd: DaemonProcess, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "client.yaml"
    cfg.write_text(f"servers: [{wqsd.address}]\ntimeout_s: 3\n")
    (tmp_path / "b").write_bytes(b"from the config")
    assert main(["--config", str(cfg), "put", "5", str(tmp_path / "b")]) == 0
    assert main(["--config", str(cfg), "exists", "5"]) == 0
    capsys.readouterr()

    # This daemon runs without auth: a client holding a token refuses to trust it.
    monkeypatch.setenv("WQS_AUTH_TOKEN", "s3cret")
    assert main(["--config", str(cfg), "exists", "5"]) == 1
    err = capsys.readouterr().err
    assert "does not require auth" in err and err.count("\n") == 1

    cfg.write_text("servers: [nonsense]\n")
    assert main(["--config", str(cfg), "ping"]) == 1
    assert "servers[0]" in capsys.readouterr().err


def test_auth_token_reaches_both_planes(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    daemon = start_wqsd(tmp_path, auth_token="hunter2")
    try:
        srv = ["--servers", daemon.address]
        (tmp_path / "b").write_bytes(b"secret block")
        assert main([*srv, "put", "9", str(tmp_path / "b")]) == 1
        assert "requires an auth token" in capsys.readouterr().err

        monkeypatch.setenv("WQS_AUTH_TOKEN", "hunter2")
        assert main([*srv, "put", "9", str(tmp_path / "b")]) == 0
        assert main([*srv, "get", "9", "-o", str(tmp_path / "o")]) == 0
        assert (tmp_path / "o").read_bytes() == b"secret block"
        assert main([*srv, "stat", "--json"]) == 0
        capsys.readouterr()

        # --token wins over the environment.
        assert main([*srv, "--token", "wrong", "stat"]) == 1
        captured = capsys.readouterr()
        assert "auth failed" in captured.out
        assert "token" in captured.err and captured.err.count("\n") == 1
    finally:
        daemon.cleanup()


# --------------------------------------------------------------------------- stat, ping


def test_stat_table_and_json(wqsd: DaemonProcess, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "b").write_bytes(b"x" * 5000)
    assert main(["--servers", wqsd.address, "put", "0xabc", str(tmp_path / "b")]) == 0
    assert main(["--servers", wqsd.address, "get", "0xabc", "-o", str(tmp_path / "o")]) == 0
    capsys.readouterr()

    assert main(["stat", "--servers", wqsd.address]) == 0
    out = capsys.readouterr().out
    assert wqsd.address in out and "serving" in out
    for column in ("capacity", "used", "blocks", "hit rate", "checksum", "evicted",
                   "reinserted"):
        assert column in out
    assert "48.0 MiB" in out
    assert "device io: aio" in out or "device io: threads" in out  # the backend

    assert main(["stat", "--json", "--servers", wqsd.address]) == 0
    (node,) = json.loads(capsys.readouterr().out)
    assert node["ok"] is True and node["address"] == wqsd.address
    assert node["node_info"]["labels"]["io_engine"] in ("aio", "threads")
    assert node["control_address"] == f"127.0.0.1:{wqsd.port + 1}"
    assert node["node_info"]["status"] == "serving"
    engine = node["stats"]["engine"]
    assert engine["capacity_bytes"] == 48 * MiB
    assert engine["puts"] >= 1 and engine["index_entries"] >= 1
    assert engine["checksum_failures"] == 0


def test_stat_with_one_node_down(wqsd: DaemonProcess, capsys: pytest.CaptureFixture[str]) -> None:
    down = f"127.0.0.1:{closed_port()}"
    assert main(["stat", "--servers", f"{wqsd.address},{down}"]) == 1
    captured = capsys.readouterr()
    assert "unreachable" in captured.out and "serving" in captured.out
    assert "1 of 2 nodes failed" in captured.err and down in captured.err
    assert captured.err.count("\n") == 1


def test_ping(wqsd: DaemonProcess, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ping", "--servers", wqsd.address, "-c", "2", "-i", "0"]) == 0
    out = capsys.readouterr().out
    assert wqsd.address in out and "serving" in out and "2/2" in out
    assert main(["ping", "--json", "--servers", wqsd.address]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["data_ok"] and row["control_status"] == "serving"
    assert 0 < row["rtt_min_s"] < 1


def test_control_servers_override(wqsd: DaemonProcess, capsys: pytest.CaptureFixture[str]) -> None:
    wrong = f"127.0.0.1:{closed_port()}"
    assert main(["ping", "--servers", wqsd.address, "--control-servers", wrong]) == 1
    assert "control plane" in capsys.readouterr().err
    assert main(["stat", "--servers", wqsd.address, "--control-servers", "a:1,b:2"]) == 1
    assert "one per server" in capsys.readouterr().err


# --------------------------------------------------------------------------- drain, resume


def test_drain_and_resume_a_node(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`wqs drain NODE` makes the node refuse data-plane requests, `wqs resume NODE` undoes
    it; both need the token of a daemon that has one, and say which node failed."""
    import wqs

    daemon = start_wqsd(tmp_path, auth_token="hunter2")
    try:
        node = daemon.address
        assert main(["drain", node]) == 1  # no token
        assert "auth" in capsys.readouterr().err.lower()

        monkeypatch.setenv("WQS_AUTH_TOKEN", "hunter2")
        with wqs.Client([node], auth_token="hunter2", timeout_s=2.0) as client:
            assert client.put(7, b"before the drain")
            assert main(["drain", node, "--wait", "5"]) == 0
            out = capsys.readouterr().out
            assert out.startswith(f"{node}  drained in ") and "not_serving" in out
            assert client.get(7) is None and client.put(8, b"x") is False  # refused

            out = run_cli("resume", node, "--json")  # as an operator's shell runs it
            assert out.returncode == 1 and b"auth" in out.stderr.lower()  # _env(): no token
            assert main(["resume", node, "--json"]) == 0
            (row,) = json.loads(capsys.readouterr().out)
            assert row == {"address": node, "control_address": f"127.0.0.1:{daemon.port + 1}",
                           "status": "serving", "previous": "not_serving", "ok": True}
            assert client.get(7) == b"before the drain" and client.put(8, b"x")
            assert main(["resume", node]) == 0
            assert capsys.readouterr().out == f"{node}  serving (was serving)\n"

        down = f"127.0.0.1:{closed_port()}"
        assert main(["resume", node, down]) == 1
        captured = capsys.readouterr()
        assert f"{node}  serving" in captured.out and f"{down}  failed: " in captured.out
        assert "1 of 2 nodes failed" in captured.err and captured.err.count("\n") == 1
        assert main(["drain", "nonsense"]) == 2
        assert "NODE 'nonsense'" in capsys.readouterr().err
        assert main(["resume"]) == 2  # NODE is required: no accidental whole-cluster drain
    finally:
        daemon.cleanup()


# --------------------------------------------------------------------------- unreachable


@pytest.mark.parametrize("command", [["get", "1"], ["put", "1", __file__], ["exists", "1"],
                                     ["delete", "1"], ["stat"], ["ping"]])
def test_unreachable_server_is_a_clear_error(command: list[str], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    server = f"127.0.0.1:{closed_port()}"
    if command[0] == "get":
        command = [*command, "-o", str(tmp_path / "o")]
    started = time.monotonic()
    assert main(["--servers", server, *command]) == 1
    assert time.monotonic() - started < 5
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("wqs: ") and err.count("\n") == 1, err
    assert server in err
    assert "not found" not in err  # a dead node is not a miss
    assert not (tmp_path / "o").exists()


def test_unreachable_server_subprocess() -> None:
    server = f"127.0.0.1:{closed_port()}"
    started = time.monotonic()
    proc = run_cli("--servers", server, "--timeout", "2", "get", "0x10")
    assert time.monotonic() - started < 10
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and "cannot connect" in err and server in err
    assert proc.stdout == b""


def test_cli_module_has_a_console_entry_point() -> None:
    assert callable(cli.main)
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.decode().startswith("wqs ")
