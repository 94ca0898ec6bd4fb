"""The WQS data-plane wire protocol, sans-IO: messages in, buffers out; bytes in, events out.

Nothing here touches a socket (the style of h11). A sender turns a message into buffers
with `encode` and hands them to `socket.sendmsg`: the header and the small item table are
one bytes object, each block payload is the caller's own buffer, never copied. A receiver
feeds bytes to a `FrameDecoder` and pulls events. For the two frames that carry payloads
(a PUT request, an OK GET response) it first gets the `ItemTable`, then one `PayloadStart`
per payload, and may receive that payload straight into a buffer of its own::

    ev = dec.next_event()
    if isinstance(ev, PayloadStart):
        dec.read_payload_into(dest[ev.index], sock.recv_into)   # no copy through dec

Reading at most `dec.needed` bytes at a time before a payload keeps every payload byte out
of the decoder; reading more is correct, the surplus is just copied once. Every length
read off the wire is checked against `Limits` before anything is allocated from it.
The layout is specified in proto/DATAPLANE.md: keep the two in step.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Callable, ClassVar, NamedTuple, Sequence, Union

from wqs.errors import ConfigError, ProtocolError
from wqs.rpc.auth import NONCE_LEN, PROOF_LEN

MAGIC = 0x31535157  # the bytes b"WQS1" read as a little-endian u32
# 2: HELLO answers list the node's shards; the WRONG_SHARD status.
# 3: HELLO answers may announce local sockets; the shared-memory opcodes.
# PIN was added to version 3 later (a new opcode, no layout changed): a daemon that
# predates it takes opcode 15 for a protocol error and closes the connection.
VERSION = 3
FLAG_RESPONSE = 0x0001  # the only header flag of version 1; any other bit is an error
HELLO_AUTH_REQUIRED = 0x0001  # HelloResponse flags: the server wants AUTH before data ops
HELLO_LOCAL = 0x0002  # HelloResponse flags: the node's instance and local socket paths follow
HELLO_FLAGS = HELLO_AUTH_REQUIRED | HELLO_LOCAL
ID_LEN = 16  # block ids travel in canonical form (wqs.ids.BLOCK_ID_BYTES)

# Defaults of `Limits`.
MAX_BODY = 1 << 30  # 1 GiB in one frame body
MAX_ITEMS = 4096  # items in one batch
MAX_BLOCK = 64 << 20  # 64 MiB in one block payload
MAX_ERROR = 4096  # bytes of UTF-8 in an error message

# magic version opcode flags request_id status reserved count body_len: 32 bytes
HEADER = struct.Struct("<IBBHQHHIQ")
ITEM = struct.Struct("<16sIHH")  # block_id length status reserved
HELLO_BODY = struct.Struct("<32sIIIIQ")  # nonce flags max_items max_block max_error max_body
HELLO_SHARD = struct.Struct("<HH")  # this connection's shard, reserved; then u16 ports
MAX_SHARDS = 1024
AUTH_BODY = struct.Struct("<32s32s")  # client_nonce proof
INSTANCE_LEN = 16  # a daemon's random identity, the same on every socket it serves
MAX_PATH = 107  # bytes of a Unix socket path (sun_path holds 108 with the NUL)
# One-sided frames (shared memory): REGISTER's body, and the item of GET_SHM and PUT_SHM
# requests and of GET_SHM answers: block_id offset length segment flags-or-status.
SEGMENT = struct.Struct("<IIQ")  # segment reserved size
UNREGISTER_BODY = struct.Struct("<II")  # segment reserved
SHM_ITEM = struct.Struct("<16sQIHH")
SHM_SLOT = 0x0001  # item flag: the bytes around the payload are the node's (see DATAPLANE.md)
RDMA_ENDPOINT_LEN = 36  # wqs.rdma.wire.ENDPOINT
RDMA_MEMORY_LEN = 24  # wqs.rdma.wire.MEMORY
PIN_BODY = struct.Struct("<II")  # milliseconds (0: release), reserved; then the block ids
U32 = struct.Struct("<I")

BytesLike = Union[bytes, bytearray, memoryview]  # any C-contiguous buffer is accepted


class Opcode(IntEnum):
    HELLO = 1
    AUTH = 2
    PING = 3
    PUT = 4
    GET = 5
    EXISTS = 6
    DELETE = 7
    LOOKUP_PREFIX = 8
    REGISTER = 9  # a shared-memory segment (its fd rides along, SCM_RIGHTS)
    UNREGISTER = 10
    GET_SHM = 11  # GET into registered memory: only the table crosses the socket
    PUT_SHM = 12  # PUT from registered memory
    RDMA_CONNECT = 13  # exchange RC queue pair endpoints (wqs/rdma/wire.py), over TCP
    REGISTER_MR = 14  # a memory region the node may RDMA-read and -write (RDMA links)
    PIN = 15  # keep blocks from eviction for a while (a lease), or release them


class Status(IntEnum):
    OK = 0
    NOT_FOUND = 1  # per item: no such block
    BAD_REQUEST = 2  # malformed or not allowed in this state
    TOO_LARGE = 3  # a limit was exceeded
    AUTH_REQUIRED = 4  # a data op before a successful AUTH
    AUTH_FAILED = 5  # wrong proof; the server closes the connection
    NO_SPACE = 6  # per item (PUT): the node cannot make room
    BUSY = 7  # overloaded, retry later
    SERVER_ERROR = 8  # anything else that went wrong on the node
    WRONG_SHARD = 9  # a block of the request belongs to another shard of the node


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts. A server advertises its own in its HelloResponse."""

    max_body: int = MAX_BODY
    max_items: int = MAX_ITEMS
    max_block: int = MAX_BLOCK
    max_error: int = MAX_ERROR

    def __post_init__(self) -> None:
        for name, top in (("max_body", 1 << 63), ("max_items", 1 << 32), ("max_block", 1 << 32),
                          ("max_error", 1 << 32)):
            v = getattr(self, name)
            if type(v) is not int or not 0 < v < top:
                raise ConfigError(f"Limits.{name} must be an int in (0, {top}), got {v!r}")
        # Otherwise a full-sized batch could never be sent at all.
        if self.max_items * ITEM.size > self.max_body:
            raise ConfigError(f"Limits.max_body {self.max_body} cannot hold the item table of "
                              f"{self.max_items} items")


DEFAULT_LIMITS = Limits()


def _as_bytes(b: BytesLike, what: str = "block id") -> bytes:
    if type(b) is bytes:
        return b
    try:  # via memoryview: bytes(16) would be 16 zero bytes, not an error
        return bytes(memoryview(b))
    except TypeError:
        raise ProtocolError(f"{what} must be bytes, not {type(b).__name__}") from None


def _enum(kind: type[IntEnum], value: int, what: str):
    member = kind._value2member_map_.get(value)  # a dict look-up: kind(value) costs 5x more
    if member is None:
        raise ProtocolError(f"unknown {what} {value}")
    return member


class FrameHeader(NamedTuple):
    """The fixed 32-byte header that starts every frame (magic and version are implied).

    A NamedTuple rather than a dataclass: one is made per frame on the daemon's hot path,
    and a tuple is built several times faster than a frozen dataclass."""

    opcode: Opcode
    flags: int
    request_id: int
    status: Status = Status.OK
    count: int = 0  # items in the batch
    body_len: int = 0  # bytes after the header

    SIZE = HEADER.size

    @property
    def is_response(self) -> bool:
        return bool(self.flags & FLAG_RESPONSE)

    def pack(self) -> bytes:
        try:
            return HEADER.pack(MAGIC, VERSION, self.opcode, self.flags, self.request_id,
                               self.status, 0, self.count, self.body_len)
        except struct.error as e:
            raise ProtocolError(f"header field out of range: {e}") from None


class ItemEntry(NamedTuple):
    """One row of an item table: its payload, if status is OK, follows the table in order.
    (A NamedTuple: a table of thousands of rows is parsed per frame.)"""

    block_id: bytes
    length: int
    status: Status = Status.OK


class FrameRejected(ProtocolError):
    """A frame broke a rule after its header identified it: the receiver may answer
    ErrorResponse(request_id, opcode, status, str(self)) before closing the connection."""

    def __init__(self, message: str, request_id: int, opcode: Opcode, status: Status) -> None:
        super().__init__(message)
        self.request_id, self.opcode, self.status = request_id, opcode, status


# --- messages ---------------------------------------------------------------------------

@dataclass(frozen=True)
class HelloRequest:
    request_id: int
    opcode: ClassVar[Opcode] = Opcode.HELLO


@dataclass(frozen=True)
class HelloResponse:
    request_id: int
    nonce: bytes  # fresh per connection; the client proves the token against it
    auth_required: bool
    limits: Limits
    # The node's shards: the data port of each, and which one this connection reached.
    # No ports: the node is not sharded, this connection serves every block.
    shard: int = 0
    shard_ports: tuple[int, ...] = ()
    # Same-host clients: the daemon's identity (random per start) and each shard's Unix
    # socket, where the shared-memory opcodes are served. Empty: none announced.
    instance: bytes = b""
    local_sockets: tuple[str, ...] = ()
    opcode: ClassVar[Opcode] = Opcode.HELLO

    def __post_init__(self) -> None:
        object.__setattr__(self, "shard_ports", tuple(self.shard_ports))
        object.__setattr__(self, "local_sockets", tuple(self.local_sockets))


@dataclass(frozen=True)
class AuthRequest:
    request_id: int
    client_nonce: bytes
    proof: bytes  # wqs.rpc.auth.client_proof
    opcode: ClassVar[Opcode] = Opcode.AUTH


@dataclass(frozen=True)
class AuthResponse:
    request_id: int
    proof: bytes  # wqs.rpc.auth.server_proof: the server knows the token too
    opcode: ClassVar[Opcode] = Opcode.AUTH


@dataclass(frozen=True)
class PingRequest:
    request_id: int
    opcode: ClassVar[Opcode] = Opcode.PING


@dataclass(frozen=True)
class PingResponse:
    request_id: int
    opcode: ClassVar[Opcode] = Opcode.PING


@dataclass(frozen=True)
class PutRequest:
    request_id: int
    items: tuple[tuple[bytes, BytesLike], ...]  # (block_id, payload)
    opcode: ClassVar[Opcode] = Opcode.PUT

    def __post_init__(self) -> None:
        object.__setattr__(self, "items", tuple((_as_bytes(b), p) for b, p in self.items))


@dataclass(frozen=True)
class PutResponse:
    request_id: int
    statuses: tuple[Status, ...]  # one per item: OK, TOO_LARGE, NO_SPACE, BUSY, SERVER_ERROR
    opcode: ClassVar[Opcode] = Opcode.PUT

    def __post_init__(self) -> None:
        object.__setattr__(self, "statuses", tuple(self.statuses))


@dataclass(frozen=True)
class _IdsRequest:
    request_id: int
    ids: tuple[bytes, ...]
    opcode: ClassVar[Opcode]  # set by each subclass

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", tuple(map(_as_bytes, self.ids)))


class GetRequest(_IdsRequest):
    opcode = Opcode.GET


class ExistsRequest(_IdsRequest):
    opcode = Opcode.EXISTS


class DeleteRequest(_IdsRequest):
    opcode = Opcode.DELETE


class LookupPrefixRequest(_IdsRequest):
    opcode = Opcode.LOOKUP_PREFIX


@dataclass(frozen=True)
class GetItem:
    block_id: bytes
    status: Status  # OK, NOT_FOUND, BUSY (did not fit this frame: ask again) or SERVER_ERROR
    payload: BytesLike | None = None  # present exactly when status is OK


@dataclass(frozen=True)
class GetResponse:
    request_id: int
    items: tuple[GetItem, ...]
    opcode: ClassVar[Opcode] = Opcode.GET

    def __post_init__(self) -> None:
        object.__setattr__(self, "items", tuple(self.items))


@dataclass(frozen=True)
class _BitsResponse:
    request_id: int
    bits: tuple[bool, ...]  # one per requested id, sent as a bitmap
    opcode: ClassVar[Opcode]  # set by each subclass

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", tuple(map(bool, self.bits)))


class ExistsResponse(_BitsResponse):
    """bits[i]: ids[i] is stored."""
    opcode = Opcode.EXISTS


class DeleteResponse(_BitsResponse):
    """bits[i]: ids[i] was stored and is now deleted."""
    opcode = Opcode.DELETE


@dataclass(frozen=True)
class LookupPrefixResponse:
    request_id: int
    count: int  # how many leading ids of the request are all present
    opcode: ClassVar[Opcode] = Opcode.LOOKUP_PREFIX


@dataclass(frozen=True)
class PinRequest:
    """Pin the stored blocks among `ids` for `milliseconds` (the node cuts it to its own
    limit), so that a load following a lookup finds them; 0 releases their pins."""

    request_id: int
    ids: tuple[bytes, ...]
    milliseconds: int
    opcode: ClassVar[Opcode] = Opcode.PIN

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", tuple(map(_as_bytes, self.ids)))


@dataclass(frozen=True)
class PinResponse:
    """found[i]: ids[i] is stored (what EXISTS says); pinned[i]: it is pinned now (always
    False for a release, and where the node refused the pin: its limit on pinned bytes
    was reached, or the block cannot be pinned)."""

    request_id: int
    found: tuple[bool, ...]
    pinned: tuple[bool, ...]
    opcode: ClassVar[Opcode] = Opcode.PIN

    def __post_init__(self) -> None:
        object.__setattr__(self, "found", tuple(map(bool, self.found)))
        object.__setattr__(self, "pinned", tuple(map(bool, self.pinned)))
        if len(self.found) != len(self.pinned):
            raise ProtocolError("a PIN answer has a found and a pinned bit per block")


@dataclass(frozen=True)
class RegisterRequest:
    """A shared-memory segment of `size` bytes, named `segment` on this connection. Its
    file descriptor (a memfd sealed against shrinking) travels with the frame."""

    request_id: int
    segment: int
    size: int
    opcode: ClassVar[Opcode] = Opcode.REGISTER


@dataclass(frozen=True)
class RegisterResponse:
    request_id: int
    opcode: ClassVar[Opcode] = Opcode.REGISTER


@dataclass(frozen=True)
class UnregisterRequest:
    request_id: int
    segment: int
    opcode: ClassVar[Opcode] = Opcode.UNREGISTER


@dataclass(frozen=True)
class UnregisterResponse:
    request_id: int
    opcode: ClassVar[Opcode] = Opcode.UNREGISTER


class ShmItem(NamedTuple):
    """A block in registered memory: `length` bytes at `offset` of `segment`. In a GET_SHM
    request, length is the room there; in its answer, where the payload now lies, its
    length and `status` (the last field: flags in a request)."""

    block_id: bytes
    offset: int
    length: int
    segment: int
    flags: int = 0  # SHM_SLOT in a request; the Status in a GET_SHM answer


@dataclass(frozen=True)
class ShmRequest:
    """GET_SHM or PUT_SHM."""

    request_id: int
    opcode: Opcode
    items: tuple[ShmItem, ...]

    def __post_init__(self) -> None:
        if self.opcode not in (Opcode.GET_SHM, Opcode.PUT_SHM):
            raise ProtocolError(f"{self.opcode.name} is not a shared-memory request")
        object.__setattr__(self, "items", tuple(ShmItem(*it) for it in self.items))


@dataclass(frozen=True)
class ShmGetResponse:
    request_id: int
    items: tuple[ShmItem, ...]  # flags holds each item's Status
    opcode: ClassVar[Opcode] = Opcode.GET_SHM

    def __post_init__(self) -> None:
        object.__setattr__(self, "items", tuple(ShmItem(*it) for it in self.items))


@dataclass(frozen=True)
class ShmPutResponse:
    request_id: int
    statuses: tuple[Status, ...]
    opcode: ClassVar[Opcode] = Opcode.PUT_SHM

    def __post_init__(self) -> None:
        object.__setattr__(self, "statuses", tuple(self.statuses))


@dataclass(frozen=True)
class RdmaConnectRequest:
    """RDMA_CONNECT: the client's queue pair endpoint, packed (wqs.rdma.wire.Endpoint)."""

    request_id: int
    endpoint: bytes
    opcode: ClassVar[Opcode] = Opcode.RDMA_CONNECT


@dataclass(frozen=True)
class RdmaConnectResponse:
    """The node's endpoint, its queue pair ready to receive."""

    request_id: int
    endpoint: bytes
    opcode: ClassVar[Opcode] = Opcode.RDMA_CONNECT


@dataclass(frozen=True)
class RegisterMrRequest:
    """REGISTER_MR: a region of the client's memory, packed (wqs.rdma.wire.Memory); the
    answer is a RegisterResponse-like empty OK (RegisterMrResponse)."""

    request_id: int
    memory: bytes
    opcode: ClassVar[Opcode] = Opcode.REGISTER_MR


@dataclass(frozen=True)
class RegisterMrResponse:
    request_id: int
    opcode: ClassVar[Opcode] = Opcode.REGISTER_MR


@dataclass(frozen=True)
class ErrorResponse:
    """The answer to any request that failed as a whole; message is truncated to max_error."""

    request_id: int
    opcode: Opcode
    status: Status
    message: str


Request = Union[HelloRequest, AuthRequest, PingRequest, PutRequest, GetRequest, ExistsRequest,
                DeleteRequest, LookupPrefixRequest, RegisterRequest, UnregisterRequest,
                ShmRequest, RdmaConnectRequest, RegisterMrRequest, PinRequest]
Response = Union[HelloResponse, AuthResponse, PingResponse, PutResponse, GetResponse,
                 ExistsResponse, DeleteResponse, LookupPrefixResponse, RegisterResponse,
                 UnregisterResponse, ShmGetResponse, ShmPutResponse, RdmaConnectResponse,
                 RegisterMrResponse, PinResponse, ErrorResponse]
Message = Union[Request, Response]
_RESPONSES = (HelloResponse, AuthResponse, PingResponse, PutResponse, GetResponse, _BitsResponse,
              LookupPrefixResponse, RegisterResponse, UnregisterResponse, ShmGetResponse,
              ShmPutResponse, RdmaConnectResponse, RegisterMrResponse, PinResponse,
              ErrorResponse)
_REQUESTS = (HelloRequest, AuthRequest, PingRequest, PutRequest, _IdsRequest, RegisterRequest,
             UnregisterRequest, ShmRequest, RdmaConnectRequest, RegisterMrRequest, PinRequest)


# --- frame shapes -----------------------------------------------------------------------

def _ids(n: int) -> int:
    return n * ID_LEN


def _bitmap(n: int) -> int:
    return (n + 7) // 8


def _shm_items(n: int) -> int:
    return n * SHM_ITEM.size


def _hello_fixed(n: int) -> int:
    """A HELLO answer's body without its local-socket part (n: shard ports)."""
    return HELLO_BODY.size + HELLO_SHARD.size + 2 * n


def _hello_local_max(n: int) -> int:
    return INSTANCE_LEN + max(n, 1) * (2 + MAX_PATH)


# (opcode, is_response) -> the exact body length of a frame without payloads: an int for
# a frame that carries no items (count must be 0), else a function of count.
_BODY_LEN: dict[tuple[Opcode, bool], int | Callable[[int], int]] = {
    (Opcode.HELLO, False): 0,
    (Opcode.HELLO, True): _hello_fixed,  # at least: a local-socket part may follow
    (Opcode.AUTH, False): AUTH_BODY.size, (Opcode.AUTH, True): PROOF_LEN,
    (Opcode.PING, False): 0, (Opcode.PING, True): 0,
    (Opcode.GET, False): _ids, (Opcode.EXISTS, False): _ids, (Opcode.DELETE, False): _ids,
    (Opcode.LOOKUP_PREFIX, False): _ids, (Opcode.LOOKUP_PREFIX, True): U32.size,
    (Opcode.PUT, True): lambda n: 2 * n, (Opcode.EXISTS, True): _bitmap,
    (Opcode.DELETE, True): _bitmap,
    (Opcode.REGISTER, False): SEGMENT.size, (Opcode.REGISTER, True): 0,
    (Opcode.UNREGISTER, False): UNREGISTER_BODY.size, (Opcode.UNREGISTER, True): 0,
    (Opcode.GET_SHM, False): _shm_items, (Opcode.GET_SHM, True): _shm_items,
    (Opcode.PUT_SHM, False): _shm_items, (Opcode.PUT_SHM, True): lambda n: 2 * n,
    (Opcode.RDMA_CONNECT, False): RDMA_ENDPOINT_LEN,
    (Opcode.RDMA_CONNECT, True): RDMA_ENDPOINT_LEN,
    (Opcode.REGISTER_MR, False): RDMA_MEMORY_LEN, (Opcode.REGISTER_MR, True): 0,
    (Opcode.PIN, False): lambda n: PIN_BODY.size + _ids(n),
    (Opcode.PIN, True): lambda n: 2 * _bitmap(n),  # found bits, then pinned bits
}
_PAYLOAD_FRAMES = {(Opcode.PUT, False), (Opcode.GET, True)}  # item table, then payloads


def carries_payloads(h: FrameHeader) -> bool:
    """True for a PUT request and an OK GET response: their body is a table then payloads."""
    return (h.opcode, h.is_response) in _PAYLOAD_FRAMES and h.status == Status.OK


_OPCODE_OF = {int(op): op for op in Opcode}
_IDS_REQUEST_OPS = frozenset({Opcode.GET, Opcode.EXISTS, Opcode.DELETE, Opcode.LOOKUP_PREFIX})
_SHM_DATA_OPS = frozenset({Opcode.GET_SHM, Opcode.PUT_SHM})
_STATUS_OK = Status.OK


def parse_header(data: BytesLike, limits: Limits = DEFAULT_LIMITS, *,
                 response: bool | None = None) -> FrameHeader:
    """Parse and check the first 32 bytes of a frame: every field, and that count and
    body_len fit the limits and the opcode, so the body may be read (and allocated) safely.
    `response` set, the frame must be a response (True) or a request (False)."""
    if len(data) >= HEADER.size:
        # The frames the data path sees all the time, checked in a few comparisons (the
        # same rules as below, which they satisfy; anything else takes the full path).
        magic, version, op, flags, rid, status, reserved, count, body_len = \
            HEADER.unpack_from(data)
        if magic == MAGIC and version == VERSION and not reserved and not status \
                and count <= limits.max_items and body_len <= limits.max_body:
            opcode = _OPCODE_OF.get(op)
            if flags == 0 and response is not True:
                if opcode in _IDS_REQUEST_OPS and body_len == count * ID_LEN:
                    return FrameHeader(opcode, 0, rid, _STATUS_OK, count, body_len)
                if opcode is Opcode.PUT and \
                        0 <= body_len - count * ITEM.size <= count * limits.max_block:
                    return FrameHeader(opcode, 0, rid, _STATUS_OK, count, body_len)
                if opcode in _SHM_DATA_OPS and body_len == count * SHM_ITEM.size:
                    return FrameHeader(opcode, 0, rid, _STATUS_OK, count, body_len)
            elif flags == FLAG_RESPONSE and response is not False:
                if opcode is Opcode.GET and \
                        0 <= body_len - count * ITEM.size <= count * limits.max_block:
                    return FrameHeader(opcode, flags, rid, _STATUS_OK, count, body_len)
                if opcode is Opcode.PUT and body_len == 2 * count:
                    return FrameHeader(opcode, flags, rid, _STATUS_OK, count, body_len)
                if opcode is Opcode.GET_SHM and body_len == count * SHM_ITEM.size:
                    return FrameHeader(opcode, flags, rid, _STATUS_OK, count, body_len)
    return _parse_header(data, limits, response)


def _parse_header(data: BytesLike, limits: Limits, response: bool | None) -> FrameHeader:
    if len(data) < HEADER.size:
        raise ProtocolError(f"truncated header: {len(data)} of {HEADER.size} bytes")
    magic, version, op, flags, rid, status, reserved, count, body_len = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic 0x{magic:08x}, expected 0x{MAGIC:08x}: not a WQS peer")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version}, this side speaks {VERSION}")
    opcode = _enum(Opcode, op, "opcode")
    if flags & ~FLAG_RESPONSE:
        raise ProtocolError(f"unknown header flags 0x{flags:04x}")
    h = FrameHeader(opcode, flags, rid, _enum(Status, status, "status"), count, body_len)
    if response is not None and h.is_response != response:
        raise ProtocolError(f"expected a {'response' if response else 'request'}, got the other")
    if reserved:
        raise _rejected(h, "reserved header field is not zero")
    if not h.is_response and h.status != Status.OK:
        raise _rejected(h, "a request must carry status OK")
    if count > limits.max_items:
        raise _rejected(h, f"{count} items, limit is {limits.max_items}", Status.TOO_LARGE)
    if body_len > limits.max_body:
        raise _rejected(h, f"body of {body_len} bytes, limit is {limits.max_body}",
                        Status.TOO_LARGE)
    rule = _BODY_LEN.get((opcode, h.is_response))
    if h.is_response and h.status != Status.OK:  # an error: the body is its message
        if count:
            raise _rejected(h, "an error response carries no items")
        if body_len > limits.max_error:
            raise _rejected(h, f"error message of {body_len} bytes, limit is {limits.max_error}",
                            Status.TOO_LARGE)
    elif rule is None:  # a payload frame
        table = count * ITEM.size
        if body_len < table:
            raise _rejected(h, f"body of {body_len} bytes cannot hold a table of {count} items")
        if body_len - table > count * limits.max_block:
            raise _rejected(h, f"{body_len - table} payload bytes in {count} items exceed the "
                            f"{limits.max_block}-byte block limit", Status.TOO_LARGE)
    elif isinstance(rule, int) and count:
        raise _rejected(h, f"count is {count} in a frame that carries no items")
    elif opcode is Opcode.HELLO and h.is_response:  # the local-socket part is optional
        lo = _hello_fixed(count)
        if count > MAX_SHARDS or not lo <= body_len <= lo + _hello_local_max(count):
            raise _rejected(h, f"HELLO answer of {body_len} bytes for {count} shards")
    elif body_len != (want := rule if isinstance(rule, int) else rule(count)):
        raise _rejected(h, f"body is {body_len} bytes, expected {want}")
    return h


def _rejected(h: FrameHeader, msg: str, status: Status = Status.BAD_REQUEST) -> FrameRejected:
    return FrameRejected(f"{h.opcode.name} #{h.request_id}: {msg}", h.request_id, h.opcode, status)


def parse_item_table(h: FrameHeader, data: BytesLike,
                     limits: Limits = DEFAULT_LIMITS) -> tuple[ItemEntry, ...]:
    """Parse the count*24-byte item table of a payload frame and check it against body_len."""
    table = h.count * ITEM.size
    if len(data) < table:
        raise ProtocolError(f"truncated item table: {len(data)} of {table} bytes")
    items, total = [], 0
    ok, max_block, request = Status.OK, limits.max_block, not h.is_response
    for i, (bid, length, status, reserved) in enumerate(ITEM.iter_unpack(data[:table])):
        if not status and not reserved and length <= max_block:  # the usual row
            items.append(ItemEntry(bid, length, ok))
            total += length
            continue
        if request and status:
            st = _enum(Status, status, f"status in item {i}")
            raise _rejected(h, f"item {i}: status {st.name} in a request")
        st = _enum(Status, status, f"status in item {i}")
        if length > limits.max_block:
            raise _rejected(h, f"item {i}: {length} bytes exceed the {limits.max_block}-byte "
                            "block limit", Status.TOO_LARGE)
        if reserved:
            raise _rejected(h, f"item {i}: reserved field is not zero")
        if st != Status.OK and (length or not h.is_response):
            raise _rejected(h, f"item {i}: status {st.name} "
                            f"{'with a payload' if length else 'in a request'}")
        items.append(ItemEntry(bid, length, st))
        total += length
    if table + total != h.body_len:
        raise _rejected(h, f"item table holds {total} payload bytes but the body has "
                        f"{h.body_len - table}")
    return tuple(items)


_BYTE_BITS = [tuple(bool(b >> i & 1) for i in range(8)) for b in range(256)]  # LSB first


def _unpack_bits(data: bytes, n: int) -> tuple[bool, ...]:
    if n % 8 and data[-1] >> (n % 8):
        raise ProtocolError("bitmap padding bits are not zero")
    return tuple(itertools.chain.from_iterable(_BYTE_BITS[b] for b in data))[:n]


def _pack_bits(bits: Sequence[bool]) -> bytes:
    # Bit i of the bitmap is bit i of one little-endian integer.
    digits = "".join("1" if b else "0" for b in reversed(bits))
    return int(digits or "0", 2).to_bytes(_bitmap(len(bits)), "little")


def decode_body(h: FrameHeader, body: bytes) -> Message:
    """Decode the whole body of a frame without payloads (parse_header checked its size)."""
    rid, op = h.request_id, h.opcode
    if h.is_response and h.status != Status.OK:
        try:
            return ErrorResponse(rid, op, h.status, body.decode("utf-8"))
        except UnicodeDecodeError:
            raise ProtocolError(f"{op.name} #{rid}: error message is not UTF-8") from None
    if op in _SHM_OPS:
        return _decode_shm(h, body)
    if op == Opcode.PIN:
        return _decode_pin(h, body)
    if not h.is_response:
        if op == Opcode.HELLO:
            return HelloRequest(rid)
        if op == Opcode.PING:
            return PingRequest(rid)
        if op == Opcode.AUTH:
            return AuthRequest(rid, *AUTH_BODY.unpack(body))
        return _IDS_REQUESTS[op](rid, [body[i:i + ID_LEN] for i in range(0, len(body), ID_LEN)])
    if op == Opcode.HELLO:
        nonce, flags, max_items, max_block, max_error, max_body = HELLO_BODY.unpack_from(body)
        if flags & ~HELLO_FLAGS:
            raise ProtocolError(f"unknown HELLO flags 0x{flags:08x}")
        try:
            limits = Limits(max_body, max_items, max_block, max_error)
        except ConfigError as e:
            raise ProtocolError(f"server advertises unusable limits: {e}") from None
        shard, reserved = HELLO_SHARD.unpack_from(body, HELLO_BODY.size)
        ports = struct.unpack_from(f"<{h.count}H", body, HELLO_BODY.size + HELLO_SHARD.size)
        if reserved:
            raise ProtocolError("HELLO reserved field is not zero")
        if ports and (shard >= len(ports) or not all(ports)):
            raise ProtocolError(f"HELLO names shard {shard} of ports {list(ports)}")
        if not ports and shard:
            raise ProtocolError(f"HELLO names shard {shard} of an unsharded node")
        instance, paths = _decode_local(body, _hello_fixed(h.count), max(h.count, 1),
                                        bool(flags & HELLO_LOCAL))
        return HelloResponse(rid, nonce, bool(flags & HELLO_AUTH_REQUIRED), limits, shard,
                             ports, instance, paths)
    if op == Opcode.AUTH:
        return AuthResponse(rid, body)
    if op == Opcode.PING:
        return PingResponse(rid)
    if op == Opcode.PUT:
        return PutResponse(rid, tuple(_enum(Status, s, "item status")
                                      for s in struct.unpack(f"<{h.count}H", body)))
    if op == Opcode.LOOKUP_PREFIX:
        return LookupPrefixResponse(rid, U32.unpack(body)[0])
    cls = ExistsResponse if op == Opcode.EXISTS else DeleteResponse
    return cls(rid, _unpack_bits(body, h.count))


_IDS_REQUESTS: dict[Opcode, type[_IdsRequest]] = {
    c.opcode: c for c in (GetRequest, ExistsRequest, DeleteRequest, LookupPrefixRequest)}
_SHM_OPS = frozenset({Opcode.REGISTER, Opcode.UNREGISTER, Opcode.GET_SHM, Opcode.PUT_SHM,
                      Opcode.RDMA_CONNECT, Opcode.REGISTER_MR})


def _decode_pin(h: FrameHeader, body: bytes) -> Message:
    if h.is_response:
        half = _bitmap(h.count)
        return PinResponse(h.request_id, _unpack_bits(body[:half], h.count),
                           _unpack_bits(body[half:], h.count))
    milliseconds, reserved = PIN_BODY.unpack_from(body)
    if reserved:
        raise _rejected(h, "reserved field is not zero")
    return PinRequest(h.request_id, unpack_ids(body[PIN_BODY.size:]), milliseconds)


def _decode_local(body: bytes, at: int, shards: int, announced: bool
                  ) -> tuple[bytes, tuple[str, ...]]:
    """A HELLO answer's local-socket part: (instance, one path per shard), or nothing."""
    if not announced:
        if len(body) != at:
            raise ProtocolError("HELLO carries bytes after its shard list")
        return b"", ()
    instance = body[at : at + INSTANCE_LEN]
    at += INSTANCE_LEN
    paths = []
    for _ in range(shards):
        if len(body) < at + 2:
            raise ProtocolError("HELLO local socket list is truncated")
        (n,) = struct.unpack_from("<H", body, at)
        raw = body[at + 2 : at + 2 + n]
        if not 0 < n <= MAX_PATH or len(raw) != n or b"\0" in raw:
            raise ProtocolError(f"HELLO local socket path of {n} bytes is not valid")
        try:
            paths.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ProtocolError("HELLO local socket path is not UTF-8") from None
        at += 2 + n
    if len(instance) != INSTANCE_LEN or at != len(body):
        raise ProtocolError("HELLO local socket part does not match its length")
    return instance, tuple(paths)


def _decode_shm(h: FrameHeader, body: bytes) -> Message:
    rid, op = h.request_id, h.opcode
    if op == Opcode.RDMA_CONNECT:
        return (RdmaConnectResponse if h.is_response else RdmaConnectRequest)(rid, bytes(body))
    if op == Opcode.REGISTER_MR:
        return RegisterMrResponse(rid) if h.is_response else RegisterMrRequest(rid, bytes(body))
    if op == Opcode.REGISTER:
        if h.is_response:
            return RegisterResponse(rid)
        segment, reserved, size = SEGMENT.unpack(body)
        if reserved:
            raise _rejected(h, "reserved field is not zero")
        return RegisterRequest(rid, segment, size)
    if op == Opcode.UNREGISTER:
        if h.is_response:
            return UnregisterResponse(rid)
        segment, reserved = UNREGISTER_BODY.unpack(body)
        if reserved:
            raise _rejected(h, "reserved field is not zero")
        return UnregisterRequest(rid, segment)
    if op == Opcode.PUT_SHM and h.is_response:
        return ShmPutResponse(rid, tuple(_enum(Status, s, "item status")
                                         for s in struct.unpack(f"<{h.count}H", body)))
    items = parse_shm_table(h, body)
    if h.is_response:
        return ShmGetResponse(rid, items)
    return ShmRequest(rid, op, items)


def parse_shm_table(h: FrameHeader, body: BytesLike) -> tuple[ShmItem, ...]:
    """The items of a GET_SHM or PUT_SHM request, or of a GET_SHM answer (parse_header
    checked the body's length). Bounds against registered memory are the receiver's to
    check: this checks only what the frame alone can say."""
    items = []
    response = h.is_response
    for i, row in enumerate(SHM_ITEM.iter_unpack(body)):
        last = row[4]
        if response:
            st = _enum(Status, last, f"status in item {i}")
            if st != Status.OK and row[2]:
                if st != Status.TOO_LARGE:  # TOO_LARGE says how large the block is
                    raise _rejected(h, f"item {i}: status {st.name} with a length")
            row = ShmItem(row[0], row[1], row[2], row[3], st)
        elif last & ~SHM_SLOT:
            raise _rejected(h, f"item {i}: unknown flags 0x{last:04x}")
        items.append(ShmItem(*row))
    return tuple(items)


# --- encoding ---------------------------------------------------------------------------

def _id(b: BytesLike) -> bytes:
    b = _as_bytes(b)
    if len(b) != ID_LEN:
        raise ProtocolError(f"block id must be {ID_LEN} bytes, got {len(b)}")
    return b


def _exact(b: BytesLike, n: int, what: str) -> bytes:
    b = _as_bytes(b, what)
    if len(b) != n:
        raise ProtocolError(f"{what} must be {n} bytes, got {len(b)}")
    return b


def _payload(p: BytesLike, limits: Limits) -> memoryview:
    try:
        v = memoryview(p)
    except TypeError:
        raise ProtocolError(f"payload is not a buffer: {type(p).__name__}") from None
    if not v.c_contiguous:
        raise ProtocolError("payload must be a C-contiguous buffer")
    v = v if v.ndim == 1 and v.format == "B" else v.cast("B")  # byte-addressed for sendmsg
    if v.nbytes > limits.max_block:
        raise ProtocolError(f"block of {v.nbytes} bytes exceeds the {limits.max_block}-byte limit")
    return v


def _batch(n: int, limits: Limits) -> int:
    if n > limits.max_items:
        raise ProtocolError(f"batch of {n} items exceeds the limit of {limits.max_items}")
    return n


def _encode_body(m: Message, limits: Limits) -> tuple[bytes, int, list[memoryview], Status]:
    """(body head, count, payload buffers, status) of a message."""
    ok = Status.OK
    if isinstance(m, ErrorResponse):
        if m.status == ok:
            raise ProtocolError("an ErrorResponse needs a status other than OK")
        text = str(m.message).encode("utf-8", "replace")[:limits.max_error]
        return text.decode("utf-8", "ignore").encode(), 0, [], _enum(Status, m.status, "status")
    if isinstance(m, (HelloRequest, PingRequest, PingResponse)):
        return b"", 0, [], ok
    if isinstance(m, HelloResponse):
        lim, ports = m.limits, m.shard_ports
        if len(ports) > MAX_SHARDS or (ports and not 0 <= m.shard < len(ports)) \
                or (not ports and m.shard) or not all(0 < p < 65536 for p in ports):
            raise ProtocolError(f"bad shard list: shard {m.shard} of ports {list(ports)}")
        flags = (HELLO_AUTH_REQUIRED if m.auth_required else 0) | \
            (HELLO_LOCAL if m.local_sockets else 0)
        return (HELLO_BODY.pack(_exact(m.nonce, NONCE_LEN, "nonce"), flags, lim.max_items,
                                lim.max_block, lim.max_error, lim.max_body)
                + HELLO_SHARD.pack(m.shard, 0) + struct.pack(f"<{len(ports)}H", *ports)
                + _encode_local(m, max(len(ports), 1)), len(ports), [], ok)
    if isinstance(m, RegisterRequest):
        return SEGMENT.pack(m.segment, 0, m.size), 0, [], ok
    if isinstance(m, UnregisterRequest):
        return UNREGISTER_BODY.pack(m.segment, 0), 0, [], ok
    if isinstance(m, (RegisterResponse, UnregisterResponse, RegisterMrResponse)):
        return b"", 0, [], ok
    if isinstance(m, (RdmaConnectRequest, RdmaConnectResponse)):
        return _exact(m.endpoint, RDMA_ENDPOINT_LEN, "RDMA endpoint"), 0, [], ok
    if isinstance(m, RegisterMrRequest):
        return _exact(m.memory, RDMA_MEMORY_LEN, "memory region"), 0, [], ok
    if isinstance(m, (ShmRequest, ShmGetResponse)):
        n = _batch(len(m.items), limits)
        try:
            return b"".join(SHM_ITEM.pack(_id(it.block_id), *it[1:]) for it in m.items), n, \
                [], ok
        except struct.error as e:
            raise ProtocolError(f"shared-memory item out of range: {e}") from None
    if isinstance(m, ShmPutResponse):
        n = _batch(len(m.statuses), limits)
        sts = [_enum(Status, s, "item status") for s in m.statuses]
        return struct.pack(f"<{n}H", *sts), n, [], ok
    if isinstance(m, AuthRequest):
        return (_exact(m.client_nonce, NONCE_LEN, "client nonce")
                + _exact(m.proof, PROOF_LEN, "proof")), 0, [], ok
    if isinstance(m, AuthResponse):
        return _exact(m.proof, PROOF_LEN, "proof"), 0, [], ok
    if isinstance(m, _IdsRequest):
        if any(len(i) != ID_LEN for i in m.ids):  # ids are bytes already (__post_init__)
            raise ProtocolError(f"block ids must be {ID_LEN} bytes each")
        return b"".join(m.ids), _batch(len(m.ids), limits), [], ok
    if isinstance(m, PinRequest):
        if not 0 <= m.milliseconds < 1 << 32:
            raise ProtocolError(f"pin of {m.milliseconds} ms out of range")
        return PIN_BODY.pack(m.milliseconds, 0) + b"".join(map(_id, m.ids)), \
            _batch(len(m.ids), limits), [], ok
    if isinstance(m, PinResponse):
        return _pack_bits(m.found) + _pack_bits(m.pinned), _batch(len(m.found), limits), [], ok
    if isinstance(m, PutRequest):
        n = _batch(len(m.items), limits)
        views = [_payload(p, limits) for _, p in m.items]
        table = b"".join(ITEM.pack(_id(b), v.nbytes, 0, 0) for (b, _), v in zip(m.items, views))
        return table, n, views, ok
    if isinstance(m, GetResponse):
        n = _batch(len(m.items), limits)
        rows, views = [], []
        for it in m.items:
            st = _enum(Status, it.status, "item status")
            if (it.payload is None) == (st == ok):
                raise ProtocolError(f"GET item with status {st.name} must "
                                    f"{'' if st == ok else 'not '}carry a payload")
            v = _payload(it.payload, limits) if st == ok else memoryview(b"")
            rows.append(ITEM.pack(_id(it.block_id), v.nbytes, st, 0))
            views.append(v)
        return b"".join(rows), n, views, ok
    if isinstance(m, PutResponse):
        n = _batch(len(m.statuses), limits)
        sts = [_enum(Status, s, "item status") for s in m.statuses]
        return struct.pack(f"<{n}H", *sts), n, [], ok
    if isinstance(m, _BitsResponse):
        return _pack_bits(m.bits), _batch(len(m.bits), limits), [], ok
    if isinstance(m, LookupPrefixResponse):
        if not 0 <= m.count < 1 << 32:
            raise ProtocolError(f"prefix count {m.count} out of range")
        return U32.pack(m.count), 0, [], ok
    raise ProtocolError(f"not a WQS message: {type(m).__name__}")


def _encode_local(m: HelloResponse, shards: int) -> bytes:
    if not m.local_sockets:
        return b""
    paths = [p.encode("utf-8") for p in m.local_sockets]
    if len(paths) != shards or any(not 0 < len(p) <= MAX_PATH or b"\0" in p for p in paths):
        raise ProtocolError(f"bad local socket list {list(m.local_sockets)} for {shards} shards")
    return _exact(m.instance, INSTANCE_LEN, "instance") + b"".join(
        struct.pack("<H", len(p)) + p for p in paths)


def encode(msg: Message, limits: Limits = DEFAULT_LIMITS) -> list[memoryview]:
    """The frame as buffers for socket.sendmsg: header (+ item table) first, then each payload
    as a view of the caller's buffer, never copied or joined. Linux takes at most IOV_MAX
    (1024) buffers per sendmsg and may send part: loop with `advance`."""
    head, count, payloads, status = _encode_body(msg, limits)
    body_len = len(head) + sum(v.nbytes for v in payloads)
    if body_len > limits.max_body:
        raise ProtocolError(f"body of {body_len} bytes exceeds the limit of {limits.max_body}")
    flags = FLAG_RESPONSE if isinstance(msg, _RESPONSES) else 0
    header = FrameHeader(msg.opcode, flags, msg.request_id, status, count, body_len)
    return [memoryview(header.pack() + head), *(v for v in payloads if v.nbytes)]


def advance(bufs: Sequence[memoryview], sent: int) -> list[memoryview]:
    """What of `bufs` is left to send after a sendmsg that sent `sent` bytes."""
    i = 0
    while i < len(bufs) and sent >= bufs[i].nbytes:
        sent -= bufs[i].nbytes
        i += 1
    rest = list(bufs[i:])
    if rest and sent:
        rest[0] = rest[0][sent:]
    return rest


def encode_request(req: Request, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """A whole request frame as one bytes object (copies payloads: for tests and small frames)."""
    if not isinstance(req, _REQUESTS):
        raise ProtocolError(f"not a request: {type(req).__name__}")
    return b"".join(encode(req, limits))


def encode_response(resp: Response, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """A whole response frame as one bytes object."""
    if not isinstance(resp, _RESPONSES):
        raise ProtocolError(f"not a response: {type(resp).__name__}")
    return b"".join(encode(resp, limits))


# --- lean framing for the data path ------------------------------------------------------
#
# The same bytes as encode() produces for these messages (tests check that), built
# without a message object per frame: the daemon and the SDK frame thousands a second.

_RESPONSE_HEADER = {op: (MAGIC, VERSION, op, FLAG_RESPONSE) for op in Opcode}


def frame_get_request(request_id: int, ids: Sequence[bytes]) -> bytes:
    """A GET request (also EXISTS, DELETE, LOOKUP_PREFIX via frame_ids_request)."""
    return frame_ids_request(Opcode.GET, request_id, ids)


def frame_ids_request(opcode: Opcode, request_id: int, ids: Sequence[bytes]) -> bytes:
    body = b"".join(ids)
    assert len(body) == ID_LEN * len(ids), "block ids are 16 bytes"
    return HEADER.pack(MAGIC, VERSION, opcode, 0, request_id, 0, 0, len(ids), len(body)) + body


def frame_put_head(request_id: int, items: Sequence[tuple[bytes, int]]) -> bytes:
    """Header and item table of a PUT of (block id, payload length) items; the payloads
    follow on the wire in item order, sent from the caller's buffers."""
    table = b"".join([ITEM.pack(b, n, 0, 0) for b, n in items])
    total = sum(n for _, n in items)
    return HEADER.pack(MAGIC, VERSION, Opcode.PUT, 0, request_id, 0, 0, len(items),
                       len(table) + total) + table


def frame_get_head(request_id: int, rows: Sequence[tuple[bytes, int, int]]) -> bytes:
    """Header and item table of a GET response of (block id, length, status) rows; the
    payloads of the OK rows follow in row order."""
    table = b"".join([ITEM.pack(b, n, st, 0) for b, n, st in rows])
    total = sum(n for _, n, _ in rows)
    return HEADER.pack(*_RESPONSE_HEADER[Opcode.GET], request_id, 0, 0, len(rows),
                       len(table) + total) + table


_ONE_OK = struct.pack("<H", Status.OK)


def frame_put_response(request_id: int, statuses: Sequence[int],
                       opcode: Opcode = Opcode.PUT) -> bytes:
    """A PUT (or PUT_SHM) answer: a status per item."""
    n = len(statuses)
    head = HEADER.pack(*_RESPONSE_HEADER[opcode], request_id, 0, 0, n, 2 * n)
    if n == 1 and statuses[0] == Status.OK:  # the usual answer, without a format string
        return head + _ONE_OK
    return head + struct.pack(f"<{n}H", *statuses)


def frame_bits_response(opcode: Opcode, request_id: int, bits: Sequence[bool]) -> bytes:
    """An EXISTS or DELETE response."""
    body = _pack_bits(bits)
    return HEADER.pack(*_RESPONSE_HEADER[opcode], request_id, 0, 0, len(bits), len(body)) + body


def pin_milliseconds(seconds: float) -> int:
    """A pin's duration as the wire carries it (u32 ms): a positive one never rounds to
    0, which would release."""
    ms = min(max(int(seconds * 1000), 0), (1 << 32) - 1)
    return 1 if seconds > 0 and not ms else ms


def frame_pin_request(request_id: int, ids: Sequence[bytes], milliseconds: int) -> bytes:
    """A PIN request: pin these blocks for `milliseconds` (0: release their pins)."""
    body = PIN_BODY.pack(milliseconds, 0) + b"".join(ids)
    assert len(body) == PIN_BODY.size + ID_LEN * len(ids), "block ids are 16 bytes"
    return HEADER.pack(MAGIC, VERSION, Opcode.PIN, 0, request_id, 0, 0, len(ids),
                       len(body)) + body


def frame_pin_response(request_id: int, found: Sequence[bool], pinned: Sequence[bool]) -> bytes:
    assert len(found) == len(pinned)
    body = _pack_bits(found) + _pack_bits(pinned)
    return HEADER.pack(*_RESPONSE_HEADER[Opcode.PIN], request_id, 0, 0, len(found),
                       len(body)) + body


def frame_lookup_response(request_id: int, count: int) -> bytes:
    return HEADER.pack(*_RESPONSE_HEADER[Opcode.LOOKUP_PREFIX], request_id, 0, 0, 0,
                       U32.size) + U32.pack(count)


def frame_ping_response(request_id: int) -> bytes:
    return HEADER.pack(*_RESPONSE_HEADER[Opcode.PING], request_id, 0, 0, 0, 0)


def frame_shm_request(opcode: Opcode, request_id: int,
                      rows: Sequence[tuple[bytes, int, int, int, int]]) -> bytes:
    """A GET_SHM or PUT_SHM request of (block id, offset, length, segment, flags) rows."""
    table = b"".join([SHM_ITEM.pack(*r) for r in rows])
    return HEADER.pack(MAGIC, VERSION, opcode, 0, request_id, 0, 0, len(rows), len(table)) \
        + table


def frame_shm_get_response(request_id: int,
                           rows: Sequence[tuple[bytes, int, int, int, int]]) -> bytes:
    """A GET_SHM answer of (block id, payload offset, length, segment, status) rows."""
    table = b"".join([SHM_ITEM.pack(*r) for r in rows])
    return HEADER.pack(*_RESPONSE_HEADER[Opcode.GET_SHM], request_id, 0, 0, len(rows),
                       len(table)) + table


def frame_empty_response(opcode: Opcode, request_id: int) -> bytes:
    """The OK answer of a REGISTER or UNREGISTER."""
    return HEADER.pack(*_RESPONSE_HEADER[opcode], request_id, 0, 0, 0, 0)


def frames_for(idx: Sequence[int], limits: Limits,
               size: Callable[[int], int]) -> list[list[int]]:
    """idx cut into the batches of consecutive frames that fit `limits`: at most max_items
    items, and item table plus size(i) payload bytes per item within max_body."""
    frames: list[list[int]] = []
    cur: list[int] = []
    body = 0
    for i in idx:
        n = ITEM.size + size(i)
        if cur and (len(cur) >= limits.max_items or body + n > limits.max_body):
            frames.append(cur)
            cur, body = [], 0
        cur.append(i)
        body += n
    if cur:
        frames.append(cur)
    return frames


def advance_targets(targets: list[memoryview], ti: int, n: int) -> int:
    """n more payload bytes were received into targets[ti:] in order: the index of the
    first target not yet full (a partly filled one is replaced by its rest)."""
    while n:
        target = targets[ti]
        if n < len(target):
            targets[ti] = target[n:]
            return ti
        n -= len(target)
        ti += 1
    return ti


def unpack_ids(body: BytesLike) -> list[bytes]:
    """The block ids of an ids request's body (its length was checked with the header)."""
    raw = bytes(body)
    return [raw[i : i + ID_LEN] for i in range(0, len(raw), ID_LEN)]


# --- decoding ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ItemTable:
    """A payload frame's table; one PayloadStart follows per OK item, in table order."""

    header: FrameHeader
    items: tuple[ItemEntry, ...]


@dataclass(frozen=True)
class PayloadStart:
    """The next `length` bytes of the stream are the payload of item `index`."""

    index: int
    block_id: bytes
    length: int


@dataclass(frozen=True)
class PayloadChunk:
    """Payload bytes of item `index` from `offset`, for callers that let the decoder buffer."""

    index: int
    offset: int
    data: bytes


@dataclass(frozen=True)
class FrameEnd:
    """The last payload of a payload frame is complete."""

    header: FrameHeader


Event = Union[ItemTable, PayloadStart, PayloadChunk, FrameEnd, Message]
_HEADER, _BODY, _TABLE, _NEXT, _PAYLOAD = range(5)


class FrameDecoder:
    """Incremental decoder of one direction of a connection, frames back to back.

    feed() bytes, then call next_event() until it returns None (it needs more bytes; at
    least `needed`). A frame without payloads yields just its message. A payload frame
    yields ItemTable, then PayloadStart per OK item, each followed either by PayloadChunk
    events (bytes the decoder holds) or by the caller receiving the payload itself
    (read_payload_into, or readinto + mark_received), then FrameEnd. next_message() does
    all that for you, assembling payloads into bytes. After a ProtocolError the stream
    cannot be resynchronised: the decoder stays failed and the connection must close.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS, *, response: bool = False) -> None:
        self.limits = limits
        self.response = response  # True on a client: it decodes responses
        self.header: FrameHeader | None = None  # of the frame in progress, once parsed
        self._buf = bytearray()
        self._state = _HEADER
        self._items: tuple[ItemEntry, ...] = ()
        self._next = self._index = self._offset = self._remaining = 0
        self._failed: ProtocolError | None = None
        self._parts: list[list[bytes]] | None = None  # next_message's payloads in progress
        self._part_items: tuple[ItemEntry, ...] = ()

    def feed(self, data: BytesLike) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def needed(self) -> int:
        """Bytes still missing before next_event() can progress; 0: it has an event ready."""
        h, s = self.header, self._state
        want = (HEADER.size if s == _HEADER else h.body_len if s == _BODY else
                h.count * ITEM.size if s == _TABLE else self._remaining if s == _PAYLOAD else 0)
        return max(0, want - len(self._buf))

    @property
    def payload_remaining(self) -> int:
        """Bytes of the current payload not yet delivered (0 outside a payload)."""
        return self._remaining if self._state == _PAYLOAD else 0

    def next_event(self) -> Event | None:
        if self._failed is not None:
            raise ProtocolError(f"decoder failed earlier: {self._failed}")
        try:
            return self._step()
        except ProtocolError as e:
            self._failed = e
            raise

    def _take(self, n: int) -> bytes:
        data = bytes(memoryview(self._buf)[:n])  # one copy; the view dies before the del
        del self._buf[:n]  # cheap: bytearray drops a prefix by moving its start offset
        return data

    def _step(self) -> Event | None:
        while True:
            if self._state == _HEADER:
                if len(self._buf) < HEADER.size:
                    return None
                h = self.header = parse_header(self._buf, self.limits, response=self.response)
                del self._buf[:HEADER.size]
                self._state = _TABLE if carries_payloads(h) else _BODY
            elif self._state == _BODY:
                h = self.header
                if len(self._buf) < h.body_len:
                    return None
                msg = decode_body(h, self._take(h.body_len))
                self._state, self.header = _HEADER, None
                return msg
            elif self._state == _TABLE:
                h = self.header
                if len(self._buf) < h.count * ITEM.size:
                    return None
                self._items = parse_item_table(h, self._take(h.count * ITEM.size), self.limits)
                self._next, self._state = 0, _NEXT
                return ItemTable(h, self._items)
            elif self._state == _NEXT:
                items = self._items
                while self._next < len(items) and items[self._next].status != Status.OK:
                    self._next += 1
                if self._next == len(items):
                    end = FrameEnd(self.header)
                    self._state, self.header, self._items = _HEADER, None, ()
                    return end
                i = self._index = self._next
                self._next += 1
                self._offset, self._remaining, self._state = 0, items[i].length, _PAYLOAD
                return PayloadStart(i, items[i].block_id, items[i].length)
            else:  # _PAYLOAD
                if not self._remaining:
                    self._state = _NEXT
                    continue
                if not self._buf:
                    return None
                data = self._take(min(len(self._buf), self._remaining))
                ev = PayloadChunk(self._index, self._offset, data)
                self._offset += len(data)
                self._remaining -= len(data)
                return ev

    def readinto(self, dest: BytesLike) -> int:
        """Move buffered bytes of the current payload into dest; returns how many."""
        if self._state != _PAYLOAD:
            raise RuntimeError("readinto() outside a payload")
        view = memoryview(dest).cast("B")
        n = min(len(self._buf), self._remaining, len(view))
        view[:n] = memoryview(self._buf)[:n]
        del self._buf[:n]
        self._offset += n
        self._remaining -= n
        return n

    def mark_received(self, n: int) -> None:
        """The caller received n bytes of the current payload itself, e.g. by recv_into."""
        if self._state != _PAYLOAD or not 0 <= n <= self._remaining:
            raise RuntimeError(f"mark_received({n}) with {self.payload_remaining} bytes due")
        if n and self._buf:
            raise RuntimeError("drain buffered bytes with readinto() before receiving directly")
        self._offset += n
        self._remaining -= n

    def read_payload_into(self, dest: BytesLike, recv_into: Callable[[memoryview], int]) -> None:
        """Fill dest[:payload_remaining] with the current payload: buffered bytes are copied,
        the rest is received straight into dest by recv_into (e.g. sock.recv_into), which
        returns the bytes it wrote, 0 at end of stream."""
        view = memoryview(dest).cast("B")
        if len(view) < self._remaining:
            raise ValueError(f"buffer of {len(view)} bytes for a {self._remaining}-byte payload")
        got = self.readinto(view)
        while self._remaining:
            n = recv_into(view[got:got + self._remaining])
            if not n:
                raise ProtocolError(f"stream ended with {self._remaining} payload bytes due")
            self.mark_received(n)
            got += n

    def next_message(self) -> Message | None:
        """The next whole message, payloads assembled into bytes; None if more bytes are needed.
        Call it from a frame boundary on, not mixed with next_event() inside a frame."""
        while (ev := self.next_event()) is not None:
            if isinstance(ev, ItemTable):
                self._parts, self._part_items = [[] for _ in ev.items], ev.items
            elif isinstance(ev, PayloadChunk):
                self._parts[ev.index].append(ev.data)
            elif isinstance(ev, FrameEnd):
                h, items, parts = ev.header, self._part_items, self._parts
                self._parts = None
                if not h.is_response:
                    return PutRequest(h.request_id, tuple(
                        (it.block_id, b"".join(p)) for it, p in zip(items, parts)))
                return GetResponse(h.request_id, tuple(
                    GetItem(it.block_id, it.status, b"".join(p) if it.status == Status.OK else None)
                    for it, p in zip(items, parts)))
            elif isinstance(ev, PayloadStart):
                if self._parts is None:
                    raise RuntimeError("next_message() called inside a frame")
            else:
                return ev
        return None


def _decode_whole(data: BytesLike, limits: Limits, response: bool) -> Message:
    dec = FrameDecoder(limits, response=response)
    dec.feed(data)
    msg = dec.next_message()
    if msg is None:
        raise ProtocolError(f"truncated frame: at least {max(dec.needed, 1)} more bytes expected")
    if dec.buffered:
        raise ProtocolError(f"{dec.buffered} bytes after the end of the frame")
    return msg


def decode_request(data: BytesLike, limits: Limits = DEFAULT_LIMITS) -> Request:
    """Decode exactly one whole request frame."""
    return _decode_whole(data, limits, False)


def decode_response(data: BytesLike, limits: Limits = DEFAULT_LIMITS) -> Response:
    """Decode exactly one whole response frame."""
    return _decode_whole(data, limits, True)
