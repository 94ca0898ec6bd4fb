"""A connection's RDMA link, SDK side: the verbs under a LinkMachine, driven by the SDK's
pipeline (wqs/rpc/pipeline.py) under the connection's send lock.

Set up during the connection's handshake: RDMA_CONNECT over TCP carries this end's queue
pair and brings back the daemon's; from then on requests are SENDs and answers arrive as
receives, which the pipeline's driver feeds into the connection's receive buffer as if
read from its socket. The client's shared memory (Client.shared_memory) is registered
with the NIC once per segment and announced with REGISTER_MR; blocks there move by the
daemon's RDMA READ and WRITE. A buffer that is not registered goes through the client's
bounce memory (wqs.rpc.shm.Bounce, registered like any segment): copied in (put) or out
(get) by the SDK.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from wqs.rdma.link import LinkMachine, post_actions
from wqs.rdma.verbs import Link, Nic
from wqs.rdma.wire import Endpoint, Memory, check_peer
from wqs.rpc.shm import SharedMemory

RECV_DEPTH = 32  # answers the client can take at once: requests in flight per link
RECV_SIZE = 132 << 10  # the largest answer without payloads
SEND_DEPTH = 32


class ClientRdma:
    """The client's NIC (opened on first use) and its memory registrations.
    Thread-safe."""

    def __init__(self, device: str | None = None, port: int = 1, gid_index: int = 0) -> None:
        self._args = (device, port, gid_index)
        self._lock = threading.Lock()
        self.nic: Nic | None = None
        self.mrs: dict[int, Any] = {}  # SharedMemory segment -> MR

    def open(self) -> Nic:
        with self._lock:
            if self.nic is None:
                self.nic = Nic(*self._args)
            return self.nic

    def memory(self, mem: SharedMemory) -> Memory:
        """mem registered with the NIC (once), as announced to the daemon."""
        with self._lock:
            mr = self.mrs.get(mem.segment_id)
            if mr is None:
                assert self.nic is not None
                mr = self.mrs[mem.segment_id] = self.nic.register(mem.address, mem.size,
                                                                  remote=True)

                def forget(m: SharedMemory) -> None:
                    with self._lock:
                        old = self.mrs.pop(m.segment_id, None)
                    if old is not None:
                        old.close()

                mem.on_close.insert(0, forget)  # deregistered before it is unmapped
        return Memory(mem.segment_id, mr.rkey, mem.address, mem.size)

    def close(self) -> None:
        with self._lock:
            mrs, self.mrs = list(self.mrs.values()), {}
        for mr in mrs:
            mr.close()
        if self.nic is not None:
            self.nic.close()
            self.nic = None


class ClientLink:
    """One connection's queue pair. The caller holds the connection's send lock around
    send, completions and answered."""

    def __init__(self, nic: Nic, roundtrip: Callable[[Any], Any], request_id: int) -> None:
        from wqs.errors import ProtocolError
        from wqs.rpc import protocol as p

        self.verbs = Link(nic, RECV_DEPTH, RECV_SIZE, SEND_DEPTH)
        try:
            local = self.verbs.endpoint()
            answer = roundtrip(p.RdmaConnectRequest(request_id, local.pack()))
            if isinstance(answer, p.ErrorResponse):
                raise ProtocolError(f"RDMA link refused: {answer.status.name}: "
                                    f"{answer.message}")
            if not isinstance(answer, p.RdmaConnectResponse):
                raise ProtocolError(f"expected an RDMA_CONNECT answer, got "
                                    f"{type(answer).__name__}")
            remote = Endpoint.unpack(answer.endpoint)
            check_peer(local, remote)
            self.machine = LinkMachine(RECV_DEPTH, RECV_SIZE, SEND_DEPTH, remote,
                                       counts_answers=True)
            self.machine.start()
            self.perform()
            self.verbs.connect(remote)
        except BaseException:
            self.verbs.close()
            raise
        self.fd = self.verbs.fd

    def send(self, frame: bytes) -> bool:
        ok = self.machine.send(frame)
        self.perform()
        return ok

    def completions(self) -> list[bytes]:
        """The answers that arrived (the channel's fd was readable)."""
        frames: list[bytes] = []
        for c in self.verbs.events():
            frames.extend(self.machine.completed(c, self.verbs.received))
        self.perform()
        return frames

    def answered(self, n: int) -> None:
        for _ in range(n):
            self.machine.answered()
        self.perform()

    def perform(self) -> None:
        post_actions(self.machine, self.verbs)

    @property
    def failure(self) -> str | None:
        return None if self.machine.state.usable else self.machine.state.reason

    def close(self) -> None:
        self.machine.fail("closed")
        self.verbs.close()
