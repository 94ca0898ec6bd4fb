"""The committed control-plane stubs are what scripts/gen_proto.sh makes of proto/wqs.proto."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = ("control_pb2.py", "control_pb2_grpc.py", "control_pb2.pyi")


def test_committed_stubs_match_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools.protoc",
                        reason="grpcio-tools is not installed (pip install grpcio-tools)")
    # Different grpcio-tools versions emit different (version-stamped) code; only a run
    # with the version that made the committed files can be compared byte for byte.
    committed = (ROOT / "wqs/rpc/control_pb2_grpc.py").read_text()
    m = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", committed)
    assert m, "control_pb2_grpc.py carries no GRPC_GENERATED_VERSION"
    installed = importlib.metadata.version("grpcio-tools")
    if installed != m.group(1):
        pytest.skip(f"committed stubs come from grpcio-tools {m.group(1)}, "
                    f"installed is {installed}")

    subprocess.run(["bash", str(ROOT / "scripts/gen_proto.sh"), str(tmp_path)], check=True,
                   env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
                   capture_output=True)
    for name in FILES:
        fresh = (tmp_path / "wqs/rpc" / name).read_text()
        assert fresh == (ROOT / "wqs/rpc" / name).read_text(), (
            f"wqs/rpc/{name} is stale: run scripts/gen_proto.sh and commit the result")


def test_stubs_import_package_relative() -> None:
    text = (ROOT / "wqs/rpc/control_pb2_grpc.py").read_text()
    assert "from wqs.rpc import control_pb2" in text
    from wqs.rpc import control_pb2, control_pb2_grpc

    assert control_pb2.DESCRIPTOR.package == "wqs.v1"
    assert hasattr(control_pb2_grpc, "ControlStub")
