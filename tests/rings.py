"""A fault-injecting, recording wrapper around a real IO ring, for engine tests.

    ring = HookedRing.install(engine.core)      # the writer, reader and reclaimer use it
    ring.fail_writes = True                     # writes complete with -EIO (after the IO)
    ring.hold_reads = True                      # read completions wait until release()

The real ring still does every IO; only what the engine is told (and when) changes.
"""

from __future__ import annotations

import errno
from typing import Any, Callable


class HookedRing:
    def __init__(self, ring: Any) -> None:
        self.ring = ring
        self.fail_writes = False
        self.hold_reads = False
        self.hold_writes = False
        self.held: list[tuple[Callable[[Any, int], None], Any, int]] = []
        self.writes: list[tuple[int, int, bool]] = []  # (offset, bytes, dsync) per writev
        self.reads: list[tuple[int, int]] = []  # (offset, bytes) per read
        self.submits: list[tuple[int, int]] = []  # (reads, writes) handed over per submit
        self._since = [0, 0]

    @classmethod
    def install(cls, core: Any) -> "HookedRing":
        hooked = cls(core.ring)
        core.ring = core.writer.ring = core.reader.ring = core.reclaimer.ring = hooked
        return hooked

    @property
    def fd(self) -> int:
        return self.ring.fd

    @property
    def in_flight(self) -> int:
        return self.ring.in_flight

    @property
    def pending(self) -> int:
        return self.ring.pending

    def read(self, offset: int, addr: int, nbytes: int, callback: Any, arg: Any) -> None:
        self.reads.append((offset, nbytes))
        self._since[0] += 1

        def done(a: Any, res: int) -> None:
            if self.hold_reads:
                self.held.append((callback, a, res))
            else:
                callback(a, res)

        self.ring.read(offset, addr, nbytes, done, arg)

    def writev(self, offset: int, iov: list, callback: Any, arg: Any,
               dsync: bool = False) -> None:
        self.writes.append((offset, sum(n for _, n in iov), dsync))
        self._since[1] += 1

        def done(a: Any, res: int) -> None:
            res = -errno.EIO if self.fail_writes else res
            if self.hold_writes:
                self.held.append((callback, a, res))
            else:
                callback(a, res)

        self.ring.writev(offset, iov, done, arg, dsync)

    def submit(self) -> None:
        if self._since != [0, 0]:
            self.submits.append(tuple(self._since))
            self._since = [0, 0]
        self.ring.submit()

    def complete(self) -> int:
        return self.ring.complete()

    def release(self) -> None:
        """Deliver the held completions."""
        self.hold_reads = self.hold_writes = False
        held, self.held = self.held, []
        for cb, arg, res in held:
            cb(arg, res)

    def close(self) -> None:
        self.ring.close()
