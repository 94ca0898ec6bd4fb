"""Eviction policies: which reclaimable region goes first.

A policy only ranks; the region table decides which regions are candidates at all
(sealed, not pinned, and the crash-ordering rule in regions.py). As in CacheLib Navy,
eviction is by whole region: FIFO has the lowest write amplification; LRU keeps regions
that are still read, at the cost that under many rewrites it tends to FIFO anyway.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from wqs.engine.regions import RegionTable


class EvictionPolicy(Protocol):
    name: str
    by_age: bool  # ranks by write order alone (so the crash-ordering rule holds by itself)

    def victim(self, regions: RegionTable, candidates: np.ndarray) -> int: ...


class FifoPolicy:
    """The oldest region (lowest generation) first."""

    name = "fifo"
    by_age = True

    def victim(self, regions: RegionTable, candidates: np.ndarray) -> int:
        return int(candidates[np.argmin(regions.gen[candidates])])


class LruPolicy:
    """The region read least recently first (a read stamps its region's last_access)."""

    name = "lru"
    by_age = False

    def victim(self, regions: RegionTable, candidates: np.ndarray) -> int:
        return int(candidates[np.argmin(regions.last_access[candidates])])


def make_policy(name: str) -> EvictionPolicy:
    policies = {"fifo": FifoPolicy, "lru": LruPolicy}
    if name not in policies:
        raise ValueError(f"unknown eviction policy {name!r}: one of {', '.join(policies)}")
    return policies[name]()
