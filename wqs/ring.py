"""Consistent-hash ring that places block IDs on storage nodes, computed client-side.

Placement is a pure function of the membership ``{node: weight}`` and the two
parameters, so every client that sees the same nodes picks the same owners without
asking anyone. Layout (part of the contract between clients):

* node ``n`` with weight ``w`` owns ``v(n) = max(1, round(vnodes_per_unit_weight * w /
  weight_unit))`` points: ``XXH3_64(f"{n}#{i}".encode())`` for ``i in range(v(n))``.
* a block ID's key is ``XXH3_64(id_bytes)`` over its 16 canonical bytes.
* the owner is the node of the first point ``>= key``, wrapping past the top; points
  that collide are ordered by node name. Replicas are the next distinct nodes clockwise.

Vnode counts are an absolute function of the weight (not normalised by the current
total): adding a node therefore moves keys only to it, and removing one moves only its
keys. Express weights so a typical node is ~1.0 (e.g. capacity in TiB with
``weight_unit=1``, or pass capacity in bytes with ``weight_unit=<typical capacity>``);
`weight_unit_for` picks such a unit from the weights themselves, the same on every
client.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import xxhash

from wqs.errors import NodeUnavailable

# 512 points per unit weight: at 256 about 1 in 10 three-node clusters has a node >10% off
# its fair share; at 512 about 1 in 100. The cost is 8 KiB of points per node.
DEFAULT_VNODES = 512
MAX_VNODES_PER_NODE = 1 << 16  # bounds memory when a weight is given in the wrong unit


def weight_unit_for(weights: Iterable[float],
                    vnodes_per_unit_weight: int = DEFAULT_VNODES) -> float:
    """A weight unit that suits these node weights, in whatever unit they come.

    The power of two at or below the smallest weight, so the smallest node gets
    between one and two units' worth of vnodes (512-1023 by default) whether weights are
    bytes, GiB or shares; doubled where needed so the largest node stays within
    MAX_VNODES_PER_NODE (nodes over ~128x the smallest then cost the small ones spread,
    never an error). A pure function of the set of weights: every client derives the
    same ring. It changes, and with it most vnode counts, only when a node joins below
    the smallest node's power-of-two bracket (or the last node of that bracket leaves).
    """
    values = [float(w) for w in weights]
    if not values:
        return 1.0
    smallest, largest = min(values), max(values)
    if not (smallest > 0 and math.isfinite(largest)):
        raise ValueError(f"weights must be positive numbers, got {values}")
    unit = 2.0 ** math.floor(math.log2(smallest))
    while vnodes_per_unit_weight * largest / unit > MAX_VNODES_PER_NODE:
        unit *= 2
    return unit


def key_of(block_id: bytes) -> int:
    """The ring key of a block ID: XXH3_64 over its 16 canonical bytes."""
    return xxhash.xxh3_64_intdigest(block_id)


class HashRing:
    """Weighted consistent-hash ring over nodes named like ``"host:port"``."""

    def __init__(
        self,
        nodes: Mapping[str, float] | Iterable[str] = (),
        vnodes_per_unit_weight: int = DEFAULT_VNODES,
        weight_unit: float = 1.0,
    ) -> None:
        if vnodes_per_unit_weight < 1:
            raise ValueError(f"vnodes_per_unit_weight must be >= 1, got {vnodes_per_unit_weight}")
        if not (weight_unit > 0 and math.isfinite(weight_unit)):
            raise ValueError(f"weight_unit must be a positive number, got {weight_unit}")
        self._per_unit = int(vnodes_per_unit_weight)
        self._unit = float(weight_unit)
        self._weights: dict[str, float] = {}
        self._points_of: dict[str, np.ndarray] = {}  # cached per node: adds stay cheap
        items = nodes.items() if isinstance(nodes, Mapping) else ((n, 1.0) for n in nodes)
        for node, weight in items:
            self._put(node, weight)
        self._rebuild()

    # -- membership ----------------------------------------------------------------

    def add(self, node: str, weight: float = 1.0) -> None:
        """Add ``node``, or change its weight if it is already present."""
        self._put(node, weight)
        self._rebuild()

    def remove(self, node: str) -> None:
        if node not in self._weights:
            raise KeyError(f"node {node!r} is not in the ring")
        del self._weights[node], self._points_of[node]
        self._rebuild()

    @property
    def nodes(self) -> tuple[str, ...]:
        """Node names, sorted; `assign_indices` returns indices into this tuple."""
        return self._names

    @property
    def weights(self) -> dict[str, float]:
        return dict(self._weights)

    def vnodes(self, node: str) -> int:
        return len(self._points_of[node])

    def __len__(self) -> int:
        return len(self._weights)

    def __contains__(self, node: object) -> bool:
        return node in self._weights

    def __repr__(self) -> str:
        return f"HashRing({self._weights!r})"

    # -- lookups -------------------------------------------------------------------

    def node_for(self, block_id: bytes) -> str:
        """The node that owns ``block_id``."""
        self._check_nonempty()
        return self._names[self._owners[self._slot(key_of(block_id))]]

    def nodes_for(self, block_id: bytes, replicas: int) -> list[str]:
        """``replicas`` distinct nodes for ``block_id``, owner first, then clockwise.

        Returns every node (fewer than asked) when the ring has fewer than ``replicas``.
        """
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self._check_nonempty()
        want = min(replicas, len(self._names))
        slot, n = self._slot(key_of(block_id)), len(self._owners)
        seen: list[int] = []
        for j in range(n):
            owner = int(self._owners[(slot + j) % n])
            if owner not in seen:
                seen.append(owner)
                if len(seen) == want:
                    break
        return [self._names[i] for i in seen]

    def assign_indices(self, block_ids: Sequence[bytes]) -> np.ndarray:
        """Owner of each ID as an index into `nodes` (int32 array); vectorised."""
        self._check_nonempty()
        keys = np.fromiter(map(xxhash.xxh3_64_intdigest, block_ids), np.uint64, len(block_ids))
        slots = np.searchsorted(self._points, keys, side="left")
        slots[slots == len(self._points)] = 0  # wrap past the top of the ring
        return self._owners[slots]

    def assign(self, block_ids: Sequence[bytes]) -> list[str]:
        """Owner of each ID, by name."""
        names = self._names
        return [names[i] for i in self.assign_indices(block_ids).tolist()]

    def plan(self, block_ids: Sequence[bytes], positions: Sequence[int], replicas: int,
             attempt: int = 0) -> dict[str, list[int]]:
        """The given positions of block_ids grouped by the node that holds their copy
        number `attempt % copies` (0: the owner): who to ask, in one pass."""
        self._check_nonempty()
        if len(self._names) == 1:  # one node holds every copy there is
            return {self._names[0]: list(positions)}
        if replicas == 1 or attempt == 0:
            out: dict[str, list[int]] = {}
            names = self._names
            picked = [block_ids[i] for i in positions]
            for pos, idx in zip(positions, self.assign_indices(picked).tolist()):
                out.setdefault(names[idx], []).append(pos)
            return out
        out = {}
        for i in positions:
            owners = self.nodes_for(block_ids[i], replicas)
            out.setdefault(owners[attempt % len(owners)], []).append(i)
        return out

    def group(self, block_ids: Sequence[bytes]) -> dict[str, list[int]]:
        """Positions of ``block_ids`` grouped by owner: one batch per node for a fan-out."""
        out: dict[str, list[int]] = {}
        for pos, idx in enumerate(self.assign_indices(block_ids).tolist()):
            out.setdefault(self._names[idx], []).append(pos)
        return out

    # -- internals -----------------------------------------------------------------

    def _put(self, node: str, weight: float) -> None:
        if not isinstance(node, str) or not node:
            raise ValueError(f"node name must be a non-empty string, got {node!r}")
        weight = float(weight)
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"weight of {node!r} must be a positive number, got {weight}")
        count = max(1, round(self._per_unit * weight / self._unit))
        if count > MAX_VNODES_PER_NODE:
            raise ValueError(
                f"weight {weight} of {node!r} gives {count} vnodes (max {MAX_VNODES_PER_NODE});"
                " is it in the wrong unit? set weight_unit"
            )
        h = xxhash.xxh3_64_intdigest
        self._weights[node] = weight
        self._points_of[node] = np.fromiter(
            (h(f"{node}#{i}".encode()) for i in range(count)), np.uint64, count
        )

    def _rebuild(self) -> None:
        self._names = tuple(sorted(self._weights))
        arrays = [self._points_of[n] for n in self._names]
        points = np.concatenate(arrays) if arrays else np.empty(0, np.uint64)
        owners = np.repeat(np.arange(len(arrays), dtype=np.int32), [len(a) for a in arrays])
        order = np.lexsort((owners, points))  # by point, then by (sorted) node name
        self._points, self._owners = points[order], owners[order]

    def _slot(self, key: int) -> int:
        slot = int(np.searchsorted(self._points, np.uint64(key), side="left"))
        return 0 if slot == len(self._points) else slot

    def _check_nonempty(self) -> None:
        if not self._weights:
            raise NodeUnavailable("hash ring is empty: no storage nodes are configured")


# Within a node, a block belongs to one shard (one process with its own partition of the
# device): XXH3_64 of its ID with this seed, modulo the node's shard count. Another seed
# than the ring's key, so the shards of a node share its blocks evenly. Part of the
# contract between clients and daemons.
SHARD_SEED = 0x5348415244  # "SHARD"


def shard_of(block_id: bytes, shards: int) -> int:
    """The shard of a node with `shards` shards that holds block_id."""
    return xxhash.xxh3_64_intdigest(block_id, seed=SHARD_SEED) % shards if shards > 1 else 0
