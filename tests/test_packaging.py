"""The wheel a user installs: `wqs` is its only top-level name (the repository's bench/
folder installs as `wqs.bench`), the console scripts point into it, and the installed
benchmarks run from outside the repository (their imports are relative, their child
processes find the installed code)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.daemons import ROOT

# Build outputs and environments of the working tree: a stale build/lib would leak into
# the wheel (setuptools copies from it), so the wheel is built from a clean copy.
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info",
                                     "__pycache__", ".pytest_cache", ".hypothesis", "var")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    setuptools = pytest.importorskip("setuptools", reason="setuptools is not installed "
                                     "(pip install -e .[test] brings it)")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} is older than pyproject.toml's "
                    "build requirement (>=77): pip install -e .[test] brings a newer one")
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCE)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                          "--no-build-isolation", "-w", str(work / "dist"), str(src)],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    (built,) = (work / "dist").glob("wqs-*.whl")
    return built


def test_wqs_is_the_only_top_level_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"wqs"}
    assert "wqs/bench/cli.py" in names and "wqs/bench/__init__.py" in names
    # Every file of bench/ ships, under wqs/bench/.
    bench_files = {p.name for p in (ROOT / "bench").glob("*.py")}
    assert {n.rsplit("/", 1)[1] for n in names if n.startswith("wqs/bench/")} >= bench_files


def test_console_scripts_point_into_wqs(wheel):
    z = zipfile.ZipFile(wheel)
    (ep_name,) = [n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt")]
    eps = configparser.ConfigParser()
    eps.read_string(z.read(ep_name).decode())
    assert dict(eps["console_scripts"]) == {"wqs": "wqs.cli:main", "wqsd": "wqs.daemon:main",
                                            "wqs-bench": "wqs.bench.cli:main"}


def test_installed_benchmarks_run_outside_the_repository(wheel, tmp_path):
    """Unpacked as pip would install it and run from elsewhere: ``python -m
    wqs.bench.compare --help``, the wqs-bench entry point, and the raw-socket sink the
    comparison starts as a child process (``-m wqs.bench.rawsock``)."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"}

    def py(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)

    out = py("-m", "wqs.bench.compare", "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: python -m wqs.bench.compare")
    code = ("import sys, wqs, wqs.bench.cli as cli, wqs.bench.procs as procs;"
            "print(wqs.__file__); print(procs.ROOT);"
            "s = procs.RawSink(); print(s.address); s.stop();"
            "sys.exit(cli.main(['--help']))")
    out = py("-c", code)
    assert out.returncode == 0, out.stderr
    wqs_file, root, sink = out.stdout.splitlines()[:3]
    assert Path(wqs_file).is_relative_to(site) and Path(root) == site
    assert sink.startswith("127.0.0.1:")
    assert "usage: wqs-bench" in out.stdout
    out = py("-c", "import bench")
    assert out.returncode != 0 and "No module named 'bench'" in out.stderr
