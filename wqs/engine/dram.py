"""The DRAM hot tier: a byte-bounded cache of whole blocks in front of the SSD.

Two policies: S3-FIFO (the default; Yang et al., SOSP '23) and plain LRU for comparison.
S3-FIFO keeps new blocks in a small FIFO (10 % of the bytes) and promotes only those
read again before they leave it, so one-hit wonders (a prompt seen once) never push the
reused prefix blocks out of the main FIFO. bench/dram_policy.py measures both.

A tier has one owner (a shard's loop, or the engine facade under its lock): no lock.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

SMALL_FRACTION = 0.10
MAX_FREQ = 3
# A block bigger than this share of the tier is not cached: it would flush everything.
MAX_ITEM_FRACTION = 0.25


class DramTier(Protocol):
    capacity: int
    used: int

    def get(self, key: bytes) -> bytes | None: ...

    def __contains__(self, key: object) -> bool: ...

    def put(self, key: bytes, value: bytes) -> None: ...

    def remove(self, key: bytes) -> None: ...

    def clear(self) -> None: ...

    def admits(self, nbytes: int) -> bool: ...

    def __len__(self) -> int: ...


class LRUTier:
    """Least-recently-used, bounded in bytes."""

    def __init__(self, capacity: int) -> None:
        assert capacity > 0
        self.capacity = capacity
        self.used = 0
        self._items: OrderedDict[bytes, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def admits(self, nbytes: int) -> bool:
        return nbytes <= self.capacity * MAX_ITEM_FRACTION

    def __contains__(self, key: object) -> bool:
        return key in self._items  # a probe is not an access: it must not keep a block

    def get(self, key: bytes) -> bytes | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: bytes, value: bytes) -> None:
        if len(value) > self.capacity * MAX_ITEM_FRACTION:
            self.remove(key)
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.used -= len(old)
        self._items[key] = value
        self.used += len(value)
        while self.used > self.capacity:
            _, evicted = self._items.popitem(last=False)
            self.used -= len(evicted)

    def remove(self, key: bytes) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self.used -= len(old)

    def clear(self) -> None:
        self._items.clear()
        self.used = 0


class S3FIFOTier:
    """S3-FIFO: a small probationary FIFO, a main FIFO with 2-bit frequency, a ghost FIFO."""

    def __init__(self, capacity: int) -> None:
        assert capacity > 0
        self.capacity = capacity
        self.used = 0
        self._small_cap = max(1, int(capacity * SMALL_FRACTION))
        self._small: OrderedDict[bytes, bytes] = OrderedDict()  # oldest first
        self._main: OrderedDict[bytes, bytes] = OrderedDict()
        self._freq: dict[bytes, int] = {}
        self._small_used = 0
        # Keys recently evicted from small; a re-insert of one goes straight to main.
        # Bounded by count, as a ghost holds no bytes.
        self._ghost: OrderedDict[bytes, None] = OrderedDict()
        self._ghost_max = 1024

    def __len__(self) -> int:
        return len(self._small) + len(self._main)

    def admits(self, nbytes: int) -> bool:
        return nbytes <= self.capacity * MAX_ITEM_FRACTION

    def __contains__(self, key: object) -> bool:
        return key in self._small or key in self._main  # a probe is not an access

    def get(self, key: bytes) -> bytes | None:
        value = self._small.get(key)
        if value is None:
            value = self._main.get(key)
        if value is not None:
            self._freq[key] = min(self._freq[key] + 1, MAX_FREQ)
        return value

    def put(self, key: bytes, value: bytes) -> None:
        if len(value) > self.capacity * MAX_ITEM_FRACTION:
            self.remove(key)
            return
        if key in self._small or key in self._main:
            self._replace(key, value)
            return
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = value
        else:
            self._small[key] = value
            self._small_used += len(value)
        self._freq[key] = 0
        self.used += len(value)
        # Keep the ghost about as long (in items) as main, as the paper suggests.
        self._ghost_max = max(1024, len(self._main))
        while self.used > self.capacity:
            self._evict()

    def _replace(self, key: bytes, value: bytes) -> None:
        table = self._small if key in self._small else self._main
        old = table[key]
        table[key] = value
        delta = len(value) - len(old)
        self.used += delta
        if table is self._small:
            self._small_used += delta
        while self.used > self.capacity:
            self._evict()

    def _evict(self) -> None:
        if self._small and (self._small_used >= self._small_cap or not self._main):
            self._evict_small()
        else:
            self._evict_main()

    def _evict_small(self) -> None:
        key, value = self._small.popitem(last=False)
        self._small_used -= len(value)
        if self._freq[key] >= 1:
            # Read again while on probation: it earns a place in main.
            self._main[key] = value
            self._freq[key] = 0
        else:
            del self._freq[key]
            self.used -= len(value)
            self._ghost[key] = None
            while len(self._ghost) > self._ghost_max:
                self._ghost.popitem(last=False)

    def _evict_main(self) -> None:
        while True:
            key, value = self._main.popitem(last=False)
            freq = self._freq[key]
            if freq > 0:
                self._freq[key] = freq - 1
                self._main[key] = value  # second chance: back to the head
                continue
            del self._freq[key]
            self.used -= len(value)
            return

    def remove(self, key: bytes) -> None:
        for table in (self._small, self._main):
            value = table.pop(key, None)
            if value is not None:
                self.used -= len(value)
                if table is self._small:
                    self._small_used -= len(value)
                del self._freq[key]
        self._ghost.pop(key, None)

    def clear(self) -> None:
        self._small.clear()
        self._main.clear()
        self._freq.clear()
        self._ghost.clear()
        self.used = self._small_used = 0


def make_dram_tier(capacity: int, policy: str) -> DramTier | None:
    """The tier named by config, or None when capacity is 0 (disabled)."""
    if capacity <= 0:
        return None
    if policy == "s3fifo":
        return S3FIFOTier(capacity)
    if policy == "lru":
        return LRUTier(capacity)
    raise ValueError(f"unknown DRAM policy {policy!r} (expected 's3fifo' or 'lru')")
