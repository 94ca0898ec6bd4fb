"""The same-host shared-memory transport: memfd segments, the daemon's Unix sockets,
GET_SHM / PUT_SHM through real daemons, and what a lying client can and cannot do."""

from __future__ import annotations

import array
import fcntl
import logging
import mmap
import os
import socket
import stat
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import wqs
from tests.daemons import daemon_factory  # noqa: F401 (fixture)
from wqs.errors import BlockTooLarge, ConfigError, TransportUnavailable
from wqs.rpc import protocol as p
from wqs.engine import format as fmt
from wqs.rpc.shm import (
    ENTRY_HEADER, SLOT_ALIGN, SharedMemory, SharedMemoryMap, buffer_address, slot_size,
)
from wqs.server.segments import SegmentError, Segments

BS = 64 << 10
KiB = 1024


def bid(i: int) -> bytes:
    return i.to_bytes(16, "big")


def block(i: int, n: int = BS) -> bytes:
    return np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8).tobytes()


# --- the client's segments ------------------------------------------------------------

def test_shared_memory_is_a_sealed_memfd():
    with SharedMemory(1 << 20) as mem:
        seals = fcntl.fcntl(mem.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
        assert seals & fcntl.F_SEAL_SEAL  # and no one can lift them
        with pytest.raises(PermissionError):
            os.ftruncate(mem.fd, 4096)  # the pages a daemon maps cannot go away
        assert os.readlink(f"/proc/self/fd/{mem.fd}").startswith("/memfd:")
        mem.buffer[:3] = b"abc"
        assert bytes(mem.buffer[:3]) == b"abc" and len(mem) == 1 << 20


def test_block_views_are_placed_for_direct_reads():
    assert ENTRY_HEADER == fmt.ENTRY_HEADER_SIZE and SLOT_ALIGN == fmt.UNIT
    with SharedMemory(1 << 20) as mem:
        views = mem.block_views(BS)
        stride = slot_size(BS)
        assert stride == 68 * KiB and len(views) == (1 << 20) // stride
        m = SharedMemoryMap()
        m._starts, m._segs = [mem.address], [mem]
        for k, v in enumerate(views[:3]):
            seg, offset = m.find(v)
            assert seg is mem and offset == k * stride + ENTRY_HEADER
            assert (mem.address + offset - ENTRY_HEADER) % 4096 == 0
            assert mem.in_slot(offset, BS)
        assert not mem.in_slot(0, BS) and not mem.in_slot(ENTRY_HEADER + 1, BS)
        assert not mem.in_slot(ENTRY_HEADER, stride)  # longer than its slot
        with pytest.raises(ValueError):
            mem.block_views(BS, count=100)


def test_the_map_finds_only_live_shared_buffers():
    m = SharedMemoryMap()
    a, b = m.create(64 * KiB), m.create(64 * KiB)
    assert a.segment_id != b.segment_id
    assert m.find(b.buffer[100:200]) == (b, 100)
    arr = np.frombuffer(a.buffer, dtype=np.uint8)
    assert m.find(memoryview(arr[4096:8192])) == (a, 4096)
    assert m.find(memoryview(bytearray(10))) is None  # private memory
    assert m.find(memoryview(b"bytes")) is None  # read-only: never shared
    view = b.buffer[10:20]
    b.close()
    assert m.find(view) is None  # closed: no longer registered
    m.close()


# --- the daemon's segments ------------------------------------------------------------

def _memfd(size: int, seals: int = fcntl.F_SEAL_SHRINK) -> int:
    fd = os.memfd_create("t", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def test_segments_accept_only_memfds_sealed_against_shrinking(tmp_path):
    segs = Segments(max_segments=2, max_bytes=1 << 20)
    seg = segs.register(1, _memfd(8192), 8192)
    seg.view[:2] = b"hi"
    with pytest.raises(SegmentError, match="F_SEAL_SHRINK"):
        segs.register(2, _memfd(8192, seals=0), 8192)
    path = tmp_path / "f"
    path.write_bytes(bytes(8192))
    with pytest.raises(SegmentError, match="cannot be sealed"):
        segs.register(2, os.open(path, os.O_RDWR), 8192)
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(SegmentError, match="not a pipe"):
        segs.register(2, r, 8192)
    with pytest.raises(SegmentError, match="frame says 4096"):
        segs.register(2, _memfd(8192), 4096)
    with pytest.raises(SegmentError, match="already registered"):
        segs.register(1, _memfd(8192), 8192)
    with pytest.raises(SegmentError, match="must be 1.."):
        segs.register(2, _memfd(8192), 2 << 20)
    segs.register(2, _memfd(4096), 4096)
    with pytest.raises(SegmentError, match="more than 2 segments"):
        segs.register(3, _memfd(4096), 4096)
    assert segs.range(1, 4096, 4096) is seg
    with pytest.raises(SegmentError, match="outside segment 1"):
        segs.range(1, 4097, 4096)
    with pytest.raises(SegmentError, match="not registered"):
        segs.range(9, 0, 1)


def test_a_segment_in_use_is_unmapped_only_when_its_io_is_done():
    segs = Segments()
    seg = segs.register(1, _memfd(8192), 8192)
    Segments.hold(seg)
    segs.unregister(1)
    assert seg.dead and not seg.mem.closed  # the read into it may still land
    seg.view[:1] = b"x"
    segs.unhold(seg)
    assert seg.mem.closed
    seg = segs.register(2, _memfd(8192), 8192)
    segs.close()
    assert seg.mem.closed and len(segs) == 0


# --- through a daemon -----------------------------------------------------------------

@pytest.fixture
def node(daemon_factory):  # noqa: F811
    return daemon_factory(extra_args=["--workers", "2"], device_size="256M")


def _client(d, **options) -> wqs.Client:
    return wqs.Client([d.address], **options)


def test_blocks_move_through_shared_memory_bit_exact(node):
    with _client(node) as c:
        mem = c.shared_memory(8 << 20)
        src = mem.block_views(BS, 40)
        for k, v in enumerate(src):
            v[:] = block(k)
        ids = [bid(k) for k in range(40)]
        assert all(c.put_many(zip(ids, src)))
        assert c._pipe.node(node.address).local_paths  # a local node: shared memory
        out = mem.block_views(BS, 40, start=(40 * slot_size(BS) + 4095) // 4096 * 4096)
        got = c.get_many(ids, outs=out)
        assert not got.errors
        for k in range(40):
            assert bytes(got[k]) == block(k)
            # No copy in the SDK: the result is the out buffer, filled by the daemon.
            assert got[k].obj is out[k].obj and len(got[k]) == BS
        # A get without out buffers goes inline, as over TCP.
        assert c.get(bid(3)) == block(3)
        assert node.request_counts()["get"] == 1


def test_plain_buffers_move_one_sided_through_bounce_memory(daemon_factory):  # noqa: F811
    """Buffers the caller did not put in shared memory (bytes, bytearrays, numpy arrays:
    what LMCache and vLLM hand over) are copied once through the client's bounce memory,
    so the daemon still reads from the SSD straight into shared memory; what the bounce
    memory cannot hold goes inline; bounce_bytes 0 turns it off."""
    from wqs.rpc.control import ControlClient

    d = daemon_factory(config={"engine": {"dram_cache_bytes": 0}})  # every hit from the SSD
    ids = [bid(200 + k) for k in range(8)]
    with _client(d) as c, ControlClient(d.control_address) as cc:
        assert c.transport(d.address) == "shm"
        assert all(c.put_many([(i, block(200 + k)) for k, i in enumerate(ids)]))
        outs = [np.zeros(BS, dtype=np.uint8) for _ in ids]
        got = c.get_many(ids, outs=outs)
        assert [bytes(g) for g in got] == [block(200 + k) for k in range(8)]
        assert got[0].obj is outs[0].data.obj  # the caller's own buffer, filled
        counts = d.request_counts()
        assert counts["put_shm"] >= 1 and counts["get_shm"] >= 1
        assert counts["put"] == counts["get"] == 0
        stats = cc.stats()["engine"]
        assert stats["direct_writes"] == 8 and stats["direct_reads"] == 8
        assert c._bounce.memory is not None and c._bounce.memory.segment_id
        # Every slot is given back once its answer is in.
        assert c._bounce._slots.free == [(0, c._bounce.size)]
    # A bounce memory that holds two blocks: the rest of a call goes inline, all exact.
    with _client(d, bounce_bytes=2 * slot_size(BS)) as c:
        before = d.request_counts()
        got = c.get_many(ids, outs=[bytearray(BS) for _ in ids])
        assert [bytes(g) for g in got] == [block(200 + k) for k in range(8)]
        after = d.request_counts()
        assert after["get_shm"] > before["get_shm"] and after["get"] > before["get"]
    with _client(d, bounce_bytes=0) as c:
        before = d.request_counts()
        assert bytes(c.get_many(ids[:1], outs=[bytearray(BS)])[0]) == block(200)
        after = d.request_counts()
        assert after["get"] == before["get"] + 1 and after["get_shm"] == before["get_shm"]
        assert c._bounce.memory is None
    with pytest.raises(ConfigError, match="bounce_bytes: must be a multiple of 4096"):
        _client(d, bounce_bytes=5000)


def test_torch_tensors_in_shared_memory_are_read_into_with_no_copy(daemon_factory):  # noqa: F811
    """Tensors over the client's shared memory, registered once: put_many from them and
    get_many into them move no byte through the SDK (the daemon's device IO lands in the
    tensors' own memory). Runs where torch is installed (the integration environment)."""
    torch = pytest.importorskip("torch", reason="torch is not installed (runs in .venv-integ)")
    from wqs.rpc.control import ControlClient

    d = daemon_factory(config={"engine": {"dram_cache_bytes": 0}})  # every hit from the SSD
    with _client(d) as c, ControlClient(d.control_address) as cc:
        mem = c.shared_memory(2 << 20)
        views = mem.block_views(BS, 8)
        src = [torch.frombuffer(v, dtype=torch.float16) for v in views[:4]]
        dst = [torch.frombuffer(v, dtype=torch.float16) for v in views[4:]]
        for k, t in enumerate(src):
            t.copy_(torch.randn(BS // 2, generator=torch.Generator().manual_seed(k)))
        ids = [bid(300 + k) for k in range(4)]
        assert all(c.put_many(zip(ids, src)))
        got = c.get_many(ids, outs=dst)
        assert all(torch.equal(a, b) for a, b in zip(src, dst))
        for g, t in zip(got, dst):  # the result is the tensor's own memory
            assert buffer_address(g) == t.data_ptr()
        stats = cc.stats()["engine"]
        assert stats["direct_writes"] == 4 and stats["direct_reads"] == 4
        assert c._bounce.memory is None  # nothing went through the bounce memory
        assert d.request_counts()["get"] == 0


def test_one_slot_put_under_many_ids_at_once_keeps_every_block(daemon_factory):  # noqa: F811
    """The device writes a slot's block with its entry header in the room in front of
    the payload: the same slot put under several ids at once (one put_many, or threads,
    across both shards) must not let one header overwrite another's before it is
    written. Every acknowledged put reads back intact, from the device."""
    node = daemon_factory(extra_args=["--workers", "2"], device_size="256M",
                          config={"engine": {"dram_cache_bytes": 0}})
    with _client(node) as c:
        mem = c.shared_memory(1 << 20)
        slot = mem.block_views(BS, 1)[0]
        slot[:] = block(7)
        ids = [bid(400 + k) for k in range(32)]
        assert all(c.put_many([(i, slot) for i in ids]))
        with ThreadPoolExecutor(4) as pool:
            more = [bid(500 + k) for k in range(64)]
            assert all(pool.map(lambda i: c.put(i, slot), more))
        got = c.get_many(ids + more)
        assert not got.errors and all(g == block(7) for g in got)


def test_threads_that_first_use_a_segment_together_all_get_through(node):
    """The first request that uses a segment on a connection hands it over (REGISTER);
    threads that use it at the same moment must not send their requests ahead of it."""
    import threading

    with _client(node, connections_per_node=1) as c:
        for round_ in range(30):
            mem = c.shared_memory(1 << 20)
            views = mem.block_views(BS, 8)
            start = threading.Barrier(8)
            results: list = [None] * 8

            def put(k: int) -> None:
                views[k][:] = block(k)
                start.wait()
                results[k] = c.put_many([(bid(1000 * round_ + k), views[k])])

            threads = [threading.Thread(target=put, args=(k,)) for k in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert all(r is not None and all(r) and not r.errors for r in results), \
                [r.errors for r in results]
            mem.close()


def test_mixed_buffers_misses_and_small_outs(node):
    with _client(node) as c:
        mem = c.shared_memory(1 << 20)
        arr = np.frombuffer(mem.buffer, dtype=np.uint8)
        arr[:BS] = np.frombuffer(block(1), dtype=np.uint8)
        assert all(c.put_many([(bid(1), arr[:BS]), (bid(2), block(2)),
                               (bid(3), block(3, 100))]))
        outs = [arr[BS : 2 * BS], bytearray(BS), arr[2 * BS : 2 * BS + 10],
                arr[3 * BS : 4 * BS]]
        got = c.get_many([bid(1), bid(2), bid(3), bid(99)], outs=outs)
        assert bytes(got[0]) == block(1) and bytes(got[1]) == block(2)
        assert got[2] is None and isinstance(got.errors[2], BlockTooLarge)
        assert "100 B" in str(got.errors[2])
        assert got[3] is None and 3 not in got.errors  # a plain miss
        with pytest.raises(BlockTooLarge):
            c.get(bid(1), out=arr[4 * BS : 4 * BS + 100])


def test_transport_choices(daemon_factory, caplog):  # noqa: F811
    local = daemon_factory()
    remote_like = daemon_factory(extra_args=["--local-socket", "off"])
    with _client(local, transport="tcp") as c:
        assert c.put(bid(1), b"x") and not c._pipe.node(local.address).local_paths
    with caplog.at_level(logging.INFO, logger="wqs.client"):
        with _client(remote_like) as c:  # auto: tcp, and says why
            assert c.put(bid(1), b"x") and not c._pipe.node(remote_like.address).local_paths
    assert "tcp (the node announces no local socket)" in caplog.text
    with _client(remote_like, transport="shm") as c:  # shm where there is none: an error
        with pytest.raises(TransportUnavailable, match="transport shm: the node announces no"):
            c.put(bid(1), b"x")
    with _client(local, transport="rdma") as c:
        with pytest.raises(TransportUnavailable, match="transport rdma"):
            c.put(bid(1), b"x")


def test_socket_files_permissions_and_stale_files(daemon_factory, tmp_path):  # noqa: F811
    path = str(tmp_path / "s" / "w.sock")
    d = daemon_factory(config={"local_socket": path, "local_socket_mode": "0600"},
                       extra_args=["--workers", "2"], device_size="256M")
    for k in (path, path + ".1"):
        st = os.stat(k)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    d.kill()  # leaves the socket files behind
    assert os.path.exists(path)
    d.start()  # recognised as stale and replaced
    with _client(d, transport="shm") as c:
        assert c.put(bid(1), b"x") and c.get(bid(1)) == b"x"
    assert d.terminate() == 0
    assert not os.path.exists(path) and not os.path.exists(path + ".1")  # removed on stop
    os.makedirs(tmp_path / "f", exist_ok=True)
    (tmp_path / "f" / "x.sock").write_text("not a socket")
    bad = daemon_factory(config={"local_socket": str(tmp_path / "f" / "x.sock")}, wait=False)
    assert bad.wait() != 0 and "exists and is not a socket" in bad.stderr_text()


def test_a_killed_daemon_fails_calls_then_comes_back(node):
    with _client(node, timeout_s=2.0) as c:
        mem = c.shared_memory(1 << 20)
        views = mem.block_views(BS, 4)
        views[0][:] = block(7)
        assert c.put(bid(7), views[0])
        node.kill()
        got = c.get_many([bid(7)], outs=[views[1]])
        assert got[0] is None and 0 in got.errors  # NodeUnavailable, not a hang
        node.start()
        time.sleep(1.1)  # the node's retry interval
        got = c.get_many([bid(7)], outs=[views[2]])  # recovered: a new daemon, new socket
        assert got[0] is not None, got.errors
        assert bytes(got[0]) == block(7)


# --- a lying client, by hand, over the Unix socket ------------------------------------

class Raw:
    """A bare data-plane connection that sends whatever it is told."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.dec = p.FrameDecoder(response=True)
        assert isinstance(self.ask(p.encode_request(p.HelloRequest(1))), p.HelloResponse)

    def ask(self, frame: bytes, fds: list[int] = ()) -> p.Message | None:
        """The answer, or None if the daemon closed the connection."""
        try:
            if fds:
                self.sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                             array.array("i", fds))])
            else:
                self.sock.sendall(frame)
            while True:
                msg = self.dec.next_message()
                if msg is not None:
                    return msg
                data = self.sock.recv(65536)
                if not data:
                    return None
                self.dec.feed(data)
        except (BrokenPipeError, ConnectionResetError):
            return None

    def register(self, seg: int, fd: int, size: int) -> p.Message | None:
        return self.ask(p.encode_request(p.RegisterRequest(5, seg, size)), [fd])

    def get(self, rows) -> p.Message | None:
        return self.ask(p.frame_shm_request(p.Opcode.GET_SHM, 6, rows))


def _error(msg, status=p.Status.BAD_REQUEST) -> str:
    assert isinstance(msg, p.ErrorResponse) and msg.status == status, msg
    return msg.message


def test_lying_clients_get_errors_and_hurt_no_one(daemon_factory):  # noqa: F811
    d = daemon_factory()
    path = str(d.data_dir / "wqsd.sock")
    with _client(d) as good:
        assert good.put(bid(1), block(1))
        raw = Raw(path)
        fd = _memfd(1 << 20)
        assert "without a file descriptor" in _error(raw.ask(p.encode_request(
            p.RegisterRequest(5, 1, 1 << 20))))
        assert "F_SEAL_SHRINK" in _error(raw.register(1, _memfd(1 << 20, seals=0), 1 << 20))
        assert isinstance(raw.register(1, os.dup(fd), 1 << 20), p.RegisterResponse)
        # Out of range, unknown segments: refused, the connection goes on.
        assert "outside segment 1" in _error(raw.get([(bid(1), (1 << 20) - 10, BS, 1, 0)]))
        assert "outside segment 1" in _error(raw.get([(bid(1), 2**64 - 1, 1, 1, 0)]))
        assert "not registered" in _error(raw.get([(bid(1), 0, BS, 2, 0)]))
        ans = raw.get([(bid(1), 0, BS, 1, 0), (bid(2), BS, BS, 1, 0)])
        assert [it.flags for it in ans.items] == [p.Status.OK, p.Status.NOT_FOUND]
        view = mmap.mmap(fd, 1 << 20)  # the daemon wrote the hit into our memory
        assert view[:BS] == block(1)
        # A flag the protocol does not know: the frame is refused and the connection closed.
        assert "unknown flags" in _error(raw.get([(bid(1), 0, BS, 1, 0x80)]))
        assert raw.ask(p.encode_request(p.PingRequest(1))) is None
        # Too many descriptors sent ahead of any REGISTER: dropped.
        raw = Raw(path)
        fds = [_memfd(4096) for _ in range(9)]
        assert raw.ask(b"\0", fds) is None
        for f in fds:
            os.close(f)
        # Over TCP the shared-memory opcodes do not exist.
        tcp = socket.create_connection(("127.0.0.1", d.port))
        tcp.sendall(p.encode_request(p.HelloRequest(1))
                    + p.frame_shm_request(p.Opcode.GET_SHM, 2, [(bid(1), 0, BS, 1, 0)]))
        dec = p.FrameDecoder(response=True)
        msgs = []
        while len(msgs) < 2:
            dec.feed(tcp.recv(65536))
            while (m := dec.next_message()) is not None:
                msgs.append(m)
        assert "local socket or an RDMA link only" in _error(msgs[1])
        tcp.close()
        # Everyone else is served all along.
        assert good.get(bid(1)) == block(1)
        view.close()
        os.close(fd)


def test_segments_are_unmapped_when_the_connection_closes(daemon_factory):  # noqa: F811
    d = daemon_factory()
    raw = Raw(str(d.data_dir / "wqsd.sock"))
    fd = os.memfd_create("wqs-test-marker", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 1 << 20)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    assert isinstance(raw.register(3, fd, 1 << 20), p.RegisterResponse)
    shard = d.shard_pids()[0]

    def mapped() -> bool:
        with open(f"/proc/{shard}/maps") as f:
            return "memfd:wqs-test-marker" in f.read()

    assert mapped()
    raw.sock.close()
    deadline = time.monotonic() + 5
    while mapped() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not mapped()


def test_auth_applies_on_the_local_socket(daemon_factory):  # noqa: F811
    d = daemon_factory(config={"auth_token": "s3cret"})
    raw = Raw(str(d.data_dir / "wqsd.sock"))
    fd = _memfd(4096)
    msg = raw.register(1, fd, 4096)
    _error(msg, p.Status.AUTH_REQUIRED)
    with _client(d, transport="shm", auth_token="s3cret") as c:
        mem = c.shared_memory(1 << 20)
        v = mem.block_views(BS, 2)
        v[0][:] = block(5)
        assert c.put(bid(5), v[0]) and bytes(c.get_many([bid(5)], outs=[v[1]])[0]) == block(5)


def _flip_payload(device: str, block_id: bytes) -> int:
    """Flip a byte in the payload of every copy of the block's entry on the device."""
    flipped = 0
    with open(device, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        at = m.find(block_id)
        while at >= 0:
            if m[at - 8 : at - 4] == fmt.ENTRY_MAGIC.to_bytes(4, "little"):
                m[at - 8 + ENTRY_HEADER + 100] ^= 0xFF
                flipped += 1
            at = m.find(block_id, at + 1)
        m.flush()
        os.fsync(f.fileno())
    return flipped


def test_the_device_reads_into_and_writes_from_client_memory(daemon_factory):  # noqa: F811
    from wqs.rpc.control import ControlClient

    d = daemon_factory(config={"engine": {"dram_cache_bytes": 0}})  # every hit from the SSD
    with _client(d) as c, ControlClient(d.control_address) as cc:
        mem = c.shared_memory(4 << 20)
        src = mem.block_views(BS, 8)
        ids = [bid(50 + k) for k in range(8)]
        for k, v in enumerate(src):
            v[:] = block(50 + k)
        assert all(c.put_many(zip(ids, src)))
        # The entry header went into the room in front of each payload, written there.
        first = mem.buffer[:ENTRY_HEADER]
        assert fmt.unpack_entry_header(first).block_id == ids[0]
        out = mem.block_views(BS, 8, start=1 << 20)
        got = c.get_many(ids, outs=out)
        assert [bytes(g) for g in got] == [block(50 + k) for k in range(8)]
        stats = cc.stats()["engine"]
        assert stats["direct_writes"] == 8 and stats["direct_reads"] == 8
        # Plain shared buffers (not slots) are copied to and from, as the DRAM tier is.
        arr = np.frombuffer(mem.buffer, dtype=np.uint8)
        assert bytes(c.get_many(ids[:1], outs=[arr[3 << 20 : (3 << 20) + BS]])[0]) == block(50)
        assert cc.stats()["engine"]["direct_reads"] == 8
        # A damaged entry: the check in client memory fails, the engine reads it again
        # into its own buffer, finds it corrupt (a miss, counted), and drops it.
        assert _flip_payload(str(d.device_path), ids[3]) == 1
        got = c.get_many(ids[3:5], outs=out[3:5])
        assert got[0] is None and not got.errors and bytes(got[1]) == block(54)
        stats = cc.stats()["engine"]
        assert stats["checksum_failures"] == 1 and stats["direct_reads"] == 9
        assert not c.exists(ids[3])


def test_the_benchmark_engine_uses_shared_memory_for_a_local_node(node):
    from bench.engines import WqsEngine

    eng = WqsEngine([node.address])
    tcp = WqsEngine([node.address], transport="tcp")
    try:
        assert eng.shared and "shared memory" in eng.describe()
        assert not tcp.shared and "tcp" in tcp.describe()
        bufs = [eng.buffer(BS) for _ in range(3)]
        assert all(eng.client._shm.find(b) is not None for b in bufs)
        assert eng.client._shm.find(tcp.buffer(BS)) is None
        bufs[0][:] = block(9)
        assert eng.put([bid(9)], bufs[:1]) == [True]
        assert eng.get([bid(9)], bufs[1:2]) == [BS] and bytes(bufs[1]) == block(9)
    finally:
        eng.close()
        tcp.close()
