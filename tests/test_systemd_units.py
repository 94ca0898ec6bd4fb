"""The unit files parse cleanly under systemd-analyze and carry the settings wqsd relies on."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"
BINARY = "/usr/local/bin/wqsd"

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def settings(unit: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (UNITS / unit).read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@needs_analyze
@pytest.mark.parametrize(
    "template, name", [("wqsd.service", "wqsd.service"), ("wqsd@.service", "wqsd@nvme0n1.service")]
)
def test_systemd_analyze_verify_is_clean(tmp_path, template, name):
    # The real ExecStart binary is not installed here; point it at an existing one.
    text = (UNITS / template).read_text()
    assert BINARY in text
    (tmp_path / template).write_text(text.replace(BINARY, shutil.which("true") or "/bin/true"))
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(tmp_path / name)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""},
    )
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0 and not output, output


@pytest.mark.parametrize("unit", ["wqsd.service", "wqsd@.service"])
def test_required_settings(unit):
    s = settings(unit)
    for key, value in {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "TimeoutStopSec": "60",
        "LimitNOFILE": "1048576",
        "LimitMEMLOCK": "infinity",
    }.items():
        assert s.get(key) == [value], key
    assert "PrivateDevices" not in s  # would hide the raw block device
    config = "/etc/wqs/wqsd-%i.yaml" if "@" in unit else "/etc/wqs/wqsd.yaml"
    assert s["ExecStart"] == [f"{BINARY} --config {config}"]
    assert s["StateDirectory"][0].startswith("wqs")
