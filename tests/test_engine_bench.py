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
