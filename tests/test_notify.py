import os
import socket

import pytest

from wqs.notify import Notifier


@pytest.fixture
def listener(tmp_path):
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        s.settimeout(2)
        yield path, s


def recv(s: socket.socket) -> list[str]:
    return s.recv(4096).decode().split("\n")


def test_messages_reach_the_socket(listener, monkeypatch):
    path, s = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    n = Notifier.from_env()
    assert n.enabled
    assert n.ready()
    assert recv(s) == ["READY=1"]
    assert n.watchdog() and recv(s) == ["WATCHDOG=1"]
    assert n.status("scanning\nregion 3/10") and recv(s) == ["STATUS=scanning region 3/10"]
    assert n.extend_timeout(90) and recv(s) == ["EXTEND_TIMEOUT_USEC=90000000"]
    assert n.stopping() and recv(s) == ["STOPPING=1"]
    assert n.ready(status="serving") and recv(s)[-1] == "STATUS=serving"


def test_abstract_socket(monkeypatch):
    name = f"wqs-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(2)
        n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert n.ready() and recv(s)[0] == "READY=1"


def test_noop_without_notify_socket(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier.from_env()
    assert not n.enabled
    assert not n.ready() and not n.watchdog() and not n.stopping() and not n.status("x")
    assert not Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled


def test_missing_socket_does_not_raise(tmp_path):
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert n.enabled and n.ready() is False


def test_watchdog_interval():
    me = str(os.getpid())
    assert Notifier.from_env({}).watchdog_interval_s() is None
    n = Notifier.from_env({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": me})
    assert n.watchdog_timeout_s() == 30.0 and n.watchdog_interval_s() == 15.0
    assert Notifier.from_env({"WATCHDOG_USEC": "2000000"}).watchdog_interval_s() == 1.0
    # Armed for another process (we are a child that inherited the environment).
    other = Notifier.from_env({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval_s() is None
    assert Notifier.from_env({"WATCHDOG_USEC": "junk"}).watchdog_interval_s() is None
    assert Notifier.from_env({"WATCHDOG_USEC": "0"}).watchdog_interval_s() is None
