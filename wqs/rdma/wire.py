"""The RDMA transport's rules, sans-IO: what the two ends exchange and what each may do.

Nothing here calls a verb. The daemon and the SDK feed it what they received and what
completed; it answers with what to post next, or why the link is dead. The verbs layer
(wqs/rdma/verbs.py) is thin on purpose: everything that can be decided without a NIC is
decided, and unit-tested, here.

Setting up a link (over the data plane's TCP connection, after HELLO and AUTH):

    client                                   daemon
      RDMA_CONNECT (client's Endpoint)  -->    check it, create a QP, move it to RTR/RTS
                                        <--    RDMA_CONNECT answer (daemon's Endpoint)
      move its QP to RTR/RTS
      REGISTER_MR (segment, rkey, addr, size) for each memory region, then GET_SHM /
      PUT_SHM / EXISTS / ... as SENDs on the QP; one answer SENT back per request.

From then on, every frame is one SEND (at most the receiver's `recv_size` bytes), so the
frames are the data plane's own (proto/DATAPLANE.md). The one-sided items name (segment,
offset, length) as over shared memory; the daemon resolves the segment to the client's
(addr, rkey), checks the range, and RDMA-WRITEs a hit there (GET_SHM) or RDMA-READs a
payload from there (PUT_SHM) before it answers. On RC, a SEND posted after a WRITE on the
same QP is delivered after the WRITE's data is placed: the answer never overtakes the
bytes it announces.

Flow control (`Credits`): each end posts `recv_depth` receive buffers of `recv_size`
bytes and reposts one as soon as it has taken the frame out of it. A sender may have at
most the peer's `recv_depth` SENDs not yet answered (the client: requests in flight; the
daemon answers each request once, and the client keeps a receive posted for each
request it has in flight), so no SEND ever meets a receiver with no buffer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from wqs.errors import ProtocolError, WQSError

# Endpoint: qpn psn lid mtu port gid recv_depth recv_size
ENDPOINT = struct.Struct("<IIHBB16sII")
# A registered memory region: segment rkey addr size
MEMORY = struct.Struct("<IIQQ")
MTU_BYTES = {1: 256, 2: 512, 3: 1024, 4: 2048, 5: 4096}  # enum ibv_mtu -> bytes
MAX_QPN = (1 << 24) - 1  # QP numbers and PSNs are 24 bits
MIN_RECV_SIZE = 4096  # room for any frame without payloads the client sends
MAX_RECV_SIZE = 1 << 20
MAX_RECV_DEPTH = 4096


class RdmaError(WQSError):
    """The RDMA link failed or cannot be set up; the message says why (and the client
    falls back to nothing silently: it reports it)."""


@dataclass(frozen=True)
class Endpoint:
    """What one end tells the other to connect an RC queue pair to it."""

    qpn: int
    psn: int
    lid: int  # InfiniBand; 0 on RoCE
    mtu: int  # enum ibv_mtu, 1..5 (256..4096 bytes)
    port: int
    gid: bytes  # 16 bytes; RoCE routes by it
    recv_depth: int  # receive buffers it keeps posted: SENDs the peer may have in flight
    recv_size: int  # bytes of each: the largest frame it accepts

    def __post_init__(self) -> None:
        problems = []
        if not 0 < self.qpn <= MAX_QPN:
            problems.append(f"qpn {self.qpn}")
        if not 0 <= self.psn <= MAX_QPN:
            problems.append(f"psn {self.psn}")
        if not 0 <= self.lid < 1 << 16:
            problems.append(f"lid {self.lid}")
        if self.mtu not in MTU_BYTES:
            problems.append(f"mtu {self.mtu}")
        if not 0 < self.port < 256:
            problems.append(f"port {self.port}")
        if not isinstance(self.gid, bytes) or len(self.gid) != 16:
            problems.append("gid (16 bytes)")
        if not 0 < self.recv_depth <= MAX_RECV_DEPTH:
            problems.append(f"recv_depth {self.recv_depth}")
        if not MIN_RECV_SIZE <= self.recv_size <= MAX_RECV_SIZE:
            problems.append(f"recv_size {self.recv_size}")
        if problems:
            raise ProtocolError("RDMA endpoint out of range: " + ", ".join(problems))

    def pack(self) -> bytes:
        return ENDPOINT.pack(self.qpn, self.psn, self.lid, self.mtu, self.port, self.gid,
                             self.recv_depth, self.recv_size)

    @classmethod
    def unpack(cls, body: bytes) -> "Endpoint":
        if len(body) != ENDPOINT.size:
            raise ProtocolError(f"RDMA endpoint of {len(body)} bytes, expected {ENDPOINT.size}")
        return cls(*ENDPOINT.unpack(body))

    @property
    def global_route(self) -> bool:
        """Whether packets to it need a GRH (RoCE, or IB across subnets)."""
        return self.lid == 0 or any(self.gid)


@dataclass(frozen=True)
class Memory:
    """A region of the client's memory the daemon may RDMA-read and -write."""

    segment: int
    rkey: int
    addr: int
    size: int

    def pack(self) -> bytes:
        try:
            return MEMORY.pack(self.segment, self.rkey, self.addr, self.size)
        except struct.error as e:
            raise ProtocolError(f"memory region out of range: {e}") from None

    @classmethod
    def unpack(cls, body: bytes) -> "Memory":
        if len(body) != MEMORY.size:
            raise ProtocolError(f"memory region of {len(body)} bytes, expected {MEMORY.size}")
        m = cls(*MEMORY.unpack(body))
        if not m.size or m.addr + m.size > 1 << 64:
            raise ProtocolError(f"memory region {m.addr:#x}+{m.size} is empty or wraps")
        return m


def path_mtu(a: Endpoint, b: Endpoint) -> int:
    """The MTU both ends can use (enum ibv_mtu)."""
    return min(a.mtu, b.mtu)


def check_peer(local: Endpoint, remote: Endpoint) -> None:
    """Raise RdmaError if the two ends cannot talk (on the same kind of fabric)."""
    if local.global_route != remote.global_route:
        raise RdmaError("one end routes by GID (RoCE) and the other by LID (InfiniBand): "
                        "they are not on the same fabric")
    if remote.recv_size < MIN_RECV_SIZE:
        raise RdmaError(f"the peer accepts frames of {remote.recv_size} bytes only")


class Credits:
    """SENDs one end may still post before the peer has room (its posted receives)."""

    def __init__(self, peer_recv_depth: int) -> None:
        assert peer_recv_depth > 0
        self.limit = peer_recv_depth
        self.used = 0

    def available(self) -> int:
        return self.limit - self.used

    def take(self) -> bool:
        if self.used >= self.limit:
            return False
        self.used += 1
        return True

    def give(self) -> None:
        self.used -= 1
        assert self.used >= 0, "a credit returned twice"


# ---- the link's state --------------------------------------------------------------

CONNECTING, READY, FAILED, CLOSED = "CONNECTING", "READY", "FAILED", "CLOSED"

# enum ibv_wc_status -> what an operator should read (values from <infiniband/verbs.h>)
WC_STATUS = {
    0: "success", 1: "local length error", 2: "local QP operation error",
    3: "local EE context operation error", 4: "local protection error",
    5: "work request flushed (the QP is in error)", 6: "memory window bind error",
    7: "bad response", 8: "local access error", 9: "remote invalid request",
    10: "remote access error (a bad rkey or range)", 11: "remote operation error",
    12: "transport retry counter exceeded (the peer is unreachable)",
    13: "RNR retry counter exceeded (the peer had no receive posted)",
    14: "local RDD violation", 15: "remote invalid RD request", 16: "remote aborted",
    17: "invalid EE context number", 18: "invalid EE context state", 19: "fatal error",
    20: "response timeout", 21: "general error",
}


def describe_wc(status: int, vendor_err: int = 0) -> str:
    text = WC_STATUS.get(status, f"status {status}")
    return f"{text} (vendor error {vendor_err:#x})" if vendor_err else text


class LinkState:
    """One RDMA link's life: CONNECTING until both ends' QPs are in RTS, READY, then
    FAILED (a completion in error: every request in flight fails, the link is not
    reused) or CLOSED. A completion error is final: an RC QP in the error state flushes
    everything posted after it."""

    def __init__(self) -> None:
        self.state = CONNECTING
        self.reason: str | None = None

    def ready(self) -> None:
        assert self.state == CONNECTING, f"link {self.state}, not connecting"
        self.state = READY

    def completion(self, status: int, vendor_err: int = 0, what: str = "") -> bool:
        """A work completion arrived: True if the link is still usable."""
        if status == 0:
            return self.state == READY
        if self.state in (CONNECTING, READY):
            self.state = FAILED
            self.reason = f"{what + ': ' if what else ''}{describe_wc(status, vendor_err)}"
        return False

    def fail(self, reason: str) -> None:
        if self.state in (CONNECTING, READY):
            self.state = FAILED
            self.reason = reason

    def close(self) -> None:
        self.state = CLOSED

    @property
    def usable(self) -> bool:
        return self.state == READY


class Slots:
    """First-fit allocation of 4 KiB-aligned slots in a region of `size` bytes, free
    neighbours merged: the staging memory of a link (daemon) and the SDK's bounce memory
    for buffers that are not registered."""

    ALIGN = 4096

    def __init__(self, size: int) -> None:
        assert size > 0 and size % self.ALIGN == 0
        self.size = size
        self.free: list[tuple[int, int]] = [(0, size)]  # (offset, length), by offset

    def _round(self, n: int) -> int:
        return max(self.ALIGN, (n + self.ALIGN - 1) // self.ALIGN * self.ALIGN)

    def take(self, n: int) -> int | None:
        n = self._round(n)
        for k, (off, length) in enumerate(self.free):
            if length >= n:
                if length == n:
                    del self.free[k]
                else:
                    self.free[k] = (off + n, length - n)
                return off
        return None

    def give(self, off: int, n: int) -> None:
        n = self._round(n)
        free = self.free
        k = 0
        while k < len(free) and free[k][0] < off:
            k += 1
        assert (k == len(free) or off + n <= free[k][0]) and \
            (k == 0 or free[k - 1][0] + free[k - 1][1] <= off), "a slot given back twice"
        free.insert(k, (off, n))
        if k + 1 < len(free) and off + n == free[k + 1][0]:
            free[k] = (off, n + free[k + 1][1])
            del free[k + 1]
        if k and free[k - 1][0] + free[k - 1][1] == off:
            free[k - 1] = (free[k - 1][0], free[k - 1][1] + free[k][1])
            del free[k]

    @property
    def available(self) -> int:
        return sum(n for _, n in self.free)
