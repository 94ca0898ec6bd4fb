"""Servers the comparison (and the tests) start and always stop: a WQS daemon, redis-server
and the raw-socket sink, each on a free loopback port, each killed by its own pid."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import wqs

# The directory `wqs` is imported from (the repository, or site-packages once installed):
# child processes get it on their path so they run this same code.
ROOT = Path(wqs.__file__).resolve().parent.parent


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int = 1) -> int:
    """The first of `count` consecutive free loopback ports."""
    rng = random.Random()
    for _ in range(500):
        base = rng.randint(20000, 60000 - count)
        if all(_bindable(base + i) for i in range(count)):
            return base
    raise RuntimeError("no free loopback ports")


def _wait_port(port: int, proc: subprocess.Popen, timeout: float, what: str,
               log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode} during start-up\n{tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


def stop(proc: subprocess.Popen | None, timeout: float = 30.0) -> None:
    """SIGTERM the process we started (by pid), then SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class Daemon:
    """`python -m wqs.daemon` on a free port with its own data dir (removed by stop)."""

    def __init__(self, data_dir: str, device_size: str = "1G", dram_cache: str = "0",
                 workers: int | None = None, keep_dir: bool = False,
                 engine: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.device = os.path.join(data_dir, "wqs.dev")
        self.keep_dir = keep_dir
        os.makedirs(data_dir, exist_ok=True)
        self.port = free_ports(3)
        self.address = f"127.0.0.1:{self.port}"
        cfg = os.path.join(data_dir, "wqsd.yaml")
        with open(cfg, "w") as f:
            f.write(f"metrics_listen: off\nengine:\n  dram_cache_bytes: {dram_cache}\n")
            for key, value in (engine or {}).items():  # more engine settings
                f.write(f"  {key}: {value}\n")
            if workers:
                f.write(f"workers: {workers}\n")
        self.log_path = Path(data_dir) / "wqsd.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wqs.daemon", "--config", cfg, "--listen", self.address,
             "--data-dir", data_dir, "--device-size", device_size, "--log-level", "warning"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=str(ROOT), env=env)
        try:
            _wait_port(self.port, self.proc, 60, "wqsd", self.log_path)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        stop(self.proc)
        self._log.close()
        if not self.keep_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "Daemon":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Redis:
    """redis-server on a free loopback port, no persistence (--save '' --appendonly no)."""

    def __init__(self, work_dir: str) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        os.makedirs(work_dir, exist_ok=True)
        self.port = free_ports(1)
        self.address = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", work_dir, "--protected-mode", "yes",
             "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_port(self.port, self.proc, 20, "redis-server")
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        stop(self.proc, 10)


class RawSink:
    """`python -m bench.rawsock` (`wqs.bench.rawsock` once installed) on a free loopback port."""

    def __init__(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.port = free_ports(1)
        self.address = f"127.0.0.1:{self.port}"
        module = f"{__package__}.rawsock"
        self.proc = subprocess.Popen([sys.executable, "-m", module, "--listen",
                                      self.address], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, cwd=str(ROOT), env=env)
        try:
            _wait_port(self.port, self.proc, 20, module)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        stop(self.proc, 5)
