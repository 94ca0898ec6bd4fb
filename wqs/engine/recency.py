"""The eviction policy's clock: when each block was last used, in 4 bytes an index slot.

The clock ticks once per read call (get, get_one, get_into) and once per published write
group; a block's stamp (Index.stamps) is the tick of its last use: the put that stored
it, a read that hit it (on the device or in the DRAM tier), a put of it again. Probes
(exists, lookup_prefix) stamp nothing, so probing cannot keep a block. A block copied
forward by the reclaimer keeps its stamp: surviving a reclaim is not a use.

Ticks wrap at 2**32, so ages are taken modulo 2**32; every WRAP_GUARD ticks the policy
calls `clamp`, which caps every age at MAX_AGE, so that no stamp ever falls a whole
lap behind and looks young again (at a million ticks a second a lap is 71 minutes).
Stamps are not persisted: after a restart every block's stamp is 0, the clock's start.

Owned by the engine core's loop.
"""

from __future__ import annotations

import numpy as np

from wqs.engine.index import Index

MASK = (1 << 32) - 1
MAX_AGE = 1 << 30  # ages are capped here: well below a lap, far beyond any cutoff
WRAP_GUARD = 1 << 29  # ticks between two clamps: MAX_AGE + WRAP_GUARD < 2**31


class RecencyClock:
    def __init__(self) -> None:
        self.now = 0
        self._clamped_at = 0

    def tick(self) -> int:
        self.now = now = (self.now + 1) & MASK
        return now

    def ages(self, stamps: np.ndarray) -> np.ndarray:
        """Ticks since each stamp (int64)."""
        return (np.uint32(self.now) - stamps.astype(np.uint32)).astype(np.int64)

    def clamp_due(self) -> bool:
        return ((self.now - self._clamped_at) & MASK) >= WRAP_GUARD

    def clamp(self, index: Index) -> None:
        """Cap every held entry's age at MAX_AGE (see the module's note on wrapping)."""
        live = np.flatnonzero(index.tags)
        old = live[self.ages(index.stamps[live]) > MAX_AGE]
        index.stamps[old] = (self.now - MAX_AGE) & MASK
        self._clamped_at = self.now
