"""The Python SDK: `wqs.Client`, a store of KV blocks spread over storage nodes.

Placement is client-side: a consistent-hash ring over the nodes maps each block ID to
its node (and `replicas - 1` more), and within a node to the shard that owns it (the
node's HELLO lists its shards). A batch call sends every node's and shard's share at
once, back to back, and reads the answers in the calling thread (wqs/rpc/pipeline.py);
no metadata server and no IO thread sits on the data path.

A batch never fails as a whole for one block's trouble: that block's result is None
(get) or False (put), and `results.errors[i]` says why: BlockTooLarge (larger than the
node accepts, or than its out buffer), NodeUnavailable (its node is down), RemoteError.
A node that cannot be reached makes its blocks misses and its puts False within
`timeout_s`; the client tries it again at most once per `retry_interval_s`.

Same host: memory from `shared_memory(size)` is shared with the daemons on this host
(`transport: auto` or `shm`), and blocks there are read and written by the daemon
itself; only (segment, offset, length) crosses the socket (wqs/rpc/shm.py).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Sequence

from wqs.config import ClientConfig, load_client_config, with_token_file
from wqs.errors import BlockTooLarge, NodeUnavailable, RemoteError, WQSError
from wqs.ids import BlockIdLike, to_block_id
from wqs.ring import HashRing, shard_of, weight_unit_for
from wqs.rpc import protocol as p
from wqs.rpc.pipeline import Call, NodeDown, Pipeline, _GetAnswer, _Request
from wqs.rpc.shm import Bounce, SharedMemory, SharedMemoryMap

log = logging.getLogger("wqs.client")

__all__ = ["BatchResult", "Client", "NodeDown", "Pending", "SharedMemory"]


def _buffer(data: Any) -> memoryview:
    """Bytes-like view of a block: bytes, bytearray, memoryview, numpy array, torch tensor."""
    if hasattr(data, "detach") and hasattr(data, "numpy"):  # a torch tensor, on the CPU
        if getattr(data, "device", None) is not None and str(data.device) != "cpu":
            raise TypeError(f"tensor on {data.device}: copy it to the CPU first")
        # As raw bytes: numpy has no bfloat16 or float8, the dtypes KV caches use.
        import torch

        data = data.detach().contiguous().view(-1).view(torch.uint8).numpy()
    view = memoryview(data)
    if not view.c_contiguous:
        raise TypeError("block buffers must be C-contiguous")
    return view.cast("B") if view.ndim != 1 or view.format != "B" else view


def _writable(out: Any) -> memoryview:
    view = _buffer(out)
    if view.readonly:
        raise TypeError("out buffer is read-only")
    return view


class BatchResult(list):
    """A batch's results in the order asked, plus `errors`: index -> why that block has
    no value (only for blocks that failed, not for plain misses)."""

    def __init__(self, values: Iterable[Any], errors: dict[int, WQSError]) -> None:
        super().__init__(values)
        self.errors = errors


class Pending:
    """A batch call in flight (Client.start_get_many / start_put_many): wait() for it
    with Client.wait or Client.wait_any, then result()."""

    def __init__(self, call: Call, finish: Callable[[], BatchResult]) -> None:
        self.call = call
        self._finish = finish
        self._result: BatchResult | None = None

    @property
    def done(self) -> bool:
        return self.call.done

    def result(self) -> BatchResult:
        if self._result is None:
            assert self.call.done, "wait for the call first"
            self._result = self._finish()
        return self._result


class Client:
    """A WQS cluster, seen from Python. Thread-safe; use one per process."""

    def __init__(self, servers: Sequence[str] | None = None, *, config: ClientConfig | None = None,
                 **options: Any) -> None:
        if config is None:
            config = ClientConfig(servers=list(servers or []), **options)
        elif servers or options:
            raise TypeError("pass either a config or servers and options, not both")
        config = with_token_file(config)
        self.config = config
        self._pipe = Pipeline(config)
        self._shm = SharedMemoryMap()
        self._bounce = Bounce(self._shm.create, config.bounce_bytes)
        # Slots a PUT_SHM is writing from right now: the daemon puts the entry header in
        # the room in front of the payload, so one slot can serve one such put at a time.
        self._slots_lock = threading.Lock()
        self._slots_busy: set[tuple[int, int]] = set()
        self._bounce_hint = 1 << 20  # room a get without out buffers gets on an RDMA link
        self._members_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None  # only for the *_async calls
        self._watcher = None
        if config.etcd is not None:
            self._watch_etcd(config)
        else:
            weights = config.weights or {}
            self._set_members({a: weights.get(a, 1.0) for a in config.servers})

    def _set_members(self, weights: dict[str, float]) -> None:
        """Swap in a ring over these nodes; callers already running keep the old one."""
        with self._members_lock:
            self.ring = HashRing(weights, weight_unit=weight_unit_for(weights.values()))
            for address in [a for a in self._pipe.nodes if a not in weights]:
                self._pipe.forget_node(address)  # left the cluster: drop its connections
        log.info("ring: %d nodes", len(weights))

    def _watch_etcd(self, config: ClientConfig) -> None:
        from wqs.membership import EtcdClient, MembershipWatcher

        def on_change(nodes: dict) -> None:
            # Weight = capacity: every client derives the same ring from etcd.
            self._set_members({a: max(r.capacity_bytes, 1) for a, r in nodes.items()})

        self._watcher = MembershipWatcher(EtcdClient(config.etcd), on_change)
        self._watcher.start()
        if not self._watcher.nodes:
            self._set_members({})

    @classmethod
    def from_config(cls, path: str) -> "Client":
        return cls(config=load_client_config(path))

    def shared_memory(self, size: int) -> SharedMemory:
        """`size` bytes shared with the daemons on this host: blocks placed here (any
        slice of `.buffer`, numpy or torch arrays over it) as get_many out buffers or
        put_many payloads are moved by the daemon itself, with no copy through a socket.
        `.block_views(block_size)` lays blocks out so SSD reads land in them directly.
        Anywhere else (TCP nodes) it is ordinary memory. Close it, or the client."""
        return self._shm.create(size)

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
        self._pipe.close()
        self._shm.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def nodes(self) -> tuple[str, ...]:
        return self.ring.nodes

    @property
    def failed_requests(self) -> int:
        """Requests that met a down or failing node since the client started."""
        return self._pipe.failed_requests

    def node_errors(self) -> dict[str, str | None]:
        """Per node, the last error that made it unavailable (None: it is healthy)."""
        return {a: (n.last_error if (n := self._pipe.nodes.get(a)) else None)
                for a in self.ring.nodes}

    def transport(self, address: str) -> str:
        """How blocks travel to the node at `address`: "shm" (a daemon on this host,
        through shared memory) or "tcp" (connecting to it if need be)."""
        node = self._pipe.node(address)
        node.layout(self._pipe)
        return "shm" if node.local_paths else "tcp"

    def shards(self, address: str) -> int:
        """How many shards the node at `address` has (connecting to it if need be)."""
        return self._pipe.node(address).layout(self._pipe)

    # ---- single-block calls ----------------------------------------------------------

    def put(self, block_id: BlockIdLike, data: Any, *, replicas: int | None = None) -> bool:
        """Store a block. False if its node(s) could not take it; BlockTooLarge if it is
        larger than they accept."""
        results = self.put_many([(block_id, data)], replicas=replicas)
        error = results.errors.get(0)
        if isinstance(error, BlockTooLarge):
            raise error
        return results[0]

    def get(self, block_id: BlockIdLike, out: Any = None) -> bytes | bool | None:
        """The block's bytes, or None on a miss. With `out`, fill it and return True/False
        (BlockTooLarge if the block does not fit in it)."""
        if out is None:
            return self.get_many([block_id])[0]
        results = self.get_many([block_id], outs=[out])
        error = results.errors.get(0)
        if isinstance(error, BlockTooLarge):
            raise error
        return results[0] is not None

    def exists(self, block_id: BlockIdLike) -> bool:
        return self.exists_many([block_id])[0]

    def delete(self, block_id: BlockIdLike) -> bool:
        return self.delete_many([block_id])[0]

    # ---- batches ---------------------------------------------------------------------

    def put_many(self, items: Iterable[tuple[BlockIdLike, Any]], *,
                 replicas: int | None = None) -> BatchResult:
        """Store blocks; per block True once every replica acknowledged it."""
        pending = self.start_put_many(items, replicas=replicas)
        self.wait(pending)
        return pending.result()

    def start_put_many(self, items: Iterable[tuple[BlockIdLike, Any]], *,
                       replicas: int | None = None) -> Pending:
        """put_many, sent but not waited for: wait(pending), then pending.result()."""
        ids, bufs = [], []
        for block_id, data in items:
            ids.append(block_id if type(block_id) is bytes and len(block_id) == 16
                       else to_block_id(block_id))
            bufs.append(_buffer(data))
        ok = [bool(self.ring)] * len(ids)
        errors: dict[int, WQSError] = {}
        call = self._pipe.start()
        ring = self.ring
        if len(ring):
            copies = replicas or self.config.replicas
            if copies == 1:
                plan = ring.plan(ids, range(len(ids)), 1)
            else:
                plan = {}
                for i, b in enumerate(ids):
                    for node in ring.nodes_for(b, copies):
                        plan.setdefault(node, []).append(i)
            for node, idx in self._connected_first(plan):
                self._send_puts(call, node, idx, ids, bufs, ok, errors)
        self._pipe.release(call)
        return Pending(call, lambda: BatchResult(ok, errors))

    def get_many(self, block_ids: Iterable[BlockIdLike],
                 outs: Sequence[Any] | None = None) -> BatchResult:
        """Blocks in the order asked; None for a miss. With `outs`, each hit is received
        straight into outs[i] and returned as a memoryview of it."""
        pending = self.start_get_many(block_ids, outs)
        self.wait(pending)
        return pending.result()

    def start_get_many(self, block_ids: Iterable[BlockIdLike],
                       outs: Sequence[Any] | None = None) -> Pending:
        """get_many, sent but not waited for: wait(pending), then pending.result() (which
        asks the other replicas of the missed blocks, if there are replicas)."""
        ids = [b if type(b) is bytes and len(b) == 16 else to_block_id(b) for b in block_ids]
        views = [_writable(o) for o in outs] if outs is not None else None
        if views is not None and len(views) != len(ids):
            raise ValueError(f"{len(ids)} ids but {len(views)} out buffers")
        results: list[Any] = [None] * len(ids)
        errors: dict[int, WQSError] = {}
        ring = self.ring
        call = self._send_get_round(ids, views, list(range(len(ids))) if len(ring) else [],
                                    0, results, errors, ring)

        def finish() -> BatchResult:
            for attempt in range(1, self.config.replicas):
                todo = [i for i in range(len(ids))
                        if results[i] is None and not isinstance(errors.get(i), BlockTooLarge)]
                if not todo:
                    break
                for i in todo:
                    errors.pop(i, None)
                self._pipe.wait(self._send_get_round(ids, views, todo, attempt, results,
                                                     errors, ring))
            return BatchResult(results, errors)

        return Pending(call, finish)

    def _send_get_round(self, ids: list[bytes], views: list[memoryview] | None,
                        todo: list[int], attempt: int, results: list[Any],
                        errors: dict[int, WQSError], ring: HashRing) -> Call:
        call = self._pipe.start()
        if todo:
            plan = ring.plan(ids, todo, self.config.replicas, attempt)
            for node, idx in self._connected_first(plan):
                self._send_gets(call, node, idx, ids, views, results, errors)
        self._pipe.release(call)
        return call

    def wait(self, pending: Pending) -> None:
        """Until the call is complete (or has timed out: its blocks then failed)."""
        self._pipe.wait(pending.call)

    def wait_any(self, pendings: Sequence[Pending], timeout_s: float | None = None) -> None:
        """Until at least one of the calls is complete (or timeout_s passes): what an
        engine keeping N calls in flight from one thread waits with (fio's iodepth)."""
        import time

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._pipe.wait_any([x.call for x in pendings], deadline)

    def exists_many(self, block_ids: Iterable[BlockIdLike], *,
                    pin_s: float | None = None) -> list[bool]:
        """Whether each block is stored; a block its owner lacks is asked of its replicas.
        With pin_s, each block found is also pinned for pin_s seconds (see pin_many)."""
        if pin_s is not None:
            return self._pin([to_block_id(b) for b in block_ids], pin_s)[0]
        ids = [to_block_id(b) for b in block_ids]
        found = [False] * len(ids)
        self._ask_replicas(ids, found, lambda call, node, idx: self._send_ids(
            call, node, idx, ids, p.Opcode.EXISTS, found))
        return found

    def _ask_replicas(self, ids: list[bytes], found: list[bool],
                      send: Callable[[Call, str, list[int]], None]) -> None:
        """Ask each block's owner, then its next replica for what was not found, and so
        on: send(call, node, indexes) sends the requests of one round to one node."""
        ring = self.ring
        todo = list(range(len(ids))) if len(ring) else []
        for attempt in range(self.config.replicas):
            call = self._pipe.start()
            plan: dict[str, list[int]] = {}
            for i in todo:
                owners = ring.nodes_for(ids[i], self.config.replicas)
                plan.setdefault(owners[attempt % len(owners)], []).append(i)
            for node, idx in plan.items():
                send(call, node, idx)
            self._pipe.release(call)
            self._pipe.wait(call)
            todo = [i for i in todo if not found[i]]
            if not todo:
                break

    def pin_many(self, block_ids: Iterable[BlockIdLike], seconds: float) -> list[bool]:
        """Pin stored blocks for `seconds`, so that a load soon after a lookup finds them:
        True where the block is pinned now. A node cuts a pin to its engine.max_pin_s,
        never lets re-pinning stretch one lease past that, and refuses pins past its
        cap on pinned bytes (the block stays stored, not pinned). Pins end by
        themselves; unpin_many ends them sooner. A plain exists or lookup pins nothing."""
        return self._pin([to_block_id(b) for b in block_ids], seconds)[1]

    def unpin_many(self, block_ids: Iterable[BlockIdLike]) -> None:
        """Release pins (the blocks stay stored)."""
        self._pin([to_block_id(b) for b in block_ids], 0.0)

    def _pin(self, ids: list[bytes], seconds: float) -> tuple[list[bool], list[bool]]:
        """PIN to the replicas in turn, as exists_many asks: (found, pinned) per block."""
        milliseconds = p.pin_milliseconds(seconds)
        found, pinned = [False] * len(ids), [False] * len(ids)
        self._ask_replicas(ids, found, lambda call, node, idx: self._send_pins(
            call, node, idx, ids, milliseconds, found, pinned))
        return found, pinned

    def _send_pins(self, call: Call, address: str, idx: list[int], ids: list[bytes],
                   milliseconds: int, found: list[bool], pinned: list[bool]) -> None:
        def fail(which: list[int], error: WQSError) -> None:
            log.debug("PIN to %s failed: %s", address, error)

        for conn, sidx in self._shard_groups(address, idx, ids, fail):
            for chunk in p.frames_for(sidx, conn.limits, lambda i: p.ID_LEN - p.ITEM.size):
                def answer(req: _Request, msg: Any, chunk: list[int] = chunk) -> None:
                    if not isinstance(msg, p.PinResponse):
                        self._request_error(req, msg)
                        return
                    for i, f, q in zip(chunk, msg.found, msg.pinned):
                        found[i] = found[i] or f
                        pinned[i] = pinned[i] or q
                    self._pipe.mark_up(req.conn.node)

                frame = p.frame_pin_request(0, [ids[i] for i in chunk], milliseconds)
                self._pipe.send(_Request(call, conn, p.Opcode.PIN, answer), [frame])

    def delete_many(self, block_ids: Iterable[BlockIdLike]) -> list[bool]:
        """Delete blocks from every replica; True where any replica held the block."""
        ids = [to_block_id(b) for b in block_ids]
        ring = self.ring
        plan: dict[str, list[int]] = {}
        for i, b in enumerate(ids if len(ring) else []):
            for node in ring.nodes_for(b, self.config.replicas):
                plan.setdefault(node, []).append(i)
        deleted = [False] * len(ids)
        call = self._pipe.start()
        for node, idx in plan.items():
            self._send_ids(call, node, idx, ids, p.Opcode.DELETE, deleted)
        self._pipe.release(call)
        self._pipe.wait(call)
        return deleted

    def lookup_prefix(self, block_ids: Iterable[BlockIdLike]) -> int:
        """How many leading blocks of a chain (e.g. from prefix_block_ids) are stored.

        One parallel round trip: every node (and shard) answers for its share at once.
        """
        ids = [to_block_id(b) for b in block_ids]
        ring = self.ring
        if not ids or not len(ring):
            return 0
        plan = ring.group(ids)
        if len(plan) == 1 and self.config.replicas == 1:
            node = next(iter(plan))
            try:
                one_shard = self._pipe.node(node).layout(self._pipe) == 1
            except (NodeUnavailable, WQSError):
                one_shard = False
            if one_shard:  # one shard holds the whole chain: it counts, a frame at a time
                counts: dict[int, tuple[int, int]] = {}  # first index -> (count, ids)
                call = self._pipe.start()
                self._send_ids(call, node, list(range(len(ids))), ids,
                               p.Opcode.LOOKUP_PREFIX, counts)
                self._pipe.release(call)
                self._pipe.wait(call)
                total = 0
                for first in sorted(counts):
                    if first != total:
                        break  # a frame before this one failed, or was not all present
                    count, n = counts[first]
                    total += count
                    if count < n:
                        break
                return total
        found = self.exists_many(ids)
        return next((i for i, hit in enumerate(found) if not hit), len(ids))

    def ping(self) -> dict[str, float | None]:
        """Round-trip time per node (to its first shard) in seconds; None where down."""
        import time

        out: dict[str, float | None] = {}
        for node in self.nodes:
            started = time.perf_counter()
            answered: list[Any] = []
            call = self._pipe.start()
            try:
                conn = self._pipe.connection(self._pipe.node(node), 0)
                req = _Request(call, conn, p.Opcode.PING, lambda r, m: answered.append(m))
                self._pipe.send(req, [p.encode_request(p.PingRequest(0))])
            except (NodeUnavailable, WQSError) as e:
                answered.append(e)
            self._pipe.release(call)
            self._pipe.wait(call)
            ok = answered and isinstance(answered[0], p.PingResponse)
            out[node] = time.perf_counter() - started if ok else None
        return out

    # ---- futures and asyncio ---------------------------------------------------------

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(8, thread_name_prefix="wqs-async")
        return self._executor

    def get_many_async(self, block_ids: Sequence[BlockIdLike],
                       outs: Sequence[Any] | None = None) -> Future:
        """get_many in the background: a Future, so a caller can overlap loads with
        compute without driving the IO itself (a pool thread drives it)."""
        return self._pool().submit(self.get_many, list(block_ids), outs)

    def put_many_async(self, items: Sequence[tuple[BlockIdLike, Any]]) -> Future:
        return self._pool().submit(self.put_many, list(items))

    def lookup_prefix_async(self, block_ids: Sequence[BlockIdLike]) -> Future:
        return self._pool().submit(self.lookup_prefix, list(block_ids))

    # ---- sending a node's share -------------------------------------------------------

    def _connected_first(self, plan: dict[str, list[int]]) -> list[tuple[str, list[int]]]:
        """The plan's nodes, those already connected first: a node that must be connected
        to (which may take up to connect_timeout_s) must not delay the others' requests."""
        if len(plan) == 1:
            return list(plan.items())
        nodes = self._pipe.nodes
        return sorted(plan.items(), key=lambda kv: kv[0] not in nodes or
                      nodes[kv[0]].ports is None)

    def _shard_groups(self, address: str, idx: list[int], ids: list[bytes],
                      fail: Callable[[list[int], WQSError], None]) -> list[tuple[Any, list[int]]]:
        """idx split by the node's shard that owns each block, with a connection to
        each; the blocks of a node or shard that cannot be reached go to fail()."""
        pipe = self._pipe
        try:
            node = pipe.node(address)
            n = node.layout(pipe)
            if n == 1:
                return [(pipe.connection(node, 0), idx)]
        except NodeUnavailable as e:
            pipe.failed_requests += 1
            fail(idx, e)
            return []
        groups: dict[int, list[int]] = {}
        for i in idx:
            groups.setdefault(shard_of(ids[i], n), []).append(i)
        out = []
        for shard, sidx in groups.items():
            try:
                out.append((pipe.connection(node, shard), sidx))
            except NodeUnavailable as e:
                pipe.failed_requests += 1
                fail(sidx, e)
        return out

    def _send_puts(self, call: Call, address: str, idx: list[int], ids: list[bytes],
                   bufs: list[memoryview], ok: list[bool], errors: dict[int, WQSError],
                   tries: int = 0) -> None:
        def fail(which: list[int], error: WQSError) -> None:
            for i in which:
                ok[i] = False
                errors.setdefault(i, error)

        for conn, sidx in self._shard_groups(address, idx, ids, fail):
            max_block = conn.limits.max_block
            too_large = [i for i in sidx if bufs[i].nbytes > max_block]
            for i in too_large:
                fail([i], BlockTooLarge(f"block {ids[i].hex()} of {bufs[i].nbytes} B exceeds "
                                        f"the {max_block} B {address} accepts"))
            sidx = [i for i in sidx if bufs[i].nbytes <= max_block]
            if conn.one_sided:
                sidx = self._send_shm(call, conn, p.Opcode.PUT_SHM, sidx, ids, bufs,
                                      self._put_answer, (ids, bufs, ok, errors, fail, tries))
            for chunk in p.frames_for(sidx, conn.limits, lambda i: bufs[i].nbytes):
                head = p.frame_put_head(0, [(ids[i], bufs[i].nbytes) for i in chunk])
                frame = [head, *(bufs[i] for i in chunk if bufs[i].nbytes)]
                req = _Request(call, conn, p.Opcode.PUT, self._put_answer)
                req.ctx = (chunk, ids, bufs, ok, errors, fail, tries)
                self._pipe.send(req, frame)

    def _put_answer(self, req: _Request, msg: Any) -> None:
        chunk, ids, bufs, ok, errors, fail, tries = req.ctx
        if req.bounce:
            self._bounce_release(req)
        if req.slots:
            self._give_slots(req)
        if not isinstance(msg, (p.PutResponse, p.ShmPutResponse)):
            error = self._request_error(req, msg)
            if self._resend(msg, tries):
                self._send_puts(req.call, req.conn.node.address, chunk, ids, bufs, ok, errors,
                                tries + 1)
            else:
                fail(chunk, error)
            return
        self._pipe.mark_up(req.conn.node)
        for i, status in zip(chunk, msg.statuses):
            if status == p.Status.OK:
                continue
            if status == p.Status.TOO_LARGE:
                fail([i], BlockTooLarge(f"block {ids[i].hex()} is larger than "
                                        f"{req.conn.address} accepts"))
            else:
                fail([i], RemoteError(f"{req.conn.address}: {status.name}"))

    def _send_gets(self, call: Call, address: str, idx: list[int], ids: list[bytes],
                   views: list[memoryview] | None, results: list[Any],
                   errors: dict[int, WQSError], tries: int = 0) -> None:
        def fail(which: list[int], error: WQSError) -> None:
            for i in which:
                results[i] = None
                errors.setdefault(i, error)

        for conn, sidx in self._shard_groups(address, idx, ids, fail):
            max_items = conn.limits.max_items
            for k in range(0, len(sidx), max_items):
                self._send_get_chunk(call, conn, sidx[k : k + max_items], ids, views, results,
                                     errors, tries)

    def _send_get_chunk(self, call: Call, conn: Any, chunk: list[int], ids: list[bytes],
                        views: list[memoryview] | None, results: list[Any],
                        errors: dict[int, WQSError], tries: int) -> None:
        if conn.one_sided and (views is not None or conn.link is not None):
            chunk = self._send_shm(call, conn, p.Opcode.GET_SHM, chunk, ids, views,
                                   self._get_shm_answer, (ids, views, results, errors, tries))
            if not chunk:
                return
        chunk_ids = [ids[i] for i in chunk]
        outs = [views[i] for i in chunk] if views is not None else None
        req = _Request(call, conn, p.Opcode.GET, self._get_answer, chunk_ids, outs)
        req.ctx = (chunk, ids, views, results, errors, tries)
        self._pipe.send(req, [p.frame_get_request(0, chunk_ids)])

    def _get_answer(self, req: _Request, msg: Any) -> None:
        chunk, ids, views, results, errors, tries = req.ctx
        if not isinstance(msg, _GetAnswer):  # the request failed as a whole
            error = self._request_error(req, msg)
            if self._resend(msg, tries):
                self._send_gets(req.call, req.conn.node.address, chunk, ids, views, results,
                                errors, tries + 1)
                return
            for i in chunk:
                results[i] = None
                errors.setdefault(i, error)
            return
        node = req.conn.node
        if node.last_error is not None:
            self._pipe.mark_up(node)
        outs, values = req.outs, msg.values
        again = None
        OK = p.Status.OK
        for k, row in enumerate(msg.rows):
            i = chunk[k]
            status = row.status
            if status is OK:
                if msg.too_small and k in msg.too_small:
                    results[i] = None
                    errors.setdefault(i, BlockTooLarge(
                        f"block {ids[i].hex()} is {msg.too_small[k]} B, its out buffer "
                        f"holds {outs[k].nbytes} B"))
                elif outs is not None:
                    results[i] = values[k]
                else:
                    results[i] = bytes(values[k])
            elif status == p.Status.BUSY:
                if again is None:
                    again = []
                again.append(i)  # did not fit the answer: ask again
            elif status != p.Status.NOT_FOUND:
                results[i] = None
                errors.setdefault(i, RemoteError(f"{req.conn.address}: {status.name}"))
        if again:
            self._send_get_chunk(req.call, req.conn, again, ids, views, results, errors, tries)

    def _send_shm(self, call: Call, conn: Any, opcode: p.Opcode, idx: list[int],
                  ids: list[bytes], bufs: list[memoryview] | None, on_answer: Callable,
                  ctx: tuple) -> list[int]:
        """GET_SHM / PUT_SHM requests for the blocks of idx: those whose buffer lies in
        shared memory in place, the others through bounce memory (handed to conn first if
        need be). What the bounce memory cannot take is returned, to go inline; an RDMA
        link carries no payloads inline: there it fails."""
        find = self._shm.find
        rest: list[int] = []
        rows: list[tuple[int, tuple]] = []
        bounce: dict[int, tuple[int, int]] = {}
        taken: dict[int, tuple[int, int]] = {}  # item -> slot it is written from in place
        for i in idx:
            found = find(bufs[i]) if bufs is not None else None
            if found is None:
                found = self._bounce_take(opcode, bufs[i] if bufs is not None else None,
                                          conn.limits.max_block)
                if found is None:
                    rest.append(i)  # bounce memory full (or off)
                    continue
                bounce[i] = (found[1], found[2])
                found = found[:2]
            mem, offset = found
            n = bounce[i][1] if i in bounce else bufs[i].nbytes
            self._pipe.share(call, conn, mem)
            slot = i in bounce or (mem.slotted and mem.in_slot(offset, n))
            if slot and opcode == p.Opcode.PUT_SHM and i not in bounce:
                slot = self._take_slot((mem.segment_id, offset))
                if slot:
                    taken[i] = (mem.segment_id, offset)
            rows.append((i, (ids[i], offset, n, mem.segment_id, p.SHM_SLOT if slot else 0)))
        step = conn.limits.max_items
        for k in range(0, len(rows), step):
            part = rows[k : k + step]
            req = _Request(call, conn, opcode, on_answer, [r[1][0] for r in part])
            req.ctx = ([i for i, _ in part], *ctx)
            if bounce:
                req.bounce = {i: bounce[i] for i, _ in part if i in bounce}
            if taken:
                req.slots = [taken[i] for i, _ in part if i in taken]
            self._pipe.send(req, [p.frame_shm_request(opcode, 0, [r for _, r in part])])
        if conn.link is not None and rest:  # nothing goes inline on an RDMA link
            error = RemoteError(f"{conn.address}: RDMA bounce memory is full (bounce_bytes "
                                f"{self._bounce.size}): put the blocks in "
                                "Client.shared_memory buffers")
            req = _Request(call, conn, opcode, on_answer, [ids[i] for i in rest])
            req.ctx = (rest, *ctx)
            on_answer(req, error)
            return []
        return rest

    def _take_slot(self, key: tuple[int, int]) -> bool:
        """Whether a put may be written from this slot in place (SHM_SLOT); if another put
        is already, the daemon copies this one's payload instead."""
        with self._slots_lock:
            if key in self._slots_busy:
                return False
            self._slots_busy.add(key)
            return True

    def _give_slots(self, req: _Request) -> None:
        with self._slots_lock:
            self._slots_busy.difference_update(req.slots)
        req.slots = None

    def _bounce_take(self, opcode: p.Opcode, buf: memoryview | None, max_block: int
                     ) -> tuple[SharedMemory, int, int] | None:
        """(bounce memory, offset, size) for one block whose buffer is not in shared
        memory: a put's bytes are copied in now, a get's out when it is answered."""
        if opcode == p.Opcode.PUT_SHM:
            n = buf.nbytes
        else:
            n = buf.nbytes if buf is not None else min(self._bounce_hint, max_block)
        got = self._bounce.take(n)
        if got is None:
            return None
        mem, off = got
        if opcode == p.Opcode.PUT_SHM:
            mem.buffer[off : off + n] = buf
        return mem, off, n

    def _bounce_release(self, req: _Request) -> None:
        give = self._bounce.give
        for off, n in req.bounce.values():
            give(off, n)
        req.bounce = None

    def _get_shm_answer(self, req: _Request, msg: Any) -> None:
        chunk, ids, views, results, errors, tries = req.ctx
        bounce = req.bounce
        if bounce and not isinstance(msg, p.ShmGetResponse):
            self._bounce_release(req)
        if not isinstance(msg, p.ShmGetResponse):  # the request failed as a whole
            error = self._request_error(req, msg)
            if self._resend(msg, tries):
                self._send_gets(req.call, req.conn.node.address, chunk, ids, views, results,
                                errors, tries + 1)
                return
            for i in chunk:
                results[i] = None
                errors.setdefault(i, error)
            return
        if len(msg.items) != len(chunk) or any(
                it.block_id != ids[i] for it, i in zip(msg.items, chunk)):
            error = RemoteError(f"{req.conn.address}: GET_SHM answer #{req.rid} does not "
                                "answer its request")
            for i in chunk:
                errors.setdefault(i, error)
            return
        node = req.conn.node
        if node.last_error is not None:
            self._pipe.mark_up(node)
        again = None
        for i, it in zip(chunk, msg.items):
            status = it.flags
            if bounce and i in bounce:  # through bounce memory
                status = self._from_bounce(i, it, bounce[i], views, results)
            elif status == p.Status.OK:
                results[i] = views[i][: it.length]
            if status == p.Status.OK:
                continue
            if status == p.Status.BUSY:
                if again is None:
                    again = []
                again.append(i)  # did not fit the shard's budget (or the bounce): again
            elif status == p.Status.TOO_LARGE:
                errors.setdefault(i, BlockTooLarge(
                    f"block {ids[i].hex()} is {it.length} B, its out buffer holds "
                    f"{views[i].nbytes} B"))
            elif status != p.Status.NOT_FOUND:
                errors.setdefault(i, RemoteError(f"{req.conn.address}: {status.name}"))
        if bounce:
            self._bounce_release(req)
        if again:
            self._send_get_chunk(req.call, req.conn, again, ids, views, results, errors, tries)

    def _from_bounce(self, i: int, it: p.ShmItem, where: tuple[int, int],
                     views: list[memoryview] | None, results: list[Any]) -> p.Status:
        """A GET_SHM item answered into bounce memory: copied out to its out buffer (or
        as bytes). A block larger than the bounce slot without an out buffer is asked
        again with room for it (BUSY)."""
        status = p.Status(it.flags)
        if status == p.Status.TOO_LARGE and views is None:
            self._bounce_hint = max(self._bounce_hint, it.length)
            return p.Status.BUSY
        if status != p.Status.OK:
            return status
        off = where[0]
        data = self._bounce.memory.buffer[off : off + it.length]
        if views is None:
            results[i] = bytes(data)
        else:
            views[i][: it.length] = data
            results[i] = views[i][: it.length]
        return status

    def _send_ids(self, call: Call, address: str, idx: list[int], ids: list[bytes],
                  opcode: p.Opcode, out: Any) -> None:
        """EXISTS and DELETE (a bit per block into the list out), LOOKUP_PREFIX (per frame,
        out[first index] = (count, ids in the frame))."""
        def fail(which: list[int], error: WQSError) -> None:
            log.debug("%s to %s failed: %s", opcode.name, address, error)

        for conn, sidx in self._shard_groups(address, idx, ids, fail):
            for chunk in p.frames_for(sidx, conn.limits, lambda i: p.ID_LEN - p.ITEM.size):
                def answer(req: _Request, msg: Any, chunk: list[int] = chunk) -> None:
                    if isinstance(msg, p.LookupPrefixResponse):
                        out[chunk[0]] = (msg.count, len(chunk))
                    elif isinstance(msg, (p.ExistsResponse, p.DeleteResponse)):
                        for i, bit in zip(chunk, msg.bits):
                            out[i] = out[i] or bit
                    else:
                        self._request_error(req, msg)
                        return
                    self._pipe.mark_up(req.conn.node)

                frame = p.frame_ids_request(opcode, 0, [ids[i] for i in chunk])
                self._pipe.send(_Request(call, conn, opcode, answer), [frame])

    @staticmethod
    def _resend(msg: Any, tries: int) -> bool:
        """Whether a refused request goes again: once its node's shards are learnt anew
        (WRONG_SHARD: it was restarted cut another way), at most twice."""
        return isinstance(msg, p.ErrorResponse) and msg.status == p.Status.WRONG_SHARD \
            and tries < 2

    def _request_error(self, req: _Request, msg: Any) -> WQSError:
        """What a failed request's blocks report; a changed shard layout is re-learnt."""
        if isinstance(msg, p.ErrorResponse):
            self._pipe.failed_requests += 1
            if msg.status == p.Status.WRONG_SHARD:
                # The node was restarted cut into other shards: learn them again.
                node = req.conn.node
                node.ports = None
                self._pipe._close_node(node, NodeUnavailable(f"{node.address}: shards changed"))
            log.warning("request to %s failed: %s: %s", req.conn.address, msg.status.name,
                        msg.message)
            return RemoteError(f"{req.conn.address}: {msg.status.name}: {msg.message}")
        if isinstance(msg, WQSError):
            return msg
        return RemoteError(f"{req.conn.address}: unexpected answer {type(msg).__name__}")
