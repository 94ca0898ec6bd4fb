"""The Python SDK: `wqs.Client`, a store of KV blocks spread over storage nodes.

Placement is client-side: a consistent-hash ring over the nodes maps each block ID to
its node (and `replicas - 1` more). A batch call splits its IDs by node, sends one
request to every node at once, and puts the answers back in the caller's order; no
metadata server sits on the data path.

A node that cannot be reached makes its blocks misses (get, exists), failed puts
(put returns False for them) and ends lookups at the first block it holds, within
`timeout_s`; the client retries its connection at most once per `retry_interval_s`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable, Sequence

from wqs.config import ClientConfig, load_client_config
from wqs.errors import AuthError, BlockTooLarge, NodeUnavailable, ProtocolError, RemoteError
from wqs.ids import BlockIdLike, to_block_id
from wqs.ring import HashRing, weight_unit_for
from wqs.rpc import protocol as p
from wqs.rpc.tcp import TcpTransport

log = logging.getLogger("wqs.client")

RETRY_INTERVAL_S = 1.0


def _buffer(data: Any) -> Any:
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
    view = memoryview(_buffer(out))
    if view.readonly:
        raise TypeError("out buffer is read-only")
    return view


class NodeDown(NodeUnavailable):
    """A node failed recently and is skipped until its retry interval has passed."""


class _Node:
    """Connections to one node, opened lazily, with a back-off after a failure."""

    def __init__(self, address: str, config: ClientConfig) -> None:
        self.address = address
        self.config = config
        self._conns: list[TcpTransport | None] = [None] * config.connections_per_node
        self._next = itertools.count()
        self._lock = threading.Lock()
        self._down_until = 0.0
        self.last_error: str | None = None

    def transport(self) -> TcpTransport:
        """The next connection (round robin), opened if needed; NodeDown while the node
        is in its back-off after a failure."""
        i = next(self._next) % len(self._conns)
        conn = self._conns[i]
        if conn is not None and not conn.closed:
            return conn
        with self._lock:
            conn = self._conns[i]
            if conn is not None and not conn.closed:
                return conn
            if time.monotonic() < self._down_until:
                raise NodeDown(f"{self.address}: down ({self.last_error})")
            try:
                conn = TcpTransport(self.address, auth_token=self.config.auth_token,
                                    timeout_s=self.config.timeout_s,
                                    connect_timeout_s=self.config.connect_timeout_s)
            except NodeUnavailable as e:
                self.mark_down(str(e))
                raise
            except (AuthError, ProtocolError) as e:
                # Misconfiguration rather than an outage: raise it, naming the node.
                kind = AuthError if isinstance(e, AuthError) else ProtocolError
                raise kind(f"{self.address}: {e}") from None
            self._conns[i] = conn
            return conn

    def mark_up(self) -> None:
        if self.last_error is not None:
            log.info("node %s is back", self.address)
            self.last_error = None
            self._down_until = 0.0

    def mark_down(self, reason: str) -> None:
        """The node failed a request: its other connections are as dead as this one was,
        so close them and answer for it at once until the retry interval has passed."""
        self._down_until = time.monotonic() + RETRY_INTERVAL_S
        for conn in self._conns:
            if conn is not None:
                conn.close()
        if self.last_error is None:
            log.warning("node %s unavailable: %s", self.address, reason)
        self.last_error = reason

    def close(self) -> None:
        for conn in self._conns:
            if conn is not None:
                conn.close()


class Client:
    """A WQS cluster, seen from Python. Thread-safe; use one per process."""

    def __init__(self, servers: Sequence[str] | None = None, *, config: ClientConfig | None = None,
                 **options: Any) -> None:
        if config is None:
            config = ClientConfig(servers=list(servers or []), **options)
        elif servers or options:
            raise TypeError("pass either a config or servers and options, not both")
        self.config = config
        self._nodes: dict[str, _Node] = {}
        self._nodes_lock = threading.Lock()
        # Two pools: node calls of one fan-out never wait behind *_async callers that
        # are themselves waiting for node calls (which could deadlock one pool).
        self._fanout_pool = ThreadPoolExecutor(16, thread_name_prefix="wqs-fanout")
        self._executor = ThreadPoolExecutor(16, thread_name_prefix="wqs-async")
        self._failures = itertools.count()
        self.failed_requests = 0  # requests that met a down or failing node
        self._watcher = None
        if config.etcd is not None:
            self._watch_etcd(config)
        else:
            weights = config.weights or {}
            self._set_members({a: weights.get(a, 1.0) for a in config.servers})

    def _set_members(self, weights: dict[str, float]) -> None:
        """Swap in a ring over these nodes; callers already running keep the old one."""
        with self._nodes_lock:
            for address in weights:
                if address not in self._nodes:
                    self._nodes[address] = _Node(address, self.config)
            self.ring = HashRing(weights, weight_unit=weight_unit_for(weights.values()))
            gone = [a for a in self._nodes if a not in weights]
            for address in gone:  # left the cluster: drop its connections
                self._nodes.pop(address).close()
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

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
        for node in list(self._nodes.values()):
            node.close()
        self._executor.shutdown(wait=False)
        self._fanout_pool.shutdown(wait=False)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def nodes(self) -> tuple[str, ...]:
        return self.ring.nodes

    def node_errors(self) -> dict[str, str | None]:
        """Per node, the last error that made it unavailable (None: it is healthy)."""
        return {a: n.last_error for a, n in self._nodes.items() if a in self.ring}

    # ---- single-block calls ----------------------------------------------------------

    def put(self, block_id: BlockIdLike, data: Any, *, replicas: int | None = None) -> bool:
        """Store a block. False if its node(s) could not take it (reported, not raised)."""
        return self.put_many([(block_id, data)], replicas=replicas)[0]

    def get(self, block_id: BlockIdLike, out: Any = None) -> bytes | bool | None:
        """The block's bytes, or None on a miss. With `out`, fill it and return True/False."""
        if out is None:
            return self.get_many([block_id])[0]
        return self.get_many([block_id], outs=[out])[0] is not None

    def exists(self, block_id: BlockIdLike) -> bool:
        return self.exists_many([block_id])[0]

    def delete(self, block_id: BlockIdLike) -> bool:
        return self.delete_many([block_id])[0]

    # ---- batches ---------------------------------------------------------------------

    def put_many(self, items: Iterable[tuple[BlockIdLike, Any]], *,
                 replicas: int | None = None) -> list[bool]:
        """Store blocks; per block True once every replica acknowledged it."""
        ids, bufs = [], []
        for block_id, data in items:
            ids.append(to_block_id(block_id))
            bufs.append(_buffer(data))
        n_rep = replicas or self.config.replicas
        ring = self.ring
        if not len(ring):
            return [False] * len(ids)
        plan: dict[str, list[int]] = {}
        for i, b in enumerate(ids):
            for node in ring.nodes_for(b, n_rep):
                plan.setdefault(node, []).append(i)
        ok = [True] * len(ids)
        for node, idx, result in self._fan_out(
            plan, lambda t, idx: t.put_many([(ids[i], bufs[i]) for i in idx])
        ):
            for i, status in zip(idx, result if result is not None else [None] * len(idx)):
                if status != p.Status.OK:
                    if status == p.Status.TOO_LARGE:
                        raise BlockTooLarge(f"block {ids[i].hex()} is larger than {node} accepts")
                    ok[i] = False
        return ok

    def get_many(self, block_ids: Iterable[BlockIdLike],
                 outs: Sequence[Any] | None = None) -> list[Any]:
        """Blocks in the order asked; None for a miss. With `outs`, each hit is received
        straight into outs[i] and returned as a memoryview of it."""
        ids = [to_block_id(b) for b in block_ids]
        views = [_writable(o) for o in outs] if outs is not None else None
        if views is not None and len(views) != len(ids):
            raise ValueError(f"{len(ids)} ids but {len(views)} out buffers")
        results: list[Any] = [None] * len(ids)
        ring = self.ring
        todo = list(range(len(ids))) if len(ring) else []
        for attempt in range(self.config.replicas):
            plan: dict[str, list[int]] = {}
            for i in todo:
                replicas = ring.nodes_for(ids[i], self.config.replicas)
                plan.setdefault(replicas[attempt % len(replicas)], []).append(i)
            for _, idx, result in self._fan_out(
                plan, lambda t, idx: t.get_many([ids[i] for i in idx],
                                                [views[i] for i in idx] if views else None)
            ):
                if result is not None:
                    for i, value in zip(idx, result):
                        results[i] = value
            todo = [i for i in todo if results[i] is None]
            if not todo:
                break
        return results

    def exists_many(self, block_ids: Iterable[BlockIdLike]) -> list[bool]:
        """Whether each block is stored; a block its owner lacks is asked of its replicas."""
        ids = [to_block_id(b) for b in block_ids]
        found = [False] * len(ids)
        ring = self.ring
        todo = list(range(len(ids))) if len(ring) else []
        for attempt in range(self.config.replicas):
            if attempt == 0:
                plan = {n: [todo[k] for k in ks]
                        for n, ks in ring.group([ids[i] for i in todo]).items()} if todo else {}
            else:
                plan = {}
                for i in todo:
                    owners = ring.nodes_for(ids[i], self.config.replicas)
                    plan.setdefault(owners[attempt % len(owners)], []).append(i)
            for _, idx, result in self._fan_out(
                plan, lambda t, idx: t.exists_many([ids[i] for i in idx])
            ):
                if result is not None:
                    for i, hit in zip(idx, result):
                        found[i] = hit
            todo = [i for i in todo if not found[i]]
            if not todo:
                break
        return found

    def delete_many(self, block_ids: Iterable[BlockIdLike]) -> list[bool]:
        """Delete blocks from every replica; True where any replica held the block."""
        ids = [to_block_id(b) for b in block_ids]
        ring = self.ring
        plan: dict[str, list[int]] = {}
        for i, b in enumerate(ids if len(ring) else []):
            for node in ring.nodes_for(b, self.config.replicas):
                plan.setdefault(node, []).append(i)
        deleted = [False] * len(ids)
        for _, idx, result in self._fan_out(plan, lambda t, idx: t.delete_many([ids[i] for i in idx])):
            if result is not None:
                for i, hit in zip(idx, result):
                    deleted[i] = deleted[i] or hit
        return deleted

    def lookup_prefix(self, block_ids: Iterable[BlockIdLike]) -> int:
        """How many leading blocks of a chain (e.g. from prefix_block_ids) are stored.

        One parallel round trip: every node answers for its share of the chain at once.
        """
        ids = [to_block_id(b) for b in block_ids]
        ring = self.ring
        if not ids or not len(ring):
            return 0
        plan = ring.group(ids)
        if len(plan) == 1 and self.config.replicas == 1:
            # One node holds the whole chain: it counts in one request.
            return self._fan_out(plan, lambda t, idx: t.lookup_prefix(ids))[0][2] or 0
        found = self.exists_many(ids)
        return next((i for i, hit in enumerate(found) if not hit), len(ids))

    def ping(self) -> dict[str, float | None]:
        """Round-trip time per node in seconds; None where the node is down."""
        plan = {node: [] for node in self.nodes}
        return {node: result for node, _, result in self._fan_out(plan, lambda t, idx: t.ping())}

    # ---- futures and asyncio ---------------------------------------------------------

    def get_many_async(self, block_ids: Sequence[BlockIdLike],
                       outs: Sequence[Any] | None = None) -> Future:
        """get_many in the background: a Future, so a caller can overlap loads with compute."""
        return self._executor.submit(self.get_many, list(block_ids), outs)

    def put_many_async(self, items: Sequence[tuple[BlockIdLike, Any]]) -> Future:
        return self._executor.submit(self.put_many, list(items))

    def lookup_prefix_async(self, block_ids: Sequence[BlockIdLike]) -> Future:
        return self._executor.submit(self.lookup_prefix, list(block_ids))

    # ---- fan-out ---------------------------------------------------------------------

    def _fan_out(self, plan: dict[str, list[int]], call) -> list[tuple[str, list[int], Any]]:
        """Run call(transport, indices) for every node of the plan at once.

        Returns (node, indices, result) with result None where the node failed: the
        caller turns that into misses. Errors are logged, never raised, except for
        programming errors and blocks too large for the node.
        """
        if not plan:
            return []
        items = list(plan.items())
        # Every node but the first on the pool, the first on this thread meanwhile.
        futures = [(node, idx, self._fanout_pool.submit(self._call_node, node, idx, call))
                   for node, idx in items[1:]]
        node, idx = items[0]
        results = [(node, idx, self._call_node(node, idx, call))]
        return results + [(node, idx, fut.result()) for node, idx, fut in futures]

    def _call_node(self, address: str, idx: list[int], call) -> Any:
        node = self._nodes.get(address)
        if node is None:  # left the cluster since the plan was made
            self.failed_requests = next(self._failures) + 1
            return None
        try:
            result = call(node.transport(), idx)
            node.mark_up()
            return result
        except (NodeUnavailable, RemoteError, ConnectionError, OSError) as e:
            self.failed_requests = next(self._failures) + 1
            if isinstance(e, NodeDown):
                log.debug("skipping %s: %s", address, e)  # mark_down already warned once
            elif isinstance(e, NodeUnavailable):
                node.mark_down(str(e))
            else:
                log.warning("request to %s failed: %s", address, e)
            return None


class AsyncClient:
    """The same calls as awaitables, for asyncio engines."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def get_many(self, block_ids: Sequence[BlockIdLike],
                       outs: Sequence[Any] | None = None) -> list[Any]:
        return await asyncio.wrap_future(self.client.get_many_async(block_ids, outs))

    async def put_many(self, items: Sequence[tuple[BlockIdLike, Any]]) -> list[bool]:
        return await asyncio.wrap_future(self.client.put_many_async(items))

    async def lookup_prefix(self, block_ids: Sequence[BlockIdLike]) -> int:
        return await asyncio.wrap_future(self.client.lookup_prefix_async(block_ids))
