"""The data-plane wire protocol: round trips, the incremental decoder, limits, malformed input."""

from __future__ import annotations

import random
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wqs.errors import ConfigError, ProtocolError
from wqs.ids import BLOCK_ID_BYTES
from wqs.rpc import protocol as p
from wqs.rpc.protocol import (
    HEADER, ITEM, AuthRequest, AuthResponse, DeleteRequest, DeleteResponse, ErrorResponse,
    ExistsRequest, ExistsResponse, FrameDecoder, FrameEnd, FrameHeader, FrameRejected, GetItem,
    GetRequest, GetResponse, HelloRequest, HelloResponse, ItemTable, Limits, LookupPrefixRequest,
    LookupPrefixResponse, Opcode, PayloadChunk, PayloadStart, PingRequest, PingResponse,
    PutRequest, PutResponse, RegisterRequest, RegisterResponse, ShmGetResponse, ShmItem,
    ShmPutResponse, ShmRequest, Status, UnregisterRequest, UnregisterResponse, decode_request,
    decode_response, encode, encode_request, encode_response, parse_header)
from wqs.rpc.transport import Transport

KiB = 1024
RESPONSE_TYPES = p._RESPONSES


def bid(i: int) -> bytes:
    return i.to_bytes(16, "big")


def is_response(m) -> bool:
    return isinstance(m, RESPONSE_TYPES)


def frame(m, limits: Limits = p.DEFAULT_LIMITS) -> bytes:
    return b"".join(encode(m, limits))


def decode(data: bytes, response: bool, limits: Limits = p.DEFAULT_LIMITS):
    return (decode_response if response else decode_request)(data, limits)


def header(opcode=Opcode.PING, flags=0, rid=7, status=0, reserved=0, count=0, body_len=0,
           magic=p.MAGIC, version=p.VERSION) -> bytes:
    return HEADER.pack(magic, version, opcode, flags, rid, status, reserved, count, body_len)


EXAMPLES = [
    HelloRequest(1),
    HelloResponse(2, bytes(range(32)), True, Limits()),
    HelloResponse(3, b"\xff" * 32, False, Limits(max_body=1 << 20, max_items=16, max_block=4096,
                                                  max_error=100)),
    HelloResponse(9, bytes(32), False, Limits(), shard=2, shard_ports=(7070, 7073, 7074)),
    AuthRequest(4, b"n" * 32, b"p" * 32),
    AuthResponse(5, b"q" * 32),
    PingRequest(6),
    PingResponse(2**64 - 1),
    PutRequest(8, [(bid(1), b"hello"), (bid(2), b""), (bid(3), bytes(1000))]),
    PutRequest(9, []),
    PutResponse(10, [Status.OK, Status.NO_SPACE, Status.TOO_LARGE]),
    GetRequest(11, [bid(1), bid(2)]),
    GetResponse(12, [GetItem(bid(1), Status.OK, b"abc"), GetItem(bid(2), Status.NOT_FOUND),
                     GetItem(bid(3), Status.OK, b""), GetItem(bid(4), Status.SERVER_ERROR)]),
    ExistsRequest(13, [bid(i) for i in range(9)]),
    ExistsResponse(14, [True, False, True, True, False, False, False, True, True]),
    DeleteRequest(15, [bid(5)]),
    DeleteResponse(16, [False]),
    LookupPrefixRequest(17, [bid(i) for i in range(4)]),
    LookupPrefixResponse(18, 3),
    ErrorResponse(19, Opcode.PUT, Status.AUTH_REQUIRED, "authenticate first"),
    ErrorResponse(20, Opcode.GET, Status.BAD_REQUEST, "żółw ✓"),
    HelloResponse(21, bytes(32), False, Limits(), instance=b"i" * 16,
                  local_sockets=("/run/wqs/wqsd.sock",)),
    HelloResponse(22, bytes(32), True, Limits(), shard=1, shard_ports=(7070, 7071),
                  instance=bytes(16), local_sockets=("/run/wqs/s.0", "/run/wqs/ś.1")),
    RegisterRequest(23, 7, 1 << 30),
    RegisterResponse(24),
    UnregisterRequest(25, 7),
    UnregisterResponse(26),
    ShmRequest(27, Opcode.GET_SHM, [ShmItem(bid(1), 4096 + 64, 65536, 0, p.SHM_SLOT),
                                    ShmItem(bid(2), 0, 10, 3)]),
    ShmRequest(28, Opcode.PUT_SHM, [ShmItem(bid(1), 64, 65536, 1, p.SHM_SLOT)]),
    ShmGetResponse(29, [ShmItem(bid(1), 4160, 65536, 0, Status.OK),
                        ShmItem(bid(2), 0, 0, 3, Status.NOT_FOUND),
                        ShmItem(bid(3), 0, 1 << 20, 3, Status.TOO_LARGE)]),
    ShmPutResponse(30, [Status.OK, Status.NO_SPACE]),
    p.RdmaConnectRequest(31, bytes(range(36))),
    p.RdmaConnectResponse(32, b"e" * 36),
    p.RegisterMrRequest(33, b"m" * 24),
    p.RegisterMrResponse(34),
    p.PinRequest(35, [bid(1), bid(2)], 30_000),
    p.PinRequest(36, [bid(3)], 0),
    p.PinResponse(37, [True, True, False], [True, False, False]),
]


# --- strategies -------------------------------------------------------------------------

ids = st.binary(min_size=16, max_size=16)
rids = st.integers(0, 2**64 - 1)
nonces = st.binary(min_size=32, max_size=32)
payloads = st.binary(max_size=200)
batch = dict(max_size=12)
limits_st = st.builds(
    lambda items, block, err, extra: Limits(max_body=items * ITEM.size + extra, max_items=items,
                                            max_block=block, max_error=err),
    st.integers(1, 4096), st.integers(1, 2**32 - 1), st.integers(1, 2**32 - 1),
    st.integers(0, 2**62))
get_items = st.one_of(
    st.builds(GetItem, ids, st.just(Status.OK), payloads),
    st.builds(GetItem, ids, st.sampled_from([s for s in Status if s != Status.OK])))

shm_items = st.builds(ShmItem, ids, st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
                      st.integers(0, 2**16 - 1), st.sampled_from([0, p.SHM_SLOT]))
shm_answers = st.one_of(
    st.builds(ShmItem, ids, st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
              st.integers(0, 2**16 - 1), st.sampled_from([Status.OK, Status.TOO_LARGE])),
    st.builds(ShmItem, ids, st.integers(0, 2**64 - 1), st.just(0), st.integers(0, 2**16 - 1),
              st.sampled_from(Status)))
paths = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                min_size=1, max_size=26)  # at most 104 bytes of UTF-8

requests = st.one_of(
    st.builds(HelloRequest, rids),
    st.builds(AuthRequest, rids, nonces, nonces),
    st.builds(PingRequest, rids),
    st.builds(PutRequest, rids, st.lists(st.tuples(ids, payloads), **batch)),
    *(st.builds(cls, rids, st.lists(ids, **batch))
      for cls in (GetRequest, ExistsRequest, DeleteRequest, LookupPrefixRequest)),
    st.builds(RegisterRequest, rids, st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)),
    st.builds(UnregisterRequest, rids, st.integers(0, 2**32 - 1)),
    st.builds(ShmRequest, rids, st.sampled_from([Opcode.GET_SHM, Opcode.PUT_SHM]),
              st.lists(shm_items, **batch)),
    st.builds(p.RdmaConnectRequest, rids, st.binary(min_size=36, max_size=36)),
    st.builds(p.RegisterMrRequest, rids, st.binary(min_size=24, max_size=24)),
    st.builds(p.PinRequest, rids, st.lists(ids, **batch), st.integers(0, 2**32 - 1)))
responses = st.one_of(
    st.builds(HelloResponse, rids, nonces, st.booleans(), limits_st),
    st.builds(AuthResponse, rids, nonces),
    st.builds(PingResponse, rids),
    st.builds(PutResponse, rids, st.lists(st.sampled_from(Status), **batch)),
    st.builds(GetResponse, rids, st.lists(get_items, **batch)),
    st.builds(ExistsResponse, rids, st.lists(st.booleans(), max_size=40)),
    st.builds(DeleteResponse, rids, st.lists(st.booleans(), max_size=40)),
    st.builds(LookupPrefixResponse, rids, st.integers(0, 2**32 - 1)),
    st.builds(lambda rid, nonce, ports, inst, names: HelloResponse(
        rid, nonce, False, Limits(), 0, ports, *(
            (inst, names[: max(len(ports), 1)]) if len(names) >= max(len(ports), 1)
            else (b"", ()))),
        rids, nonces, st.lists(st.integers(1, 65535), max_size=4),
        st.binary(min_size=16, max_size=16), st.lists(paths, min_size=0, max_size=4)),
    st.builds(RegisterResponse, rids), st.builds(UnregisterResponse, rids),
    st.builds(ShmGetResponse, rids, st.lists(shm_answers, **batch)),
    st.builds(ShmPutResponse, rids, st.lists(st.sampled_from(Status), **batch)),
    st.builds(p.RdmaConnectResponse, rids, st.binary(min_size=36, max_size=36)),
    st.builds(p.RegisterMrResponse, rids),
    st.lists(st.tuples(st.booleans(), st.booleans()), max_size=40).flatmap(
        lambda bits: st.builds(p.PinResponse, rids, st.just([f for f, _ in bits]),
                               st.just([f and q for f, q in bits]))),
    st.builds(ErrorResponse, rids, st.sampled_from(Opcode),
              st.sampled_from([s for s in Status if s != Status.OK]), st.text(max_size=100)))


def decode_in_chunks(data: bytes, cuts: list[int], response: bool) -> list:
    """Feed data split at the given cut points; collect whole messages as they complete."""
    dec, out, prev = FrameDecoder(response=response), [], 0
    for cut in sorted(cuts) + [len(data)]:
        dec.feed(data[prev:cut])
        prev = cut
        while (m := dec.next_message()) is not None:
            out.append(m)
    assert dec.buffered == 0 and dec.needed == HEADER.size
    return out


# --- layout -----------------------------------------------------------------------------

def test_header_layout_matches_the_spec():
    assert HEADER.size == FrameHeader.SIZE == 32 and ITEM.size == 24
    assert p.HELLO_BODY.size == 56 and p.ID_LEN == BLOCK_ID_BYTES
    raw = frame(PingRequest(0x0102030405060708))
    assert raw.hex() == ("57515331" "03" "03" "0000" "0807060504030201" "0000" "0000"
                         "00000000" "0000000000000000")
    assert raw[:4] == b"WQS1"


def test_put_frame_known_answer():
    raw = frame(PutRequest(1, [(bid(0xAB), b"xyz")]))
    hdr, table, payload = raw[:32], raw[32:56], raw[56:]
    assert hdr.hex() == "57515331" "03" "04" "0000" + "01" + "00" * 7 + "0000" "0000" \
        "01000000" + "1b" + "00" * 7  # body 24 + 3 = 27
    assert table == bid(0xAB) + b"\x03\x00\x00\x00" + b"\x00\x00" + b"\x00\x00"
    assert payload == b"xyz"


def test_response_flag_and_bitmap_order():
    raw = frame(ExistsResponse(1, [True, False, False, False, False, False, False, False, True]))
    assert struct.unpack_from("<H", raw, 6)[0] == p.FLAG_RESPONSE
    assert raw[32:] == b"\x01\x01"  # bit i of byte i//8, least significant first


# --- round trips ------------------------------------------------------------------------

@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_every_message_type(msg):
    data = frame(msg)
    assert decode(data, is_response(msg)) == msg
    assert decode_in_chunks(data, list(range(len(data))), is_response(msg)) == [msg]
    enc = encode_response if is_response(msg) else encode_request
    assert enc(msg) == data


def test_every_opcode_has_examples_both_ways():
    seen = {(m.opcode, is_response(m)) for m in EXAMPLES}
    assert seen >= {(op, r) for op in Opcode for r in (False, True)}


@given(requests)
def test_requests_round_trip(msg):
    assert decode_request(encode_request(msg)) == msg


@given(responses)
def test_responses_round_trip(msg):
    assert decode_response(encode_response(msg)) == msg


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), st.data())
def test_pipelined_frames_split_anywhere_decode_the_same(response, data):
    msgs = data.draw(st.lists(responses if response else requests, min_size=1, max_size=5))
    stream = b"".join(frame(m) for m in msgs)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    assert decode_in_chunks(stream, cuts, response) == msgs


@given(requests | responses)
def test_one_byte_at_a_time_equals_whole_frame(msg):
    data = frame(msg)
    whole = decode(data, is_response(msg))
    assert decode_in_chunks(data, list(range(1, len(data))), is_response(msg)) == [whole]


# --- zero-copy sending and receiving ----------------------------------------------------

def test_encode_keeps_payloads_as_separate_uncopied_buffers():
    blocks = [bytearray(random.randbytes(64 * KiB)) for _ in range(32)]
    bufs = encode(PutRequest(1, [(bid(i), b) for i, b in enumerate(blocks)]))
    assert len(bufs) == 33 and bufs[0].nbytes == 32 + 32 * 24
    for view, block in zip(bufs[1:], blocks):
        assert view.obj is block  # a view of the caller's buffer, not a copy
    blocks[5][0] ^= 0xFF
    assert bufs[6][0] == blocks[5][0]


def test_encode_accepts_numpy_payloads():
    arr = np.arange(1024, dtype=np.float16).reshape(32, 32)
    bufs = encode(PutRequest(1, [(bid(1), arr)]))
    assert bufs[1].nbytes == arr.nbytes and bufs[1].format == "B"
    msg = decode_request(b"".join(bufs))
    assert msg.items[0][1] == arr.tobytes()
    with pytest.raises(ProtocolError, match="contiguous"):
        encode(PutRequest(1, [(bid(1), arr[:, ::2])]))


def test_advance_after_partial_sends():
    bufs = [memoryview(b"abc"), memoryview(b""), memoryview(b"defg"), memoryview(b"h")]
    whole = b"abcdefgh"
    for sent in range(len(whole) + 1):
        assert b"".join(p.advance(bufs, sent)) == whole[sent:]
    assert p.advance(bufs, 8) == []


class FakeSocket:
    """recv / recv_into over a byte string, returning short reads like a real socket."""

    def __init__(self, data: bytes, rng: random.Random, max_read: int = 10_000) -> None:
        self.data, self.pos, self.rng, self.max_read = memoryview(data), 0, rng, max_read

    def _n(self, want: int) -> int:
        return min(want, self.rng.randint(1, self.max_read), len(self.data) - self.pos)

    def recv(self, want: int) -> bytes:
        n = self._n(want)
        self.pos += n
        return bytes(self.data[self.pos - n:self.pos])

    def recv_into(self, view: memoryview) -> int:
        n = self._n(len(view))
        view[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


def serve_put(sock: FakeSocket, dec: FrameDecoder, arena: memoryview, read_size) -> list:
    """A server's read loop: each payload goes straight into its slot of a preallocated arena."""
    slots, placed = {}, []
    while True:
        ev = dec.next_event()
        if ev is None:
            data = sock.recv(read_size(dec))
            assert data, "stream ended early"
            dec.feed(data)
        elif isinstance(ev, ItemTable):
            off = 0
            for i, it in enumerate(ev.items):
                slots[i] = arena[off:off + it.length]
                off += it.length
        elif isinstance(ev, PayloadStart):
            dec.read_payload_into(slots[ev.index], sock.recv_into)
            placed.append((ev.block_id, ev.length))
        elif isinstance(ev, FrameEnd):
            return placed
        else:
            raise AssertionError(f"unexpected {ev}")


def test_put_of_32_blocks_received_straight_into_a_preallocated_arena():
    rng = random.Random(1)
    blocks = [rng.randbytes(64 * KiB) for _ in range(32)]
    stream = frame(PutRequest(42, [(bid(i), b) for i, b in enumerate(blocks)]))
    arena = memoryview(bytearray(32 * 64 * KiB))
    dec = FrameDecoder()
    tracemalloc.start()
    placed = serve_put(FakeSocket(stream, rng), dec, arena, lambda d: d.needed)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert arena.tobytes() == b"".join(blocks)
    assert placed == [(bid(i), 64 * KiB) for i in range(32)]
    assert peak < 256 * KiB  # 2 MiB went by, none of it through the decoder's buffers
    assert dec.buffered == 0 and dec.header is None


def test_direct_receive_after_reading_past_the_table():
    rng = random.Random(2)
    blocks = [rng.randbytes(rng.randint(0, 5000)) for _ in range(20)]
    stream = frame(PutRequest(1, [(bid(i), b) for i, b in enumerate(blocks)]))
    arena = memoryview(bytearray(sum(map(len, blocks))))
    serve_put(FakeSocket(stream, rng, max_read=3000), FrameDecoder(), arena, lambda d: 100_000)
    assert arena.tobytes() == b"".join(blocks)


def test_get_response_into_caller_buffers_skips_misses():
    items = [GetItem(bid(0), Status.OK, b"a" * 300), GetItem(bid(1), Status.NOT_FOUND),
             GetItem(bid(2), Status.OK, b"c" * 10)]
    stream = frame(GetResponse(9, items)) + frame(PingResponse(10))
    dec = FrameDecoder(response=True)
    dec.feed(stream[:40])  # header and part of the table
    outs = [bytearray(512) for _ in items]
    sock = FakeSocket(stream[40:], random.Random(3), max_read=7)
    events = []
    while (ev := dec.next_event()) is None or not isinstance(ev, PingResponse):
        if ev is None:
            dec.feed(sock.recv(dec.needed or 1))
            continue
        events.append(type(ev).__name__)
        if isinstance(ev, ItemTable):
            assert ev.header.request_id == 9 and [i.length for i in ev.items] == [300, 0, 10]
        if isinstance(ev, PayloadStart):
            dec.read_payload_into(outs[ev.index], sock.recv_into)
    assert events == ["ItemTable", "PayloadStart", "PayloadStart", "FrameEnd"]
    assert outs[0][:300] == b"a" * 300 and outs[2][:10] == b"c" * 10 and outs[1] == bytes(512)


def test_chunks_then_direct_receive_can_mix():
    stream = frame(PutRequest(1, [(bid(1), bytes(range(200)))]))
    dec = FrameDecoder()
    dec.feed(stream[:32 + 24 + 50])
    assert isinstance(dec.next_event(), ItemTable)
    assert dec.next_event() == PayloadStart(0, bid(1), 200)
    chunk = dec.next_event()
    assert chunk == PayloadChunk(0, 0, bytes(range(50))) and dec.payload_remaining == 150
    dest = bytearray(150)
    sock = FakeSocket(stream[32 + 24 + 50:], random.Random(4), max_read=33)
    dec.read_payload_into(dest, sock.recv_into)
    assert dest == bytes(range(50, 200)) and isinstance(dec.next_event(), FrameEnd)


def test_direct_receive_misuse_is_caught():
    dec = FrameDecoder()
    dec.feed(frame(PutRequest(1, [(bid(1), b"abcdef")])))
    with pytest.raises(RuntimeError):
        dec.readinto(bytearray(6))  # not in a payload yet
    dec.next_event(), dec.next_event()
    with pytest.raises(RuntimeError, match="readinto"):
        dec.mark_received(3)  # bytes are buffered: they come first
    with pytest.raises(ValueError):
        dec.read_payload_into(bytearray(5), lambda v: 0)
    with pytest.raises(RuntimeError):
        dec.mark_received(7)


def test_stream_ending_inside_a_payload():
    dec = FrameDecoder()
    dec.feed(frame(PutRequest(1, [(bid(1), b"abcdef")]))[:-2])
    dec.next_event(), dec.next_event()
    with pytest.raises(ProtocolError, match="ended"):
        dec.read_payload_into(bytearray(6), lambda v: 0)


# --- malformed input --------------------------------------------------------------------

def test_wrong_magic_version_opcode_flags():
    good = frame(PingRequest(1))
    for bad, match in [(header(magic=0x31535158), "magic"), (header(version=1), "version"),
                       (header(opcode=0), "opcode"), (header(opcode=16), "opcode"),
                       (header(opcode=255), "opcode"), (header(flags=2), "flags"),
                       (header(status=99), "status"), (b"GET / HTTP/1.1\r\n" * 2, "magic")]:
        with pytest.raises(ProtocolError, match=match):
            decode_request(bad)
    decode_request(good)


def test_request_and_response_directions_are_checked():
    with pytest.raises(ProtocolError, match="expected a request"):
        decode_request(frame(PingResponse(1)))
    with pytest.raises(ProtocolError, match="expected a response"):
        decode_response(frame(PingRequest(1)))


@pytest.mark.parametrize("raw, match, status", [
    (header(reserved=1), "reserved", Status.BAD_REQUEST),
    (header(status=Status.NOT_FOUND), "status OK", Status.BAD_REQUEST),
    (header(Opcode.GET, count=4097, body_len=4097 * 16), "4097 items", Status.TOO_LARGE),
    (header(Opcode.GET, count=2, body_len=31), "expected 32", Status.BAD_REQUEST),
    (header(Opcode.PING, count=1), "carries no items", Status.BAD_REQUEST),
    (header(Opcode.AUTH, body_len=63), "expected 64", Status.BAD_REQUEST),
    (header(Opcode.PUT, count=2, body_len=47), "cannot hold", Status.BAD_REQUEST),
    (header(Opcode.PUT, count=1, body_len=24 + (64 << 20) + 1), "block limit", Status.TOO_LARGE),
    (header(Opcode.PUT, count=4096, body_len=2**62), "limit is", Status.TOO_LARGE),
    (header(Opcode.PUT, count=4096, body_len=2**64 - 1), "limit is", Status.TOO_LARGE),
])
def test_header_rules_reject_with_an_answerable_status(raw, match, status):
    with pytest.raises(FrameRejected, match=match) as err:
        parse_header(raw)
    assert err.value.request_id == 7 and err.value.status == status
    assert isinstance(err.value, ProtocolError)


def test_huge_lengths_raise_before_any_allocation():
    tracemalloc.start()
    for count, body_len in [(4096, 2**62), (2**32 - 1, 2**40), (4096, 4096 * 24 + (1 << 30))]:
        dec = FrameDecoder()
        dec.feed(header(Opcode.PUT, count=count, body_len=body_len))
        with pytest.raises(ProtocolError):
            dec.next_event()  # the header alone is enough to refuse
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 * KiB


def test_error_response_limits():
    with pytest.raises(FrameRejected, match="error message"):
        decode_response(header(flags=1, status=Status.SERVER_ERROR, body_len=4097) + bytes(4097))
    with pytest.raises(FrameRejected, match="no items"):
        decode_response(header(flags=1, status=Status.SERVER_ERROR, count=1))
    with pytest.raises(ProtocolError, match="UTF-8"):
        decode_response(header(flags=1, status=Status.SERVER_ERROR, body_len=2) + b"\xff\xfe")


def put_frame(rows: list[tuple[bytes, int, int, int]], payload: bytes, body_len=None) -> bytes:
    table = b"".join(ITEM.pack(*r) for r in rows)
    body = table + payload
    return header(Opcode.PUT, count=len(rows), body_len=len(body) if body_len is None
                  else body_len) + body


@pytest.mark.parametrize("rows, payload, match", [
    ([(bid(1), 5, 0, 0)], b"abcd", "holds 5 payload bytes but the body has 4"),
    ([(bid(1), 3, 0, 0)], b"abcd", "holds 3"),
    ([(bid(1), 2, 0, 1)], b"ab", "reserved"),
    ([(bid(1), 0, Status.NOT_FOUND, 0)], b"", "in a request"),
    ([(bid(1), 0, 77, 0)], b"", "unknown status"),
    ([(bid(1), (64 << 20) + 1, 0, 0), (bid(2), 0, 0, 0)], b"", "block limit"),
])
def test_inconsistent_item_tables(rows, payload, match):
    with pytest.raises(ProtocolError, match=match):
        decode_request(put_frame(rows, payload))


def test_get_miss_must_not_carry_a_payload():
    body = ITEM.pack(bid(1), 3, Status.NOT_FOUND, 0) + b"abc"
    with pytest.raises(FrameRejected, match="NOT_FOUND with a payload"):
        decode_response(header(Opcode.GET, flags=1, count=1, body_len=len(body)) + body)


def test_bitmap_padding_and_hello_limits_are_checked():
    with pytest.raises(ProtocolError, match="padding"):
        decode_response(header(Opcode.EXISTS, flags=1, count=3, body_len=1) + b"\x08")
    unsharded = p.HELLO_SHARD.pack(0, 0)
    bad = p.HELLO_BODY.pack(bytes(32), 0, 0, 4096, 100, 1 << 30) + unsharded
    with pytest.raises(ProtocolError, match="limits"):
        decode_response(header(Opcode.HELLO, flags=1, body_len=60) + bad)
    bad = p.HELLO_BODY.pack(bytes(32), 4, 16, 4096, 100, 1 << 30) + unsharded
    with pytest.raises(ProtocolError, match="flags"):
        decode_response(header(Opcode.HELLO, flags=1, body_len=60) + bad)


def _hello_local(tail: bytes, flags: int = p.HELLO_LOCAL, ports: tuple[int, ...] = ()) -> bytes:
    body = (p.HELLO_BODY.pack(bytes(32), flags, 16, 4096, 100, 1 << 30)
            + p.HELLO_SHARD.pack(0, 0) + struct.pack(f"<{len(ports)}H", *ports) + tail)
    return header(Opcode.HELLO, flags=1, count=len(ports), body_len=len(body)) + body


def _path(raw: bytes) -> bytes:
    return struct.pack("<H", len(raw)) + raw


@pytest.mark.parametrize("tail, flags, ports, match", [
    (b"x" * 16 + _path(b"/a"), 0, (), "bytes after its shard list"),  # no HELLO_LOCAL flag
    (b"x" * 16, p.HELLO_LOCAL, (), "truncated"),  # no path
    (b"x" * 16 + _path(b"/a"), p.HELLO_LOCAL, (7070, 7071), "truncated"),  # one of two
    (b"x" * 16 + _path(b""), p.HELLO_LOCAL, (), "not valid"),
    (b"x" * 16 + _path(b"/a\0b"), p.HELLO_LOCAL, (), "not valid"),
    (b"x" * 16 + _path(b"\xff"), p.HELLO_LOCAL, (), "UTF-8"),
    (b"x" * 16 + _path(b"/a") + b"z", p.HELLO_LOCAL, (), "does not match"),
    (b"x" * 16 + struct.pack("<H", 9) + b"/a", p.HELLO_LOCAL, (), "not valid"),  # short
    (b"x" * 16 + _path(b"/" * 108), p.HELLO_LOCAL, (), "HELLO answer of|not valid"),
])
def test_hello_local_sockets_are_checked(tail, flags, ports, match):
    with pytest.raises(ProtocolError, match=match):
        decode_response(_hello_local(tail, flags, ports))


def test_hello_local_sockets_must_name_every_shard_when_encoded():
    with pytest.raises(ProtocolError, match="local socket list"):
        encode_response(HelloResponse(1, bytes(32), False, Limits(), 0, (7070, 7071),
                                      bytes(16), ("/only-one",)))
    with pytest.raises(ProtocolError, match="instance"):
        encode_response(HelloResponse(1, bytes(32), False, Limits(), 0, (), b"short", ("/a",)))


def test_shm_tables_are_checked():
    row = p.SHM_ITEM.pack(bid(1), 0, 10, 0, 2)  # an unknown flag in a request
    with pytest.raises(FrameRejected, match="unknown flags"):
        decode_request(header(Opcode.GET_SHM, count=1, body_len=len(row)) + row)
    row = p.SHM_ITEM.pack(bid(1), 0, 10, 0, Status.NOT_FOUND)  # a miss with a length
    with pytest.raises(FrameRejected, match="NOT_FOUND with a length"):
        decode_response(header(Opcode.GET_SHM, flags=1, count=1, body_len=len(row)) + row)
    with pytest.raises(FrameRejected, match="expected 32"):
        decode_request(header(Opcode.PUT_SHM, count=1, body_len=24) + row[:24])
    with pytest.raises(FrameRejected, match="reserved"):
        decode_request(header(Opcode.REGISTER, body_len=16) + p.SEGMENT.pack(1, 1, 4096))
    with pytest.raises(ProtocolError, match="not a shared-memory request"):
        ShmRequest(1, Opcode.GET, [])


@pytest.mark.parametrize("shard, ports, match", [
    (2, (7070, 7071), "names shard 2 of ports"),  # past the list
    (0, (7070, 0), "names shard 0 of ports"),  # a zero port
    (1, (), "shard 1 of an unsharded node"),
])
def test_hello_shard_lists_are_checked(shard, ports, match):
    limits = p.HELLO_BODY.pack(bytes(32), 0, 16, 4096, 100, 1 << 30)
    body = limits + p.HELLO_SHARD.pack(shard, 0) + struct.pack(f"<{len(ports)}H", *ports)
    with pytest.raises(ProtocolError, match=match):
        decode_response(header(Opcode.HELLO, flags=1, count=len(ports), body_len=len(body))
                        + body)
    with pytest.raises(ProtocolError, match="bad shard list"):
        encode_response(HelloResponse(1, bytes(32), False, Limits(), shard, ports))


def test_a_hello_lists_the_shards_and_this_connections_one():
    msg = HelloResponse(5, bytes(32), True, Limits(), shard=1, shard_ports=(7070, 7073))
    raw = encode_response(msg)
    assert raw[20:24] == (2).to_bytes(4, "little") and len(raw) == 32 + 56 + 4 + 4
    assert decode_response(raw) == msg


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_truncation_and_any_trailing_byte_is_an_error(msg):
    data = frame(msg)
    for n in range(len(data)):
        with pytest.raises(ProtocolError):
            decode(data[:n], is_response(msg))
    with pytest.raises(ProtocolError, match="after the end"):
        decode(data + b"\x00", is_response(msg))


def test_a_failed_decoder_stays_failed():
    dec = FrameDecoder()
    dec.feed(header(magic=0) + frame(PingRequest(1)))
    with pytest.raises(ProtocolError, match="magic"):
        dec.next_event()
    with pytest.raises(ProtocolError, match="failed earlier"):
        dec.next_event()


def test_smaller_limits_are_enforced():
    lim = Limits(max_body=4096, max_items=4, max_block=100, max_error=10)
    with pytest.raises(FrameRejected):
        decode_request(frame(GetRequest(1, [bid(i) for i in range(5)])), lim)
    with pytest.raises(ProtocolError):
        decode_request(frame(PutRequest(1, [(bid(1), bytes(101))])), lim)
    ok = decode_request(frame(PutRequest(1, [(bid(1), bytes(100))])), lim)
    assert ok.items[0][1] == bytes(100)


@settings(max_examples=500)
@given(st.binary(max_size=200), st.booleans())
def test_random_bytes_only_ever_raise_protocol_error(data, response):
    with pytest.raises(ProtocolError):
        decode(data, response)


@settings(max_examples=500)
@given(st.integers(0, 255), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
       st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.binary(max_size=300), st.booleans())
def test_random_bodies_behind_a_valid_magic(op, flags, status, reserved, count, body_len, body,
                                            response):
    raw = header(op, flags, 1, status, reserved, count, body_len) + body
    try:
        decode(raw, response)
    except ProtocolError:
        return
    h = parse_header(raw)  # it decoded: then the header was within every limit
    assert h.count <= p.MAX_ITEMS and h.body_len == len(body)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(requests | responses, st.data())
def test_corrupted_valid_frames_only_ever_raise_protocol_error(msg, data):
    raw = bytearray(frame(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        decoded = decode(bytes(raw), is_response(msg))
    except ProtocolError:
        return
    assert frame(decoded) == raw  # the encoding is canonical: what decodes re-encodes the same


# --- encoder checks ---------------------------------------------------------------------

@pytest.mark.parametrize("msg, match", [
    (GetRequest(1, [b"short"]), "16 bytes"),
    (GetRequest(1, [bid(i) for i in range(4097)]), "limit of 4096"),
    (PutRequest(1, [(bid(1), bytes((64 << 20) + 1))]), "block"),
    (PutRequest(1, [(bid(1), 12345)]), "not a buffer"),
    (PutRequest(2**64, []), "out of range"),
    (PutRequest(-1, []), "out of range"),
    (ErrorResponse(1, Opcode.GET, Status.OK, "x"), "other than OK"),
    (GetResponse(1, [GetItem(bid(1), Status.OK)]), "must carry"),
    (GetResponse(1, [GetItem(bid(1), Status.NOT_FOUND, b"x")]), "must not carry"),
    (AuthRequest(1, b"short", bytes(32)), "nonce"),
    (LookupPrefixResponse(1, 2**32), "out of range"),
    (PutResponse(1, [99]), "unknown"),
])
def test_encoder_refuses_invalid_messages(msg, match):
    with pytest.raises(ProtocolError, match=match):
        encode(msg)


def test_ints_are_refused_not_zero_filled():
    with pytest.raises(ProtocolError, match="int"):
        GetRequest(1, [16])
    with pytest.raises(ProtocolError, match="nonce must be bytes"):
        encode(AuthRequest(1, 32, bytes(32)))
    with pytest.raises(ProtocolError, match="str"):
        ExistsRequest(1, ["0123456789abcdef"])


def test_body_over_max_body_is_refused():
    lim = Limits(max_body=1000, max_items=4, max_block=800, max_error=10)
    with pytest.raises(ProtocolError, match="body of"):
        encode(PutRequest(1, [(bid(1), bytes(800)), (bid(2), bytes(800))]), lim)


def test_error_messages_are_truncated_on_a_character_boundary():
    lim = Limits(max_error=10)
    err = ErrorResponse(1, Opcode.PUT, Status.BUSY, "ab" + "é" * 10)
    msg = decode_response(frame(err, lim), lim)
    assert msg.message == "abéééé" and len(msg.message.encode()) == 10


def test_encode_request_and_response_check_direction():
    with pytest.raises(ProtocolError):
        encode_request(PingResponse(1))
    with pytest.raises(ProtocolError):
        encode_response(PingRequest(1))
    with pytest.raises(ProtocolError):
        encode("hello")


def test_limits_validation():
    for kw in [dict(max_body=0), dict(max_items=0), dict(max_block=2**32), dict(max_error=-1),
               dict(max_body=1000), dict(max_items=True)]:
        with pytest.raises(ConfigError):
            Limits(**kw)


def test_transport_protocol_is_structural():
    class Fake:
        def put_many(self, items): return []
        def get_many(self, ids, outs=None): return []
        def exists_many(self, ids): return []
        def delete_many(self, ids): return []
        def lookup_prefix(self, ids): return 0
        def ping(self): return 0.0
        def close(self): pass

    assert isinstance(Fake(), Transport)
    assert not isinstance(object(), Transport)


# ---- the lean framing the daemon and the SDK use on the hot path ----------------------

from hypothesis import given, strategies as st  # noqa: E402

_ids = st.lists(st.binary(min_size=16, max_size=16), min_size=0, max_size=40)
_statuses = st.sampled_from([Status.OK, Status.NOT_FOUND, Status.BUSY, Status.SERVER_ERROR])


@given(rid=st.integers(0, 2**64 - 1), ids=_ids)
def test_lean_id_requests_match_encode(rid, ids):
    assert p.frame_get_request(rid, ids) == encode_request(GetRequest(rid, ids))
    for cls in (ExistsRequest, DeleteRequest, LookupPrefixRequest):
        assert p.frame_ids_request(cls.opcode, rid, ids) == encode_request(cls(rid, ids))


@given(rid=st.integers(0, 2**64 - 1),
       items=st.lists(st.tuples(st.binary(min_size=16, max_size=16), st.binary(max_size=64)),
                      max_size=20))
def test_lean_put_frames_match_encode(rid, items):
    head = p.frame_put_head(rid, [(b, len(v)) for b, v in items])
    assert head + b"".join(v for _, v in items) == encode_request(PutRequest(rid, items))
    statuses = [Status.OK if len(v) % 3 else Status.TOO_LARGE for _, v in items]
    assert p.frame_put_response(rid, statuses) == encode_response(PutResponse(rid, statuses))


@given(rid=st.integers(0, 2**64 - 1),
       rows=st.lists(st.tuples(st.binary(min_size=16, max_size=16), _statuses,
                               st.binary(max_size=64)), max_size=20))
def test_lean_get_answers_match_encode(rid, rows):
    items = [GetItem(b, s, v if s == Status.OK else None) for b, s, v in rows]
    head = p.frame_get_head(rid, [(b, len(v) if s == Status.OK else 0, s) for b, s, v in rows])
    payloads = b"".join(v for _, s, v in rows if s == Status.OK)
    assert head + payloads == encode_response(GetResponse(rid, items))


@given(rid=st.integers(0, 2**64 - 1), bits=st.lists(st.booleans(), max_size=70),
       count=st.integers(0, 2**32 - 1))
def test_lean_small_answers_match_encode(rid, bits, count):
    assert p.frame_bits_response(Opcode.EXISTS, rid, bits) == \
        encode_response(ExistsResponse(rid, bits))
    assert p.frame_bits_response(Opcode.DELETE, rid, bits) == \
        encode_response(DeleteResponse(rid, bits))
    assert p.frame_lookup_response(rid, count) == encode_response(LookupPrefixResponse(rid, count))
    assert p.frame_ping_response(rid) == encode_response(PingResponse(rid))


@given(rid=st.integers(0, 2**64 - 1), ids=_ids, ms=st.integers(0, 2**32 - 1),
       bits=st.lists(st.tuples(st.booleans(), st.booleans()), max_size=70))
def test_lean_pin_frames_match_encode(rid, ids, ms, bits):
    assert p.frame_pin_request(rid, ids, ms) == encode_request(p.PinRequest(rid, ids, ms))
    found, pinned = [f for f, _ in bits], [q for _, q in bits]
    assert p.frame_pin_response(rid, found, pinned) == \
        encode_response(p.PinResponse(rid, found, pinned))


def test_pin_frames_are_checked():
    frame = p.frame_pin_request(5, [bid(1), bid(2)], 1000)
    assert decode_request(frame) == p.PinRequest(5, [bid(1), bid(2)], 1000)
    assert decode_request(frame).ids == (bid(1), bid(2))
    # The body is the 8-byte head and 16 bytes per id, exactly.
    with pytest.raises(FrameRejected, match="expected 40"):
        decode_request(header(Opcode.PIN, count=2, body_len=32) + bytes(32))
    bad = bytearray(frame)
    bad[HEADER.size + 4] = 1  # the reserved word
    with pytest.raises(FrameRejected, match="reserved"):
        decode_request(bytes(bad))
    with pytest.raises(ProtocolError, match="out of range"):
        encode_request(p.PinRequest(1, [bid(1)], 1 << 32))
    with pytest.raises(ProtocolError, match="a found and a pinned bit"):
        p.PinResponse(1, [True], [])
    answer = p.frame_pin_response(6, [True] * 9, [False] * 8 + [True])
    assert len(answer) == HEADER.size + 4  # two bitmaps of 2 bytes
    assert decode_response(answer) == p.PinResponse(6, [True] * 9, [False] * 8 + [True])
    with pytest.raises(ProtocolError, match="padding"):
        decode_response(answer[:-1] + b"\x03")  # a pinned bit past the ninth id
