"""Pins: short leases that keep a block found by a lookup until the engine loads it.

An inference engine asks which leading blocks are stored, then loads them a little
later; without a pin the store may evict one in between. A pin is asked for explicitly
(the PIN request, `Client.pin` / `exists_many(..., pin_s=T)`), never by a plain probe:
EXISTS and LOOKUP_PREFIX mark nothing. What keeps pins from holding the cache hostage:

* a pin lasts at most `max_pin_s` (a longer request is cut to it);
* pinning a block again extends its lease, but never past `max_pin_s` after the lease
  began (a pin asked for after the block's pin ended, or was released, within that
  window continues the same lease), and once a lease is over the block cannot be
  pinned for another `max_pin_s`: a block is pinned at most half of any stretch of
  time, so re-pinning in a loop (or a stream of lookups with pins) cannot keep it
  for ever;
* pinned bytes are capped (`max_bytes`, a share of the device): a pin past the cap is
  refused (the block is reported stored, not pinned), so most of the device always
  stays evictable;
* a pin is honoured by copying the block forward when its region is reclaimed; a region
  holding more pinned bytes than one reclaim may copy is passed over while they are
  pinned, and if every region that could go is held that way, the puts waiting for
  room fail with NO_SPACE at once, never a hang (reclaim.py).

A segmented block (larger than one entry) is not pinned: it cannot be copied forward.
Expired pins are dropped lazily. Owned by the engine core's loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable


MAX_ENDED = 1 << 16  # ended leases remembered (~100 B each); past it the oldest go


@dataclass(slots=True)
class Pin:
    expires: float
    lease_end: float  # no extension goes past this: the lease began max_pin_s before it
    nbytes: int


class PinTable:
    def __init__(self, max_pin_s: float, max_bytes: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        assert max_pin_s > 0 and max_bytes >= 0
        self.max_pin_s = max_pin_s
        self.max_bytes = max_bytes
        self._clock = clock
        self.pins: dict[int, Pin] = {}  # block tag -> its lease
        # Tags whose pin ended (ran out or released) -> when their lease window ends;
        # they are not pinned again until max_pin_s after that. Oldest first.
        self.ended: dict[int, float] = {}
        self.nbytes = 0  # device bytes of the pinned entries
        self.granted = 0
        self.refused = 0  # pins refused: max_bytes reached, or the block's lease is over

    def __len__(self) -> int:
        return len(self.pins)

    def pin(self, tag: int, nbytes: int, seconds: float) -> bool:
        """Pin (or pin again) a block of `nbytes` on the device for `seconds`; False if
        refused (seconds <= 0, or the cap on pinned bytes is reached)."""
        now = self._clock()
        seconds = min(seconds, self.max_pin_s)
        pin = self.pins.get(tag)
        if pin is not None and pin.expires <= now:
            self._drop(tag, pin)
            pin = None
        if seconds <= 0:
            return False
        if pin is not None:
            pin.expires = max(pin.expires, min(now + seconds, pin.lease_end))
            self.granted += 1
            return True
        lease_end = self.ended.get(tag)
        if lease_end is not None and now >= lease_end:
            if now < lease_end + self.max_pin_s:
                self.refused += 1  # its lease is over: not again for a while
                return False
            del self.ended[tag]
            lease_end = None
        if lease_end is None:
            lease_end = now + self.max_pin_s
        if self.nbytes + nbytes > self.max_bytes:
            self.purge()
            if self.nbytes + nbytes > self.max_bytes:
                self.refused += 1
                return False
        self.pins[tag] = Pin(min(now + seconds, lease_end), lease_end, nbytes)
        self.ended.pop(tag, None)
        self.nbytes += nbytes
        self.granted += 1
        return True

    def unpin(self, tag: int) -> None:
        pin = self.pins.get(tag)
        if pin is not None:
            self._drop(tag, pin)

    def pinned(self, tag: int) -> bool:
        pin = self.pins.get(tag)
        return pin is not None and pin.expires > self._clock()

    def purge(self) -> None:
        """Forget every expired pin, and every ended lease whose pause is over."""
        now = self._clock()
        for tag in [t for t, p in self.pins.items() if p.expires <= now]:
            self._drop(tag, self.pins[tag])
        pause = self.max_pin_s
        for tag in [t for t, end in self.ended.items() if end + pause <= now]:
            del self.ended[tag]

    def live(self) -> list[int]:
        """The tags pinned now."""
        self.purge()
        return list(self.pins)

    def clear(self) -> None:
        self.pins.clear()
        self.ended.clear()
        self.nbytes = 0

    def _drop(self, tag: int, pin: Pin) -> None:
        del self.pins[tag]
        self.nbytes -= pin.nbytes
        assert self.nbytes >= 0, "pinned bytes counted twice"
        self.ended[tag] = pin.lease_end
        if len(self.ended) > MAX_ENDED:
            self.purge()
            while len(self.ended) > MAX_ENDED:  # still too many: the oldest go first
                del self.ended[next(iter(self.ended))]
