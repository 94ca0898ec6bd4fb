"""What the SDK needs from a connection to one storage node: the `Transport` interface.

The TCP data path (wqs/rpc/pipeline.py) speaks the frames of wqs.rpc.protocol
(proto/DATAPLANE.md). Other transports implement the same methods, so the SDK (routing,
replication, retries) never knows which one it holds.

The same-host transport is built on this design without RDMA: the client's memory is a
memfd handed to the daemon over its Unix socket, and GET_SHM / PUT_SHM items name
(segment, offset, length) where the RDMA items below name (address, rkey, length); the
daemon's device reads and writes land in that memory as an RDMA NIC's would.

How the RDMA transport implements it (wqs/rdma/, wqs/server/rdma.py)
---------------------------------------------------------------------
Bulk bytes move by one-sided RDMA; only small control frames cross the wire (a TCP or an
RDMA SEND channel carrying the same header, opcodes and statuses).

* The client registers its memory once (ibv_reg_mr over its buffer pool, or over the
  caller's `outs` buffers: a pinned KV-cache region registered up front is the intended
  case) and gets an rkey for it.
* The item table carries, for each item, (remote address, rkey, length) in place of an
  inline payload: a PUT or GET frame is then only header + table, whatever the block size.
* PUT: the server RDMA-READs each payload from the client's buffer straight into its own
  registered staging (or device-mapped) memory, then answers the per-item statuses as
  usual. The client must not touch those buffers until the answer arrives.
* GET: the server RDMA-WRITEs each hit straight into the client's `outs[i]` (it knows the
  address and rkey from the table), then answers the per-item status and length; the
  response frame carries no payload bytes. A miss is written nowhere.
* EXISTS, DELETE, LOOKUP_PREFIX, PING are control frames only, unchanged.
* Limits still bound every (addr, length) pair the server accepts, and rkeys are scoped to
  one connection's protection domain: a peer that has not passed AUTH gets no rkey use.

Conventions for every implementation
------------------------------------
* Batches may be longer than the node's limits (`Limits` in its HELLO): the transport
  splits them and keeps the results in request order.
* A whole request that fails raises wqs.errors.RemoteError (the status and the server's
  message in it); an unreachable node or a dropped connection raises NodeUnavailable;
  a malformed frame raises ProtocolError and the connection is closed.
* Methods are safe to call from several threads; requests may be in flight together on
  one connection, matched by request id.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from wqs.rpc.protocol import BytesLike, Status


@runtime_checkable
class Transport(Protocol):
    """A connection to one storage node, already past HELLO and AUTH."""

    def put_many(self, items: Sequence[tuple[bytes, BytesLike]]) -> list[Status]:
        """Store (block_id, payload) pairs; one status per item (OK, TOO_LARGE, NO_SPACE, ...).
        Payloads are sent from the caller's buffers without copying."""
        ...

    def get_many(self, ids: Sequence[bytes],
                 outs: Sequence[BytesLike] | None = None) -> list[bytes | memoryview | None]:
        """Fetch blocks; None for a miss. With outs, payload i is received straight into the
        writable buffer outs[i] and returned as memoryview(outs[i])[:length]; a hit larger
        than outs[i] raises wqs.errors.BlockTooLarge (after the connection is resynchronised)."""
        ...

    def exists_many(self, ids: Sequence[bytes]) -> list[bool]:
        """Whether each id is stored."""
        ...

    def delete_many(self, ids: Sequence[bytes]) -> list[bool]:
        """Delete blocks; True where the id was stored."""
        ...

    def lookup_prefix(self, ids: Sequence[bytes]) -> int:
        """How many leading ids are all stored (ids are one prompt's chained block ids)."""
        ...

    def ping(self) -> float:
        """Round-trip time in seconds of one PING."""
        ...

    def close(self) -> None:
        """Close the connection; requests still in flight fail with NodeUnavailable."""
        ...
