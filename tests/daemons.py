"""Real `wqsd` processes for integration tests: start, wait until serving, stop, restart.

    from tests.daemons import daemon_factory, start_daemon  # noqa: F401 (fixture import)

    def test_x(daemon_factory):
        d = daemon_factory(config={"engine": {"region_size": "1M"}})
        client = wqs.Client([d.address])
        ...
        assert d.terminate() == 0
        d.restart()

Each daemon is a `python -m wqs.daemon` subprocess with PYTHONPATH at the repository
root, listening on a data port whose +1 (control) and +2 (metrics) neighbours were free
when it was picked. `start_daemon` returns once the data port has answered a HELLO (the
data plane accepts only after the control plane and the metrics endpoint are up), or
raises with the daemon's stderr. The `daemon_factory` fixture kills whatever it started;
an atexit hook is a last resort against leaked processes.

Cluster tests may run a daemon in a network namespace (``netns="ns1"``: the command is
prefixed with ``ip netns exec ns1``, which execs, so `.pid` is still the daemon's) and
pass ``host=`` the namespace's address; the readiness probe then connects to that
address from the test's own namespace, so it must be routable from there (veth pair).
Ports are checked for freedom in the test's namespace only.
"""

from __future__ import annotations

import atexit
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 20.0
DEFAULT_DEVICE_SIZE = "64M"
# Below Linux's default ephemeral range (32768-60999), so client sockets never take them.
PORT_RANGE = (12000, 32000)

_ports_lock = threading.Lock()
_ports_given: set[int] = set()  # base ports handed out by this process (never reused)
_live: "weakref.WeakSet[DaemonProcess]" = weakref.WeakSet()


class DaemonStartError(AssertionError):
    """The daemon exited or did not answer in time; the message holds its stderr."""


# --------------------------------------------------------------------------- ports


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))  # no SO_REUSEADDR: a port in TIME_WAIT counts as taken
        except OSError:
            return False
    return True


def pick_ports(host: str = "127.0.0.1", span: int = 3, attempts: int = 500) -> int:
    """A base port such that base .. base+span-1 are all free on `host` now."""
    bind_host = host if host in ("127.0.0.1", "::1", "localhost") else "127.0.0.1"
    rng = random.Random()
    for _ in range(attempts):
        base = rng.randrange(PORT_RANGE[0], PORT_RANGE[1] - span)
        with _ports_lock:
            if any(base + i in _ports_given or base - i in _ports_given for i in range(span)):
                continue
            if all(_port_free(bind_host, base + i) for i in range(span)):
                _ports_given.add(base)
                return base
    raise RuntimeError(f"no {span} consecutive free ports found in {PORT_RANGE}")


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------- probing


def hello(address: str, timeout_s: float = 1.0) -> bool:
    """True when a WQS data plane at `address` answers a HELLO (no auth needed)."""
    from wqs.config import parse_hostport
    from wqs.rpc import protocol as p

    host, port = parse_hostport(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.sendall(p.encode_request(p.HelloRequest(1)))
            dec = p.FrameDecoder(response=True)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                msg = dec.next_message()
                if msg is not None:
                    return isinstance(msg, p.HelloResponse)
                data = s.recv(max(dec.needed, 1))
                if not data:
                    return False
                dec.feed(data)
    except Exception:  # noqa: BLE001 - any failure means "not yet"
        return False
    return False


# --------------------------------------------------------------------------- the process


def _alive(pid: int) -> bool:
    """Whether pid runs (a zombie waiting for its parent does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class DaemonProcess:
    """One wqsd subprocess; survives restarts with the same ports, device and config."""

    def __init__(self, data_dir: Path, port: int, *, host: str = "127.0.0.1",
                 extra_args: Sequence[str] = (), config: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None, netns: str | None = None,
                 device_size: str | None = DEFAULT_DEVICE_SIZE) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port
        self.netns = netns
        self.extra_args = list(extra_args)
        self.config = dict(config) if config is not None else None
        self.env = dict(env) if env is not None else None
        self.config_path: Path | None = None
        if self.config is not None:
            self.config_path = self.data_dir / "wqsd.yaml"
            self.config_path.write_text(yaml.safe_dump(self.config))
        self.device_size = device_size
        self.proc: subprocess.Popen | None = None
        self.runs = 0  # how many times the process was started
        self.returncode: int | None = None
        self._log = None

    # ---- addresses -------------------------------------------------------------------

    @property
    def address(self) -> str:
        return _hostport(self.host, self.port)

    @property
    def control_address(self) -> str:
        return _hostport(self.host, self.port + 1)

    @property
    def metrics_address(self) -> str:
        return _hostport(self.host, self.port + 2)

    @property
    def metrics_url(self) -> str:
        return f"http://{self.metrics_address}/metrics"

    def request_counts(self) -> dict[str, float]:
        """Data-plane requests served so far, by operation (wqs_request_seconds_count):
        get/put came inline, get_shm/put_shm one-sided (shared memory or RDMA)."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
            text = r.read().decode()
        return {smp.labels["op"]: smp.value
                for fam in text_string_to_metric_families(text)
                for smp in fam.samples if smp.name == "wqs_request_seconds_count"}

    @property
    def auth_token(self) -> str | None:
        return (self.config or {}).get("auth_token")

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def device_path(self) -> Path:
        """The device file, unless config or args name another device."""
        return self.data_dir / "wqs.dev"

    @property
    def log_path(self) -> Path:
        return self.data_dir / f"wqsd.{self.runs}.log"

    # ---- lifecycle -------------------------------------------------------------------

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "wqs.daemon", "--listen", self.address,
               "--data-dir", str(self.data_dir)]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        has_size = "--device-size" in self.extra_args or any(
            a.startswith("--device-size=") for a in self.extra_args) or \
            (self.config or {}).get("device_size") is not None
        if self.device_size and not has_size:
            cmd += ["--device-size", self.device_size]
        cmd += self.extra_args
        if self.netns:
            # A namespace stands for another host, which shares no files with the test:
            # no Unix socket, so clients reach it over the network only.
            cmd = ["ip", "netns", "exec", self.netns, *cmd, "--local-socket", "off"]
        return cmd

    def spawn(self) -> None:
        """Start the process without waiting for it to serve."""
        if self.running:
            raise RuntimeError(f"wqsd {self.address} is already running (pid {self.pid})")
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"]
                                         if env.get("PYTHONPATH") else "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.runs += 1
        self.returncode = None
        self._close_log()
        self._log = open(self.log_path, "w+b")
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=str(ROOT), env=env)
        _live.add(self)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> "DaemonProcess":
        """Block until the data plane answers HELLO; raise with the log if it cannot."""
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.proc.poll() if self.proc else None
            if code is not None:
                self.returncode = code
                raise DaemonStartError(f"wqsd {self.address} exited with {code} before serving:"
                                       f"\n{self.stderr_text()}")
            if hello(self.address, timeout_s=1.0):
                return self
            if time.monotonic() > deadline:
                text = self.stderr_text()
                self.kill()
                raise DaemonStartError(f"wqsd {self.address} did not serve within {timeout_s}s:"
                                       f"\n{text}")
            time.sleep(0.05)

    def start(self, wait: bool = True, timeout_s: float = START_TIMEOUT_S) -> "DaemonProcess":
        self.spawn()
        return self.wait_ready(timeout_s) if wait else self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Wait for the process to exit by itself; its exit code."""
        assert self.proc is not None, "not started"
        try:
            self.returncode = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"wqsd {self.address} still running after {timeout_s}s:\n"
                                 f"{self.stderr_text()}") from None
        return self.returncode

    def signal_all(self, sig: int) -> None:
        """Send sig to the daemon and to its shard processes (SIGSTOP freezes the node)."""
        self.send_signal(sig)
        for pid in self.shard_pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def shard_pids(self) -> list[int]:
        """The daemon's shard processes (its children)."""
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []

    def send_signal(self, sig: int) -> None:
        if self.running:
            self.proc.send_signal(sig)

    def terminate(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait; the exit code (SIGKILL after timeout_s, and an AssertionError)."""
        if self.proc is None:
            raise RuntimeError("not started")
        self.send_signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def kill(self) -> int | None:
        """SIGKILL, wait (for its shards too: the kernel kills them with it); the exit
        code (-9), or None if it was never started."""
        if self.proc is None:
            return None
        shards = self.shard_pids() if self.proc.poll() is None else []
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        self.returncode = self.proc.wait()
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{pid}") and _alive(pid) for pid in shards):
            if time.monotonic() > deadline:
                raise AssertionError(f"shards {shards} of wqsd {self.address} outlived it")
            time.sleep(0.01)
        return self.returncode

    def restart(self, *, kill: bool = False, wait: bool = True) -> "DaemonProcess":
        """Stop (SIGTERM, or SIGKILL with kill=True) if running, start again, wait."""
        if self.running:
            self.kill() if kill else self.terminate()
        return self.start(wait=wait)

    def stderr_text(self, run: int | None = None) -> str:
        """stdout+stderr of one run (default: the latest) as text."""
        path = self.log_path if run is None else self.data_dir / f"wqsd.{run}.log"
        try:
            return path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def all_stderr_text(self) -> str:
        return "".join(self.stderr_text(r) for r in range(1, self.runs + 1))

    def rss_kib(self) -> int:
        """VmRSS of the daemon and its shard processes together, in KiB."""
        total = 0
        for pid in [self.pid, *self.shard_pids()]:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return total

    def cleanup(self) -> None:
        self.kill()
        self._close_log()
        _live.discard(self)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __repr__(self) -> str:
        state = f"pid {self.proc.pid}" if self.running else f"exit {self.returncode}"
        return f"<wqsd {self.address} {state}>"


def start_daemon(tmp_path: Path, port: int | None = None, *, extra_args: Sequence[str] = (),
                 config: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                 netns: str | None = None, host: str = "127.0.0.1", name: str | None = None,
                 wait: bool = True, device_size: str | None = DEFAULT_DEVICE_SIZE,
                 timeout_s: float = START_TIMEOUT_S) -> DaemonProcess:
    """Start wqsd with its data under tmp_path/<name or wqsd-PORT>; see the module doc.

    With port=None a free base port is picked (and a start that loses a race for it is
    retried on another). wait=False returns as soon as the process is spawned (for
    daemons expected to fail: use `.wait()` for the exit code).
    """
    for attempt in range(3):
        base = port if port is not None else pick_ports(host)
        d = DaemonProcess(Path(tmp_path) / (name or f"wqsd-{base}"), base, host=host,
                          extra_args=extra_args, config=config, env=env, netns=netns,
                          device_size=device_size)
        if not wait:
            d.spawn()
            return d
        try:
            return d.start(timeout_s=timeout_s)
        except DaemonStartError as e:
            d.cleanup()
            if port is None and attempt < 2 and ("in use" in str(e) or "cannot listen" in str(e)):
                continue  # another process took one of the ports meanwhile
            raise
    raise AssertionError("unreachable")


class DaemonFactory:
    """Starts daemons under one directory and kills them all on cleanup()."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = Path(base_dir)
        self.daemons: list[DaemonProcess] = []

    def __call__(self, port: int | None = None, **kwargs: Any) -> DaemonProcess:
        d = start_daemon(self.base_dir, port, **kwargs)
        self.daemons.append(d)
        return d

    def cleanup(self) -> None:
        for d in self.daemons:
            d.cleanup()


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """daemon_factory(port=None, **start_daemon kwargs) -> DaemonProcess; all killed after."""
    factory = DaemonFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.cleanup()


@atexit.register
def _kill_leftovers() -> None:
    for d in list(_live):
        try:
            d.cleanup()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass
