"""The verbs the RDMA transport calls, on pyverbs (rdma-core's Python binding). Thin:
everything that is not a verb call lives in wqs/rdma/wire.py.

`Nic` opens a device, its protection domain and the GID to route by; `Link` is one RC
queue pair with its completion queue, a completion channel whose file descriptor the
caller's event loop watches, and a registered ring of receive and send buffers of
`recv_size` bytes each. `Link.connect(remote)` moves the QP through INIT, RTR and RTS.

pyverbs does not hand out the completion channel's file descriptor, and an event loop
needs it; the one the channel opened is found in /proc/self/fd by its kind
(`anon_inode:[infinibandevent]`), right after the channel is created.

On Debian, pyverbs is the python3-pyverbs package and installs for the system
interpreter; `install.sh --rdma` (or `scripts/link-pyverbs.sh VENV`) makes it importable
from WQS's virtual environment.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

from wqs.rdma.wire import Endpoint, RdmaError, path_mtu

RETRY_CNT = 7
RNR_RETRY = 7  # 7: retry for ever; receives are always posted ahead (wire.Credits)
TIMEOUT = 14  # 4.096 µs * 2^14 = 67 ms per transport retry
MIN_RNR_TIMER = 12
MAX_RD_ATOMIC = 16  # RDMA READs in flight per QP, each way


def _pyverbs() -> Any:
    try:
        import pyverbs.addr
        import pyverbs.cq
        import pyverbs.device
        import pyverbs.enums
        import pyverbs.mr
        import pyverbs.pd
        import pyverbs.qp
        import pyverbs.wr
    except ImportError as e:
        raise RdmaError(f"pyverbs is not importable ({e}); Debian: apt install "
                        "python3-pyverbs, then install.sh --rdma") from None
    return pyverbs


@dataclass(frozen=True)
class Completion:
    wr_id: int
    status: int  # enum ibv_wc_status; 0 success
    opcode: int
    byte_len: int
    vendor_err: int


class Nic:
    """An opened RDMA device: context, protection domain, port and GID."""

    def __init__(self, name: str | None = None, port: int = 1, gid_index: int = 0) -> None:
        pv = _pyverbs()
        try:
            names = [d.name.decode() for d in pv.device.get_device_list()]
        except Exception as e:  # PyverbsRDMAError: no RDMA in the kernel
            raise RdmaError(f"no RDMA support: {e}") from None
        if not names:
            raise RdmaError("no RDMA device found")
        if name is None:
            name = names[0]
        elif name not in names:
            raise RdmaError(f"rdma.device {name!r} not found (devices: {', '.join(names)})")
        self.pv = pv
        self.name = name
        self.port = port
        self.gid_index = gid_index
        self.ctx = pv.device.Context(name=name)
        attr = self.ctx.query_port(port)
        if attr.state != pv.enums.IBV_PORT_ACTIVE:
            raise RdmaError(f"{name} port {port} is not active (state {attr.state})")
        self.lid = attr.lid
        self.mtu = int(attr.active_mtu)
        self.gid = _gid_bytes(self.ctx.query_gid(port, gid_index).gid)
        self.pd = pv.pd.PD(self.ctx)

    def register(self, address: int, length: int, remote: bool) -> Any:
        """An MR over memory the caller keeps mapped (remote: the peer may read and
        write it with its rkey)."""
        e = self.pv.enums
        access = e.IBV_ACCESS_LOCAL_WRITE
        if remote:
            access |= e.IBV_ACCESS_REMOTE_READ | e.IBV_ACCESS_REMOTE_WRITE
        return self.pv.mr.MR(self.pd, length, access, address=address)

    def close(self) -> None:
        self.pd.close()
        self.ctx.close()


class Link:
    """One RC queue pair and its buffers. Owned by one thread (a shard's loop, or the
    SDK's driver): no locks."""

    def __init__(self, nic: Nic, recv_depth: int, recv_size: int, send_depth: int) -> None:
        pv = nic.pv
        self.nic = nic
        self.pv = pv
        self.recv_depth, self.recv_size, self.send_depth = recv_depth, recv_size, send_depth
        before = set(os.listdir("/proc/self/fd"))
        self.channel = pv.cq.CompChannel(nic.ctx)
        self.fd = _new_event_fd(before)
        depth = recv_depth + 2 * send_depth
        self.cq = pv.cq.CQ(nic.ctx, depth, None, self.channel, 0)
        self.cq.req_notify()
        cap = pv.qp.QPCap(max_send_wr=send_depth, max_recv_wr=recv_depth, max_send_sge=4,
                          max_recv_sge=1)
        init = pv.qp.QPInitAttr(qp_type=pv.enums.IBV_QPT_RC, scq=self.cq, rcq=self.cq,
                                cap=cap, sq_sig_all=0)
        self.qp = pv.qp.QP(nic.pd, init)
        self.psn = random.randrange(1 << 24)
        # Receive and send buffers: one MR each, cut in recv_size slots.
        self.rbuf = pv.mr.MR(nic.pd, recv_depth * recv_size, pv.enums.IBV_ACCESS_LOCAL_WRITE)
        self.sbuf = pv.mr.MR(nic.pd, send_depth * recv_size, pv.enums.IBV_ACCESS_LOCAL_WRITE)

    def endpoint(self) -> Endpoint:
        n = self.nic
        return Endpoint(self.qp.qp_num, self.psn, n.lid, n.mtu, n.port, n.gid,
                        self.recv_depth, self.recv_size)

    def connect(self, remote: Endpoint) -> None:
        """INIT -> RTR (to the remote QP) -> RTS, receives posted first."""
        pv, n = self.pv, self.nic
        e = pv.enums
        attr = pv.qp.QPAttr(qp_state=e.IBV_QPS_INIT)
        attr.port_num = n.port
        attr.pkey_index = 0
        attr.qp_access_flags = (e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_READ
                                | e.IBV_ACCESS_REMOTE_WRITE)
        self.qp.to_init(attr)
        for slot in range(self.recv_depth):
            self.post_recv(slot)
        attr = pv.qp.QPAttr(qp_state=e.IBV_QPS_RTR)
        attr.dest_qp_num = remote.qpn
        attr.rq_psn = remote.psn
        attr.path_mtu = path_mtu(self.endpoint(), remote)
        attr.max_dest_rd_atomic = MAX_RD_ATOMIC
        attr.min_rnr_timer = MIN_RNR_TIMER
        gr = None
        if remote.global_route:
            gid = pv.addr.GID()
            gid.gid = _gid_text(remote.gid)
            gr = pv.addr.GlobalRoute(dgid=gid, sgid_index=n.gid_index)
        attr.ah_attr = pv.addr.AHAttr(dlid=remote.lid, port_num=n.port,
                                      is_global=1 if gr is not None else 0, gr=gr)
        self.qp.to_rtr(attr)
        attr.qp_state = e.IBV_QPS_RTS
        attr.sq_psn = self.psn
        attr.timeout = TIMEOUT
        attr.retry_cnt = RETRY_CNT
        attr.rnr_retry = RNR_RETRY
        attr.max_rd_atomic = MAX_RD_ATOMIC
        self.qp.to_rts(attr)

    # ---- posting ---------------------------------------------------------------------

    def post_recv(self, slot: int) -> None:
        pv = self.pv
        sge = pv.wr.SGE(self.rbuf.buf + slot * self.recv_size, self.recv_size, self.rbuf.lkey)
        self.qp.post_recv(pv.wr.RecvWR(wr_id=slot, num_sge=1, sg=[sge]))

    def received(self, slot: int, nbytes: int) -> bytes:
        return self.rbuf.read(nbytes, slot * self.recv_size)

    def post_send(self, slot: int, frame: bytes, wr_id: int) -> None:
        """SEND frame (copied into send slot `slot`), signaled."""
        assert len(frame) <= self.recv_size, "a frame larger than the peer's receives"
        pv = self.pv
        self.sbuf.write(frame, len(frame), slot * self.recv_size)
        sge = pv.wr.SGE(self.sbuf.buf + slot * self.recv_size, len(frame), self.sbuf.lkey)
        wr = pv.wr.SendWR(wr_id=wr_id, opcode=pv.enums.IBV_WR_SEND, num_sge=1, sg=[sge],
                          send_flags=pv.enums.IBV_SEND_SIGNALED)
        self.qp.post_send(wr)

    def post_rdma(self, write: bool, local: list[tuple[int, int, int]], remote_addr: int,
                  rkey: int, wr_id: int) -> None:
        """RDMA WRITE local (addr, length, lkey) pieces to remote_addr, or READ into
        them from it; signaled."""
        pv = self.pv
        sges = [pv.wr.SGE(a, n, k) for a, n, k in local]
        opcode = pv.enums.IBV_WR_RDMA_WRITE if write else pv.enums.IBV_WR_RDMA_READ
        wr = pv.wr.SendWR(wr_id=wr_id, opcode=opcode, num_sge=len(sges), sg=sges,
                          send_flags=pv.enums.IBV_SEND_SIGNALED)
        wr.set_wr_rdma(rkey, remote_addr)
        self.qp.post_send(wr)

    # ---- completions -------------------------------------------------------------------

    def events(self) -> list[Completion]:
        """After the channel's fd is readable: take the event, re-arm, drain the CQ."""
        self.channel.get_cq_event(self.cq)
        self.cq.ack_events(1)
        self.cq.req_notify()
        return self.poll()

    def poll(self, batch: int = 64) -> list[Completion]:
        out = []
        while True:
            n, wcs = self.cq.poll(batch)
            out.extend(Completion(w.wr_id, w.status, w.opcode, w.byte_len, w.vendor_err)
                       for w in wcs[:n])
            if n < batch:
                return out

    def close(self) -> None:
        for obj in (self.qp, self.cq, self.channel, self.rbuf, self.sbuf):
            try:
                obj.close()
            except Exception:  # noqa: BLE001 - tearing down a link that failed
                pass


def _gid_bytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _gid_text(raw: bytes) -> str:
    h = raw.hex()
    return ":".join(h[i : i + 4] for i in range(0, 32, 4))


def _new_event_fd(before: set[str]) -> int:
    """The completion channel's fd: the one new `[infinibandevent]` descriptor."""
    for name in set(os.listdir("/proc/self/fd")) - before:
        try:
            if "infinibandevent" in os.readlink(f"/proc/self/fd/{name}"):
                return int(name)
        except OSError:
            continue
    raise RdmaError("cannot find the completion channel's file descriptor")
