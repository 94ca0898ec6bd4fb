"""examples/pd_handoff.py: a prefill process writes a request's KV blocks, a decode
process with the daemon list in another order reads them back bit-exact. Needs only the
wqs package (no torch, no engine), so it runs in the default test environment."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.daemons import ROOT, daemon_factory  # noqa: F401 (fixture import)

SCRIPT = ROOT / "examples" / "pd_handoff.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_prefill_and_decode_processes_hand_off_bit_exact(daemon_factory):
    servers = [daemon_factory().address for _ in range(3)]
    out = run("--servers", ",".join(servers), "--tokens", "300")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "bit-exact: yes" in out.stdout
    assert "18/18 blocks hit" in out.stdout  # 300 tokens = 18 full blocks of 16


def test_sides_run_separately_and_a_salt_isolates(daemon_factory):
    servers = [daemon_factory().address for _ in range(2)]
    common = ["--tokens", "100", "--seed", "9"]
    p = run("prefill", "--servers", ",".join(servers), *common)
    assert p.returncode == 0, p.stderr
    wrote = json.loads(p.stdout)
    assert wrote["blocks"] == wrote["committed"] == 6

    d = run("decode", "--servers", ",".join(servers[::-1]), *common)
    read = json.loads(d.stdout)
    assert (read["hits"], read["missing"], read["mismatched"]) == (6, 0, 0)
    assert read["sha256"] == wrote["sha256"]

    other = json.loads(run("decode", "--servers", ",".join(servers), *common,
                           "--cache-salt", "tenant-b").stdout)
    assert other["hits"] == 0


def test_the_script_starts_its_own_cluster():
    out = run("--tokens", "64")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "4/4 blocks hit" in out.stdout and "bit-exact: yes" in out.stdout
