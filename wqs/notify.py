"""systemd notify protocol (sd_notify(3)), written out: one datagram per message.

With ``Type=notify`` systemd waits for ``READY=1`` before it calls the service started,
and with ``WatchdogSec=`` it restarts a daemon that stops sending ``WATCHDOG=1``. Without
NOTIFY_SOCKET (not run by systemd) every call is a no-op that returns False.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Notifier:
    address: str | bytes | None = None  # filesystem path, or b"\0..." for abstract sockets
    watchdog_usec: int | None = None  # WATCHDOG_USEC, when the watchdog is meant for us

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        """Read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID (default: os.environ)."""
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET") or None
        address: str | bytes | None = raw
        if raw and raw.startswith("@"):
            address = b"\0" + raw[1:].encode()  # Linux abstract namespace
        elif raw and not raw.startswith("/"):
            log.warning("NOTIFY_SOCKET=%r is not a unix socket; notifications disabled", raw)
            address = None
        usec = None
        pid = env.get("WATCHDOG_PID")
        # WATCHDOG_PID names the process the watchdog is for; a child must not ping.
        if env.get("WATCHDOG_USEC", "").isdigit() and (pid is None or pid == str(os.getpid())):
            usec = int(env["WATCHDOG_USEC"]) or None
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; True when it was sent."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto("\n".join(assignments).encode(), self.address)
            return True
        except OSError as e:  # a lost notification must not take the daemon down
            log.warning("sd_notify %s failed: %s", assignments, e)
            return False

    def ready(self, status: str | None = None) -> bool:
        extra = (f"STATUS={_one_line(status)}",) if status else ()
        return self.notify("READY=1", *extra)

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def reloading(self) -> bool:
        return self.notify("RELOADING=1")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_one_line(text)}")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time to start or stop (e.g. during a long device scan)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def watchdog_timeout_s(self) -> float | None:
        """WatchdogSec as seen by this process, or None when no watchdog is armed for it."""
        return self.watchdog_usec / 1e6 if self.watchdog_usec else None

    def watchdog_interval_s(self) -> float | None:
        """How often to call `watchdog`: half the timeout, as sd_watchdog_enabled(3) advises."""
        timeout = self.watchdog_timeout_s()
        return timeout / 2 if timeout else None


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())  # a newline would start a new assignment
