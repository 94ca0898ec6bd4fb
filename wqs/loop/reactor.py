"""One thread's event loop: epoll readiness, timers, and work done once per turn.

A turn is: wait for readiness (or the next timer), run the ready handlers, run the timers
that are due, run what was queued with call_soon, then run the turn-end hooks. The hooks
are where batching happens: every request decoded during the turn has queued its device
IO, and one hook (the engine's flush) submits all of it with one io_submit. That is the
whole point of the loop: one Python step per batch, not per block.

Owned by the thread that runs it. Other threads may only call `call_soon_threadsafe`
(which wakes the loop through an eventfd) and `stop`. Handlers run in the loop thread
and must not block; an exception from one is logged and the loop goes on, so one bad
connection cannot stop a shard.

Level-triggered epoll: a handler that leaves bytes unread is called again next turn,
which is what flow control relies on (stop watching a socket, and it simply waits).

Pollers are for devices that signal completions through no file descriptor (SPDK's
user-space NVMe driver): while a poller has IO outstanding the loop calls its
`complete()` every turn and never sleeps longer than the poller's `poll_wait_s` (no
wait at all right after a poll that found completions), waking early for any fd; with
nothing outstanding it sleeps as usual and polls only every `idle_poll_s`, for the
device's housekeeping (keep-alives). So the loop spins only while completions flow.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import threading
import time
from collections import deque
from typing import Any, Callable, Protocol

log = logging.getLogger("wqs.loop")

READ = select.EPOLLIN
WRITE = select.EPOLLOUT
_ERR = select.EPOLLERR | select.EPOLLHUP
MAX_EVENTS = 1024  # readiness events taken per turn; the rest wait for the next
MAX_WAIT_S = 1.0  # longest single wait, so a lost wake-up costs at most this
_MS = 0.001  # epoll's timeout is whole milliseconds; shorter waits go through select


class Poller(Protocol):
    """A completion source the loop polls (see the module's docstring)."""

    poll_wait_s: float  # longest sleep between polls while IO is outstanding
    idle_poll_s: float  # longest time between polls while nothing is outstanding

    @property
    def pending(self) -> int:
        """IO outstanding: poll every turn while this is not 0."""

    def complete(self) -> int:
        """Poll; run the callbacks of what completed; how many."""


class Timer:
    """A callback due at `when` (time.monotonic()); cancel() before then to drop it."""

    __slots__ = ("when", "callback", "args", "cancelled")

    def __init__(self, when: float, callback: Callable[..., Any], args: tuple) -> None:
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Reactor:
    """epoll, timers, a ready queue and turn-end hooks, run by one thread."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._readers: dict[int, Callable[[], None]] = {}
        self._writers: dict[int, Callable[[], None]] = {}
        self._masks: dict[int, int] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._timer_seq = itertools.count()
        self._ready: deque[tuple[Callable[..., Any], tuple]] = deque()
        self._turn_end: list[Callable[[], None]] = []
        self._pollers: list[Poller] = []
        self._polled = 0  # completions the pollers found last turn
        self._foreign: deque[tuple[Callable[..., Any], tuple]] = deque()  # from other threads
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, READ)
        self._readers[self._wake_fd] = self._drain_foreign
        self._masks[self._wake_fd] = READ
        self._stopping = False
        self._closed = False
        self.owner: int | None = None  # thread ident while run() runs
        self.turns = 0

    # ---- readiness ---------------------------------------------------------------

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self._readers[fd] = callback
        self._update(fd)

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            self._update(fd)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        self._writers[fd] = callback
        self._update(fd)

    def remove_writer(self, fd: int) -> None:
        if self._writers.pop(fd, None) is not None:
            self._update(fd)

    def forget(self, fd: int) -> None:
        """Stop watching fd at all (before it is closed)."""
        self._readers.pop(fd, None)
        self._writers.pop(fd, None)
        if self._masks.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass  # already closed: the kernel dropped it from the set

    def add_poller(self, poller: Poller) -> None:
        """Poll `poller` from this loop (see the module's docstring)."""
        assert poller not in self._pollers
        self._pollers.append(poller)
        self.call_later(poller.idle_poll_s, self._idle_poll, poller)

    def remove_poller(self, poller: Poller) -> None:
        if poller in self._pollers:
            self._pollers.remove(poller)

    def _idle_poll(self, poller: Poller) -> None:
        if poller in self._pollers:
            if not poller.pending:  # a busy poller is polled every turn anyway
                poller.complete()
            self.call_later(poller.idle_poll_s, self._idle_poll, poller)

    def _update(self, fd: int) -> None:
        mask = (READ if fd in self._readers else 0) | (WRITE if fd in self._writers else 0)
        old = self._masks.get(fd)
        if mask == old:
            return
        if not mask:
            del self._masks[fd]
            self._epoll.unregister(fd)
        elif old is None:
            self._masks[fd] = mask
            self._epoll.register(fd, mask)
        else:
            self._masks[fd] = mask
            self._epoll.modify(fd, mask)

    # ---- callbacks and timers ------------------------------------------------------

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run callback(*args) in this turn's ready phase (or the next turn's)."""
        self._ready.append((callback, args))

    def call_later(self, delay_s: float, callback: Callable[..., Any], *args: Any) -> Timer:
        timer = Timer(time.monotonic() + delay_s, callback, args)
        heapq.heappush(self._timers, (timer.when, next(self._timer_seq), timer))
        return timer

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> None:
        """From any thread: run callback(*args) in the loop thread, soon."""
        self._foreign.append((callback, args))  # deque.append is atomic
        try:
            os.eventfd_write(self._wake_fd, 1)
        except OSError:
            pass  # closed: the loop is gone and nobody will run it

    def on_turn_end(self, hook: Callable[[], None]) -> None:
        """Run hook() at the end of every turn (batch submission)."""
        self._turn_end.append(hook)

    def _drain_foreign(self) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass
        while self._foreign:
            self._ready.append(self._foreign.popleft())

    # ---- running -------------------------------------------------------------------

    def stop(self) -> None:
        """Make run() return after the current turn (callable from any thread)."""
        self._stopping = True
        self.call_soon_threadsafe(lambda: None)

    def run(self) -> None:
        self.owner = threading.get_ident()
        self._stopping = False
        try:
            while not self._stopping:
                self.run_once()
        finally:
            self.owner = None

    def run_until(self, done: Callable[[], bool], timeout_s: float | None = None) -> bool:
        """Turn until done() is true (checked after every turn) or timeout_s passes;
        whether done() became true. For synchronous callers that own this reactor."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.owner = threading.get_ident()
        try:
            # A turn that does not wait first: the caller started work outside a turn,
            # and the turn-end hooks must submit it before the loop may sleep.
            self.run_once(0.0)
            while not done():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self.run_once(left)
            return True
        finally:
            self.owner = None

    def run_once(self, max_wait_s: float | None = None) -> None:
        """One turn."""
        timeout = MAX_WAIT_S if max_wait_s is None else min(max_wait_s, MAX_WAIT_S)
        if self._ready:
            timeout = 0.0
        elif self._timers:
            timeout = max(0.0, min(timeout, self._timers[0][0] - time.monotonic()))
        pollers = self._pollers
        busy = False
        if pollers:
            for p in pollers:
                if p.pending:
                    busy = True
                    timeout = min(timeout, 0.0 if self._polled else p.poll_wait_s)
        try:
            if 0.0 < timeout < _MS and busy:
                events = self._short_wait(timeout)
            else:
                events = self._epoll.poll(timeout, MAX_EVENTS)
        except InterruptedError:
            events = []
        readers, writers = self._readers, self._writers
        for fd, ev in events:
            if ev & (READ | _ERR):
                cb = readers.get(fd)
                if cb is not None:
                    self._guard(cb)
            if ev & (WRITE | _ERR):
                cb = writers.get(fd)
                if cb is not None:
                    self._guard(cb)
        if busy:
            self._polled = 0
            for p in pollers:
                if p.pending:
                    self._polled += self._guard(p.complete) or 0
        if self._timers:
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, timer = heapq.heappop(self._timers)
                if not timer.cancelled:
                    self._guard(timer.callback, *timer.args)
        # Only what is queued now: a callback that queues another runs it next turn,
        # after the next poll, so no chain of callbacks can starve the sockets.
        for _ in range(len(self._ready)):
            cb, args = self._ready.popleft()
            self._guard(cb, *args)
        for hook in self._turn_end:
            self._guard(hook)
        self.turns += 1

    def _short_wait(self, timeout: float) -> list[tuple[int, int]]:
        """Wait up to `timeout` (under a millisecond) for readiness: select() on the
        epoll fd itself takes microseconds, then epoll says which fds are ready."""
        fd = self._epoll.fileno()
        if fd < 1024:  # select's FD_SETSIZE
            select.select([fd], [], [], timeout)
            return self._epoll.poll(0, MAX_EVENTS)
        return self._epoll.poll(_MS, MAX_EVENTS)

    @staticmethod
    def _guard(cb: Callable[..., Any], *args: Any) -> Any:
        try:
            return cb(*args)
        except Exception:  # noqa: BLE001 - one handler's bug must not stop the loop
            log.exception("loop callback %r failed", cb)
            return None

    def assert_owner(self) -> None:
        """Debug check at entry points of state owned by this loop's thread."""
        assert self.owner is None or self.owner == threading.get_ident(), \
            "called from a thread that does not own this loop"

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._epoll.close()
            os.close(self._wake_fd)
