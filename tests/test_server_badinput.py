"""Bad input thrown at a live wqsd: every bad connection gets a clear ErrorResponse or is
closed, never hangs the server, never makes it allocate what the peer merely claims,
and the daemon keeps serving well-behaved clients throughout."""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wqs
from tests.daemons import DaemonFactory, DaemonProcess
from wqs.config import parse_hostport
from wqs.rpc import protocol as p
from wqs.server.shard import ShardOptions

MiB = 1 << 20
MAX_BLOCK = 4 * MiB  # the daemons' engine.max_block_size: bounds what one item may claim
RSS_SLACK_KIB = 50 * 1024
READ_TIMEOUT_S = 5.0
TOKEN = "badinput-token-7f3a9c"

CONFIG = {"engine": {"region_size": "1M", "max_block_size": "4M", "dram_cache_bytes": "4M",
                     "io_threads": 4},
          "workers": 1, "log_level": "warning"}


@pytest.fixture(scope="module")
def factory(tmp_path_factory) -> Iterator[DaemonFactory]:
    f = DaemonFactory(tmp_path_factory.mktemp("badinput"))
    try:
        yield f
    finally:
        f.cleanup()


@pytest.fixture(scope="module")
def daemon(factory) -> DaemonProcess:
    return factory(config=CONFIG)


@pytest.fixture(scope="module")
def auth_daemon(factory) -> DaemonProcess:
    return factory(config={**CONFIG, "auth_token": TOKEN})


# --------------------------------------------------------------------------- helpers


def connect(d: DaemonProcess, *, hello: bool = True) -> tuple[socket.socket, p.Limits | None]:
    s = socket.create_connection(parse_hostport(d.address), timeout=READ_TIMEOUT_S)
    limits = None
    if hello:
        s.sendall(p.encode_request(p.HelloRequest(1)))
        msgs, closed = read_messages(s, want=1)
        assert isinstance(msgs[0], p.HelloResponse), msgs
        limits = msgs[0].limits
    return s, limits


def read_messages(s: socket.socket, want: int | None = None,
                  timeout_s: float = READ_TIMEOUT_S) -> tuple[list[p.Response], bool]:
    """Responses until `want` arrived or the server closed; (messages, closed).

    Everything the server sends must be well-formed frames: a decode error fails the test.
    Raises AssertionError if the server neither answers nor closes within timeout_s.
    """
    dec = p.FrameDecoder(response=True)
    msgs: list[p.Response] = []
    deadline = time.monotonic() + timeout_s
    while want is None or len(msgs) < want:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"server neither answered nor closed within {timeout_s}s "
                                 f"(got {msgs})")
        s.settimeout(left)
        try:
            data = s.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return msgs, True
        if not data:
            return msgs, True
        dec.feed(data)
        while (m := dec.next_message()) is not None:
            msgs.append(m)
    return msgs, False


def closes_after(s: socket.socket, timeout_s: float = READ_TIMEOUT_S) -> list[p.Response]:
    """Read until the server closes the connection; the responses it sent before."""
    msgs, closed = read_messages(s, None, timeout_s)
    assert closed
    return msgs


def header(opcode: int, *, rid: int = 7, count: int = 0, body_len: int = 0, flags: int = 0,
           status: int = 0, reserved: int = 0, magic: int = p.MAGIC, version: int = p.VERSION,
           ) -> bytes:
    return p.HEADER.pack(magic, version, opcode, flags, rid, status, reserved, count, body_len)


def assert_serving(d: DaemonProcess, tag: bytes = b"alive") -> None:
    """The daemon process is up and a normal SDK client round-trips a block."""
    assert d.running, d.stderr_text()
    block_id = (tag * 16)[:16]
    payload = os.urandom(3000)
    with wqs.Client([d.address], timeout_s=5.0) as c:
        assert c.put(block_id, payload), d.stderr_text()
        assert c.get(block_id) == payload
        assert c.exists(block_id)


def error_of(msgs: list[p.Response]) -> p.ErrorResponse:
    errors = [m for m in msgs if isinstance(m, p.ErrorResponse)]
    assert errors, f"expected an ErrorResponse, got {msgs}"
    return errors[0]


def put_claim(items: list[tuple[bytes, int]], rid: int = 9) -> bytes:
    """Header and item table of a PUT claiming these (id, length) items; no payload."""
    table = b"".join(p.ITEM.pack(b, n, 0, 0) for b, n in items)
    body_len = len(table) + sum(n for _, n in items)
    return header(p.Opcode.PUT, rid=rid, count=len(items), body_len=body_len) + table


# --------------------------------------------------------------------------- cases


def test_random_bytes_close_the_connection(daemon):
    s, _ = connect(daemon)
    junk = bytearray(os.urandom(4096))
    junk[0] = 0  # never "W": not the magic by chance
    s.sendall(junk)
    msgs = closes_after(s)
    assert not msgs  # an unreadable header: nothing to answer, just closed
    s.close()
    assert_serving(daemon)


def test_random_bytes_as_the_first_thing_sent(daemon):
    s, _ = connect(daemon, hello=False)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(200))
    closes_after(s)
    s.close()
    assert_serving(daemon)


@pytest.mark.parametrize("cut", [1, 10, 31])
def test_truncated_header_then_eof(daemon, cut):
    s, _ = connect(daemon)
    s.sendall(p.encode_request(p.PingRequest(5))[:cut])
    s.shutdown(socket.SHUT_WR)
    assert closes_after(s) == []
    s.close()
    assert_serving(daemon)


def test_truncated_body_then_eof(daemon):
    frame = p.encode_request(p.GetRequest(5, [bytes(16)] * 4))
    s, _ = connect(daemon)
    s.sendall(frame[:-9])
    s.shutdown(socket.SHUT_WR)
    assert closes_after(s) == []
    s.close()
    assert_serving(daemon)


def test_body_len_2_pow_62_is_refused_without_allocating(daemon):
    rss_before = daemon.rss_kib()
    s, _ = connect(daemon)
    s.sendall(header(p.Opcode.PUT, rid=42, count=1, body_len=2 ** 62))
    err = error_of(closes_after(s))
    s.close()
    assert (err.request_id, err.opcode, err.status) == (42, p.Opcode.PUT, p.Status.TOO_LARGE)
    assert "limit" in err.message
    # The same claim on a frame without payloads.
    s, _ = connect(daemon)
    s.sendall(header(p.Opcode.GET, rid=43, count=4096, body_len=2 ** 62))
    err = error_of(closes_after(s))
    s.close()
    assert (err.request_id, err.status) == (43, p.Status.TOO_LARGE)
    assert_serving(daemon)
    assert daemon.rss_kib() - rss_before < RSS_SLACK_KIB


def test_too_many_items_is_refused(daemon):
    s, limits = connect(daemon)
    n = limits.max_items + 1
    s.sendall(header(p.Opcode.EXISTS, rid=44, count=n, body_len=16 * n))
    err = error_of(closes_after(s))
    s.close()
    assert (err.request_id, err.status) == (44, p.Status.TOO_LARGE)
    assert str(limits.max_items) in err.message
    assert_serving(daemon)


def test_item_length_over_the_limit_is_refused(daemon):
    s, limits = connect(daemon)
    assert limits.max_block == MAX_BLOCK
    # The header passes (body fits count * max_block); the table's first row does not.
    items = [(b"\x01" * 16, limits.max_block + 1), (b"\x02" * 16, 0)]
    s.sendall(put_claim(items, rid=45))
    err = error_of(closes_after(s))
    s.close()
    assert (err.request_id, err.status) == (45, p.Status.TOO_LARGE)
    assert "item 0" in err.message
    assert_serving(daemon)


def test_table_that_disagrees_with_body_len_is_refused(daemon):
    s, _ = connect(daemon)
    table = p.ITEM.pack(b"\x03" * 16, 100, 0, 0)
    s.sendall(header(p.Opcode.PUT, rid=46, count=1, body_len=24 + 50) + table + b"x" * 50)
    err = error_of(closes_after(s))
    s.close()
    assert (err.request_id, err.status) == (46, p.Status.BAD_REQUEST)
    assert_serving(daemon)


@pytest.mark.parametrize("field", ["magic", "version", "opcode", "flags", "status", "reserved",
                                   "response_flag", "body_len"])
def test_bad_header_fields(daemon, field):
    good = dict(opcode=p.Opcode.PING, rid=47)
    bad = {"magic": dict(magic=0x31535158), "version": dict(version=p.VERSION + 1),
           "opcode": dict(opcode=99), "flags": dict(flags=0x8000),
           "status": dict(status=3), "reserved": dict(reserved=1),
           "response_flag": dict(flags=p.FLAG_RESPONSE), "body_len": dict(body_len=5)}[field]
    s, _ = connect(daemon)
    s.sendall(header(**{**good, **bad}) + b"\0" * 5)
    msgs = closes_after(s)
    s.close()
    if field in ("status", "reserved", "body_len"):  # readable header: a clear answer first
        err = error_of(msgs)
        assert (err.request_id, err.status) == (47, p.Status.BAD_REQUEST)
    else:
        assert all(isinstance(m, p.ErrorResponse) for m in msgs), msgs
    assert_serving(daemon)


def test_client_stops_mid_frame_and_disconnects(daemon):
    # Mid-header, mid-table and mid-payload: then the socket just goes away.
    frame = p.encode_request(p.PutRequest(48, [(b"\x04" * 16, os.urandom(100_000))]))
    for cut in (20, 32 + 10, 32 + 24 + 50_000):
        s, _ = connect(daemon)
        s.sendall(frame[:cut])
        s.close()
    time.sleep(0.2)
    assert_serving(daemon)


def test_disconnect_mid_put_returns_the_memory_budget(daemon):
    """PUT claims reserve the server's in-flight budget (max_inflight_bytes, shared by all
    connections); a connection that dies mid-PUT must give its claim back, or the budget
    runs dry and every later put stalls. Two abandoned claims add up to the whole budget
    exactly, so one leaked byte would stall the put below."""
    budget = ShardOptions().max_inflight_bytes
    n_first = budget * 3 // 4 // MAX_BLOCK
    n_second = budget // MAX_BLOCK - n_first
    assert (n_first + n_second) * MAX_BLOCK == budget
    for rid, n in ((100, n_first), (101, n_second)):
        items = [(i.to_bytes(16, "big"), MAX_BLOCK) for i in range(n)]
        s, _ = connect(daemon)
        s.sendall(put_claim(items, rid=rid) + os.urandom(1000))
        time.sleep(0.1)  # let the server reserve the claim before we go
        s.close()
    time.sleep(0.2)
    assert_serving(daemon, b"budget")


def test_half_a_put_payload_then_stall(daemon):
    rss_before = daemon.rss_kib()
    frame = p.encode_request(p.PutRequest(49, [(b"\x05" * 16, os.urandom(MiB))]))
    s, _ = connect(daemon)
    s.sendall(frame[: len(frame) // 2])
    # While that connection stalls, everyone else is served.
    assert_serving(daemon, b"stall")
    s.close()
    time.sleep(0.2)
    assert_serving(daemon, b"stall2")
    with wqs.Client([daemon.address]) as c:
        assert not c.exists(b"\x05" * 16)  # half a block is never stored
    assert daemon.rss_kib() - rss_before < RSS_SLACK_KIB


def test_stalled_put_is_dropped_after_frame_timeout(factory):
    d = factory(config={**CONFIG, "frame_timeout_s": 1.0})
    frame = p.encode_request(p.PutRequest(51, [(b"\x06" * 16, os.urandom(MiB))]))
    s, _ = connect(d)
    s.sendall(frame[: len(frame) // 2])
    started = time.monotonic()
    assert closes_after(s, timeout_s=10) == []  # closed by the server, no answer
    assert 0.9 < time.monotonic() - started < 5
    # An idle connection (between frames) is not dropped by the frame timeout.
    idle, _ = connect(d)
    time.sleep(2.5)
    idle.sendall(p.encode_request(p.PingRequest(2)))
    assert isinstance(read_messages(idle, 1)[0][0], p.PingResponse)
    idle.close()
    assert_serving(d, b"after-stall")


def test_request_before_hello_is_refused(daemon):
    s, _ = connect(daemon, hello=False)
    s.sendall(p.encode_request(p.PingRequest(3)))
    err = error_of(closes_after(s))
    assert err.status == p.Status.BAD_REQUEST and "HELLO" in err.message
    assert_serving(daemon, b"hello-first")


def test_big_put_claim_then_stall_does_not_allocate_the_claim(daemon):
    """Memory follows the bytes that arrive, not what the table claims."""
    rss_before = daemon.rss_kib()
    items = [(i.to_bytes(16, "big"), MAX_BLOCK) for i in range(64)]  # 256 MiB claimed
    s, _ = connect(daemon)
    s.sendall(put_claim(items, rid=50) + os.urandom(1000))
    time.sleep(0.3)
    grown = daemon.rss_kib() - rss_before
    assert_serving(daemon, b"claim")
    s.close()
    assert grown < RSS_SLACK_KIB, f"RSS grew by {grown} KiB on a claim alone"


def test_unauthenticated_put_claim_is_refused_before_allocation(auth_daemon):
    rss_before = auth_daemon.rss_kib()
    items = [(i.to_bytes(16, "big"), MAX_BLOCK) for i in range(64)]
    s, _ = connect(auth_daemon)
    s.sendall(put_claim(items, rid=51))
    err = error_of(closes_after(s))
    s.close()
    assert (err.request_id, err.status) == (51, p.Status.AUTH_REQUIRED)
    assert auth_daemon.rss_kib() - rss_before < RSS_SLACK_KIB
    with wqs.Client([auth_daemon.address], auth_token=TOKEN) as c:
        assert c.put(b"\x06" * 16, b"ok") and c.get(b"\x06" * 16) == b"ok"


def test_data_request_before_auth_is_refused(auth_daemon):
    s, _ = connect(auth_daemon)
    s.sendall(p.encode_request(p.GetRequest(52, [b"\x06" * 16])))
    err = error_of(closes_after(s))
    s.close()
    assert (err.request_id, err.opcode, err.status) == (52, p.Opcode.GET, p.Status.AUTH_REQUIRED)


def test_garbage_auth_proof_is_refused(auth_daemon):
    s, _ = connect(auth_daemon)
    s.sendall(p.encode_request(p.AuthRequest(53, os.urandom(32), os.urandom(32))))
    err = error_of(closes_after(s))
    s.close()
    assert (err.request_id, err.status) == (53, p.Status.AUTH_FAILED)


def test_many_bad_connections_at_once(daemon):
    socks = []
    for i in range(50):
        s, _ = connect(daemon, hello=i % 2 == 0)
        s.sendall(os.urandom(i * 7 + 1) if i % 3 else header(p.Opcode.PUT, count=1, body_len=24))
        socks.append(s)
    assert_serving(daemon, b"many")
    for s in socks:
        s.close()
    time.sleep(0.2)
    assert_serving(daemon, b"many2")


# --------------------------------------------------------------------------- fuzz

_SEEDS = [
    p.encode_request(p.HelloRequest(1)),
    p.encode_request(p.PingRequest(2)),
    p.encode_request(p.GetRequest(3, [b"\xaa" * 16, b"\xbb" * 16])),
    p.encode_request(p.ExistsRequest(4, [b"\xaa" * 16])),
    p.encode_request(p.LookupPrefixRequest(5, [b"\xaa" * 16, b"\xcc" * 16])),
    p.encode_request(p.DeleteRequest(6, [b"\xdd" * 16])),
    p.encode_request(p.PutRequest(7, [(b"\xee" * 16, b"payload"), (b"\xef" * 16, b"")])),
    p.encode_request(p.AuthRequest(8, b"\x01" * 32, b"\x02" * 32)),
]
_U64 = st.integers(0, 2 ** 64 - 1)


@st.composite
def mutated_frames(draw) -> bytes:
    frame = bytearray(draw(st.sampled_from(_SEEDS)))
    kind = draw(st.sampled_from(["flip", "field", "truncate", "append", "random", "splice"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(frame) - 1))
            frame[i] ^= 1 << draw(st.integers(0, 7))
    elif kind == "field":  # one header field set to anything its width allows
        name, off, fmt = draw(st.sampled_from([
            ("opcode", 5, "<B"), ("flags", 6, "<H"), ("status", 16, "<H"),
            ("reserved", 18, "<H"), ("count", 20, "<I"), ("body_len", 24, "<Q")]))
        width = struct.calcsize(fmt)
        top = 2 ** (8 * width) - 1
        value = draw(st.integers(0, top) | st.sampled_from([0, 1, top, min(top, 2 ** 62)]))
        struct.pack_into(fmt, frame, off, value)
    elif kind == "truncate":
        del frame[draw(st.integers(0, len(frame) - 1)):]
    elif kind == "append":
        frame += draw(st.binary(min_size=1, max_size=300))
    elif kind == "random":
        frame = bytearray(draw(st.binary(min_size=1, max_size=300)))
    else:  # two frames glued, the second cut anywhere
        other = draw(st.sampled_from(_SEEDS))
        frame += other[: draw(st.integers(0, len(other)))]
    return bytes(frame)


def test_fuzzed_frames_never_hang_or_kill_the_server(daemon):
    seen = {"answered": 0, "closed": 0}

    @settings(max_examples=100, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(frame=mutated_frames(), hello_first=st.booleans())
    def one(frame: bytes, hello_first: bool) -> None:
        s, _ = connect(daemon, hello=hello_first)
        try:
            try:
                s.sendall(frame)
                s.shutdown(socket.SHUT_WR)  # EOF after the frame: the server must finish
            except OSError:  # the server already hung up on a prefix of it
                seen["closed"] += 1
                return
            msgs, closed = read_messages(s, None, timeout_s=READ_TIMEOUT_S)
            assert closed
            seen["answered" if msgs else "closed"] += 1
        finally:
            s.close()

    one()
    assert sum(seen.values()) > 50, seen
    assert seen["answered"] and seen["closed"], seen  # both outcomes were exercised
    assert_serving(daemon, b"fuzz")
