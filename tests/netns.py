"""Test hosts in network namespaces: each gets its own address, reachable from here.

Host i lives in namespace `wqs<tag>n<i>`, joined to the test's namespace by a veth
pair: this side 10.B.<i+1>.1/24, the host's side 10.B.<i+1>.2/24, with B chosen so
that no route of the machine uses 10.B.0.0/16. `cut(i)` takes this
side's link down, so packets to host i vanish (a network cut, not a refused
connection); `heal(i)` brings it back. Everything stays inside namespaces the test
created; `teardown()` removes them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field

def _free_subnet() -> str:
    """A 10.x/16 no route uses yet, so concurrent test runs never share addresses."""
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"],
                            capture_output=True, text=True).stdout
    start = os.getpid() % 100
    for k in range(100):
        subnet = f"10.{150 + (start + k) % 100}"
        if f"{subnet}." not in routes:
            return subnet
    raise RuntimeError("no free 10.x.0.0/16 for test hosts")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def netns_unavailable() -> str | None:
    """Why namespaces cannot be used here, or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2 (`ip`)"
    probe = f"wqsprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as e:
        return f"`ip netns add` is not permitted here: {e.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


@dataclass
class NetnsHosts:
    count: int
    tag: str = field(default_factory=lambda: str(os.getpid() % 100000))
    created: list[int] = field(default_factory=list)
    subnet: str = field(default_factory=_free_subnet)

    def ns(self, i: int) -> str:
        return f"wqs{self.tag}n{i}"

    def host_ip(self, i: int) -> str:
        """The address of test host i (inside its namespace)."""
        return f"{self.subnet}.{i + 1}.2"

    def gateway_ip(self, i: int) -> str:
        """This namespace's address on host i's link (e.g. for etcd to listen on)."""
        return f"{self.subnet}.{i + 1}.1"

    def _veth(self, i: int) -> str:
        return f"wqv{self.tag}x{i}"[-15:]

    def _peer(self, i: int) -> str:
        return f"wqv{self.tag}y{i}"[-15:]

    def setup(self) -> "NetnsHosts":
        # Whatever happens to the links, packets for test hosts never leave the machine:
        # with a link down its /24 route goes, and this catches them instead.
        subprocess.run(["ip", "route", "add", "blackhole", f"{self.subnet}.0.0/16"],
                       capture_output=True)
        for i in range(self.count):
            ns, here, there = self.ns(i), self._veth(i), self._peer(i)
            _ip("netns", "add", ns)
            self.created.append(i)
            _ip("link", "add", here, "type", "veth", "peer", "name", there)
            _ip("link", "set", there, "netns", ns)
            _ip("addr", "add", f"{self.gateway_ip(i)}/24", "dev", here)
            _ip("link", "set", here, "up")
            _ip("-n", ns, "addr", "add", f"{self.host_ip(i)}/24", "dev", there)
            _ip("-n", ns, "link", "set", there, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "default", "via", self.gateway_ip(i))
        return self

    def exec_prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.ns(i)]

    def cut(self, i: int) -> None:
        """Take host i's side of its link down: packets to it are dropped silently."""
        _ip("-n", self.ns(i), "link", "set", self._peer(i), "down")

    def heal(self, i: int) -> None:
        _ip("-n", self.ns(i), "link", "set", self._peer(i), "up")
        _ip("-n", self.ns(i), "route", "replace", "default", "via", self.gateway_ip(i))

    def teardown(self) -> None:
        for i in self.created:
            subprocess.run(["ip", "link", "del", self._veth(i)], capture_output=True)
            subprocess.run(["ip", "netns", "del", self.ns(i)], capture_output=True)
        self.created.clear()
        subprocess.run(["ip", "route", "del", "blackhole", f"{self.subnet}.0.0/16"],
                       capture_output=True)
