"""One end of an RDMA link, sans-IO: frames and one-sided transfers in, completions in,
verb calls out (h11's shape: the caller does the IO).

    m = LinkMachine(recv_depth, recv_size, send_depth, peer)
    m.start()                               # posts every receive
    m.send(frame, on_sent)                  # a control frame, as one SEND
    m.transfer(write, local, addr, rkey, done)   # RDMA WRITE / READ, done(ok) after
    for c in nic_completions: frames = m.completed(c)   # received frames, in order
    for action in m.take(): perform it       # PostRecv / PostSend / PostRdma

What it decides, and tests check without a NIC:

* receive slots: each is reposted as soon as its frame has been taken out of it;
* send slots (`send_depth` SENDs in flight) and SEND credits (the client: never more
  requests unanswered than the peer has receives posted, nor than it has itself for
  their answers; a credit comes back with each answer, see `answered`): frames past
  either wait in order;
* RDMA READs in flight (at most `MAX_READS`, the QP's max_rd_atomic): past that they
  wait, in order;
* a completion in error fails the link: every transfer waiting or in flight is done(False),
  every frame not sent is dropped, and nothing more is posted (an RC QP in error flushes
  all that was posted after it anyway).

Work request ids carry the kind in their low 2 bits and a slot or ticket above.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Union

from wqs.rdma.verbs import MAX_RD_ATOMIC, Completion
from wqs.rdma.wire import Credits, Endpoint, LinkState

MAX_READS = MAX_RD_ATOMIC
RECV, SEND, RDMA = 0, 1, 2  # wr_id kinds


@dataclass(frozen=True)
class PostRecv:
    slot: int


@dataclass(frozen=True)
class PostSend:
    slot: int
    frame: bytes
    wr_id: int


@dataclass(frozen=True)
class PostRdma:
    write: bool
    local: tuple[tuple[int, int, int], ...]  # (addr, length, lkey) pieces
    remote_addr: int
    rkey: int
    wr_id: int


Action = Union[PostRecv, PostSend, PostRdma]


class LinkMachine:
    def __init__(self, recv_depth: int, recv_size: int, send_depth: int, peer: Endpoint,
                 *, counts_answers: bool) -> None:
        """counts_answers: this end sends requests that the peer answers one for one (the
        client): a SEND credit comes back with each answer, not with the SEND's own
        completion. The daemon's SENDs are answers, consumed by receives the client posted
        for them: only its send slots bound it."""
        assert recv_depth > 0 and send_depth > 0
        self.recv_depth, self.recv_size, self.send_depth = recv_depth, recv_size, send_depth
        self.state = LinkState()
        # A request in flight needs a receive at the peer, and its answer one here.
        self.credits = Credits(min(peer.recv_depth, recv_depth)) if counts_answers else None
        self.actions: list[Action] = []
        self._free_send = list(range(send_depth - 1, -1, -1))
        self._sending: dict[int, Callable[[], None] | None] = {}  # send slot -> on_sent
        self._queued: deque[tuple[bytes, Callable[[], None] | None]] = deque()
        self._tickets = 0
        self._transfers: dict[int, tuple[Callable[[bool], None], bool]] = {}  # -> done, write
        self._reads_waiting: deque[tuple[PostRdma, Callable[[bool], None]]] = deque()
        self._reads = 0

    # ---- setting up ------------------------------------------------------------------

    def start(self) -> None:
        """Every receive posted (before the QP leaves INIT); then the link is ready."""
        self.actions.extend(PostRecv(slot) for slot in range(self.recv_depth))
        self.state.ready()

    def take(self) -> list[Action]:
        out, self.actions = self.actions, []
        return out

    # ---- frames ----------------------------------------------------------------------

    def send(self, frame: bytes, on_sent: Callable[[], None] | None = None) -> bool:
        """Queue a frame (one SEND); False if the link is down (it is dropped)."""
        if len(frame) > self.recv_size:
            raise ValueError(f"a frame of {len(frame)} bytes exceeds the peer's "
                             f"{self.recv_size}-byte receives")
        if not self.state.usable:
            return False
        self._queued.append((frame, on_sent))
        self._pump_sends()
        return True

    def answered(self) -> None:
        """The peer answered one of our frames (client side): its receive is free again."""
        if self.credits is not None:
            self.credits.give()
            self._pump_sends()

    def _pump_sends(self) -> None:
        while self._queued and self._free_send and self.state.usable:
            if self.credits is not None and not self.credits.take():
                return
            frame, on_sent = self._queued.popleft()
            slot = self._free_send.pop()
            self._sending[slot] = on_sent
            self.actions.append(PostSend(slot, frame, slot << 2 | SEND))

    # ---- one-sided -------------------------------------------------------------------

    def transfer(self, write: bool, local: list[tuple[int, int, int]], remote_addr: int,
                 rkey: int, done: Callable[[bool], None]) -> None:
        """RDMA WRITE (or READ) between registered local pieces and the peer's memory;
        done(True) once complete, done(False) if the link failed first."""
        if not self.state.usable:
            done(False)
            return
        self._tickets += 1
        ticket = self._tickets
        post = PostRdma(write, tuple(local), remote_addr, rkey, ticket << 2 | RDMA)
        self._transfers[ticket] = (done, write)
        if not write and self._reads >= MAX_READS:
            self._reads_waiting.append((post, done))
            return
        if not write:
            self._reads += 1
        self.actions.append(post)

    # ---- completions -----------------------------------------------------------------

    def completed(self, c: Completion, received: Callable[[int, int], bytes]
                  ) -> list[bytes]:
        """One work completion; the frames it delivered (`received(slot, n)` copies a
        receive slot's bytes out, after which it is reposted)."""
        kind, n = c.wr_id & 3, c.wr_id >> 2
        what = ("receive", "send", "RDMA transfer")[kind] if kind < 3 else "?"
        if not self.state.completion(c.status, c.vendor_err, what):
            self._fail_all()
            return []
        if kind == RECV:
            frame = received(n, c.byte_len)
            self.actions.append(PostRecv(n))
            return [frame]
        if kind == SEND:
            on_sent = self._sending.pop(n)
            self._free_send.append(n)
            if on_sent is not None:
                on_sent()
            self._pump_sends()
            return []
        done, write = self._transfers.pop(n)
        if not write:
            self._reads -= 1
            if self._reads_waiting:
                post, _ = self._reads_waiting.popleft()
                self._reads += 1
                self.actions.append(post)
        done(True)
        return []

    def fail(self, reason: str) -> None:
        """The link is gone for a reason of the caller's (its TCP connection closed)."""
        self.state.fail(reason)
        self._fail_all()

    def _fail_all(self) -> None:
        self._queued.clear()
        self._reads_waiting.clear()
        transfers, self._transfers = self._transfers, {}
        for done, _ in transfers.values():
            done(False)
        sending, self._sending = self._sending, {}
        for on_sent in sending.values():
            if on_sent is not None:
                on_sent()  # what it held goes back: the frame will never be delivered
        self.actions.clear()

    @property
    def idle(self) -> bool:
        return not (self._queued or self._sending or self._transfers)


def post_actions(machine: LinkMachine, verbs: Any) -> None:
    """Post on `verbs` (a wqs.rdma.verbs.Link) what the machine asks for, in order: the
    one place where both ends turn the machine's actions into verb calls."""
    for a in machine.take():
        if type(a) is PostRecv:
            verbs.post_recv(a.slot)
        elif type(a) is PostSend:
            verbs.post_send(a.slot, a.frame, a.wr_id)
        elif type(a) is PostRdma:
            verbs.post_rdma(a.write, list(a.local), a.remote_addr, a.rkey, a.wr_id)
