"""Running jobs: layout, the timed part (with ramp), verification, the live ETA line.

Concurrency: a job clone (``numjobs`` makes clones) keeps ``iodepth`` blocks in flight,
in calls of ``iodepth_batch`` blocks (fio's iodepth_batch_submit), so up to
``iodepth / iodepth_batch`` calls at once. How depends on the engine:

* **async** (engines with ``asynchronous``: wqs, rawsock, null), as fio's libaio engine:
  one thread per clone starts a call into every free slot (``start_put`` /
  ``start_get``), then waits until at least one is complete (``wait_any``), reaps every
  complete one and refills its slot. Each slot has its own out buffers. An IO's latency
  (fio's ``lat``) runs from just before its call was started to the moment the wait
  that saw it complete returned; its submission latency (``slat``) is the time the
  start call took, and ``clat`` = lat - slat.
* **threads** (redis, files): ``iodepth / iodepth_batch`` threads, each issuing one
  call and waiting for it. Every IO of a call is timed from just before the call to its
  return: its completion latency, and, as for fio's synchronous engines, submission
  latency is not separate (slat N=0).

Either way the runner counts the blocks in flight: their maximum in the timed part
(``wqs.inflight_max``), fio's ``IO depths`` (blocks in flight when each call was
submitted, weighted by its blocks), and the blocks per submission and per reap
(fio's ``submit`` / ``complete`` lines); and how many threads did the job's IO
(``wqs.io_threads``, ``wqs.io_model``).

Offsets: sequential jobs walk the slots in order; random jobs visit every slot once per
pass in a fresh random order (fio's random map), seeded by ``randseed``. A job that
reads lays out its data set first, outside the timed part: every slot that does not
exist yet is written with verifiable contents (`bench.blocks`).

CPU per request (`bench.usage`): the client's getrusage and every server's usage are read
when the timed part starts (after the ramp) and when its last thread has finished; the
differences, divided by the IOs counted, are per run group, since the process and the
servers are shared by every job of the group (see `_attach_usage`).
"""

from __future__ import annotations

import random
import resource
import sys
import threading
import time
from array import array
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from .blocks import block_id, check, content
from .engines import Engine
from .fioparse import JobSpec, num2str
from .report import DDIRS, DirData, JobResult
from .usage import Reading, servers_report, snapshot, usage_report
from wqs.procstat import ProcessUsage, self_usage

READ, WRITE = 0, 1
LAYOUT_CALL_BYTES = 8 << 20
EIO, EILSEQ = 5, 84
MAX_ERRORS_KEPT = 50


def depth_bucket(n: int) -> int:
    """fio's io_u_map index for n IOs in flight: 1, 2-3, 4-7, 8-15, 16-31, 32-63, >=64."""
    return 6 if n >= 64 else max(0, n.bit_length() - 1)


def batch_bucket(n: int) -> int:
    """fio's io_u_submit / io_u_complete index for n IOs in one submission or reap:
    0, 1-4, 5-8, 9-16, 17-32, 33-64, >64."""
    if n <= 0:
        return 0
    return 6 if n > 64 else max(1, (n - 1).bit_length() - 1)


class Recorder:
    """One worker thread's samples: appended without locks, merged after the run."""

    __slots__ = ("ctx", "lat", "slat", "end", "nbytes", "extras", "progress", "depth",
                 "submits", "completes")

    def __init__(self, ctx: "RunContext") -> None:
        self.ctx = ctx
        self.lat = (array("q"), array("q"))
        self.slat: tuple[array, array] | None = None  # async workers: submission latency
        self.end = (array("q"), array("q"))
        self.nbytes = (array("q"), array("q"))
        self.extras: dict[str, array] = {}
        self.progress = ctx.progress
        # fio's IO depths, submit and complete distributions (counted after the ramp)
        self.depth = [0] * 7  # IOs, by blocks in flight when their call was submitted
        self.submits = [0] * 7  # submissions, by blocks per submission
        self.completes = [0] * 7  # reaps, by blocks completed per reap

    def mark_submit(self, depth: int, nr: int, t0_ns: int) -> None:
        """nr blocks submitted in one call at t0_ns, `depth` blocks in flight with them."""
        if t0_ns < self.ctx.ramp_end_ns:
            return
        self.depth[depth_bucket(depth)] += nr
        self.submits[batch_bucket(nr)] += 1

    def mark_complete(self, nr: int, t_ns: int) -> None:
        if nr and t_ns >= self.ctx.ramp_end_ns:
            self.completes[batch_bucket(nr)] += 1

    def record_async(self, ddir: int, lat_ns: int, slat_ns: int, t0_ns: int,
                     nbytes: int) -> None:
        """record() with the IO's submission latency (an asynchronous engine's)."""
        base = self.ctx.ramp_end_ns
        if t0_ns < base:
            return
        self.lat[ddir].append(lat_ns)
        self.slat[ddir].append(slat_ns)  # type: ignore[index]
        self.end[ddir].append(t0_ns + lat_ns - base)
        self.nbytes[ddir].append(nbytes)
        p = self.progress
        p[ddir * 2] += 1
        p[ddir * 2 + 1] += nbytes

    def record(self, ddir: int, lat_ns: int, t0_ns: int, nbytes: int) -> None:
        base = self.ctx.ramp_end_ns
        if t0_ns < base:
            return
        self.lat[ddir].append(lat_ns)
        self.end[ddir].append(t0_ns + lat_ns - base)
        self.nbytes[ddir].append(nbytes)
        p = self.progress
        p[ddir * 2] += 1
        p[ddir * 2 + 1] += nbytes

    def extra(self, name: str, lat_ns: int, t0_ns: int) -> None:
        if t0_ns < self.ctx.ramp_end_ns:
            return
        self.extras.setdefault(name, array("q")).append(lat_ns)


class Clone:
    """One of a job's numjobs copies: its slots, its offset pattern, its counters."""

    def __init__(self, spec: JobSpec, index: int, groupid: int, engine: Engine,
                 seed: int) -> None:
        self.spec = spec
        self.index = index
        self.groupid = groupid
        self.engine = engine
        self.name = spec.name
        self.namespace = spec.filename or f"{spec.name}.{index}.0"
        self.slot_size = spec.slot_size
        self.nslots = spec.nslots
        self.lock = threading.Lock()
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)
        self.perm: np.ndarray | None = None
        self.pos = 0
        self.issued = 0
        self.written = bytearray(self.nslots) if (spec.verify and spec.writes) else None
        self.recorders: list[Recorder] = []
        self.errors: list[str] = []
        self.error = 0
        self.failed = False
        self.misses = 0
        self.verify_errors = 0
        self.verified = 0
        self.failed_puts = 0
        self.layout_blocks = 0
        self.done_ns = 0
        self.payload = random.Random(seed ^ 0x5EED).randbytes(self.slot_size)
        self.deadline_ns: int | None = None
        self.active = 0
        # how the IO was driven (run_group), and the blocks in flight (the workers)
        self.io_model = ""
        self.io_threads = 0
        self.inflight = 0
        self.inflight_max = 0  # in the timed part
        self.item_errors: dict[str, list] = {}  # failed blocks' reasons: kind -> [n, first]
        # prefix workloads fill these in (bench.kvcache)
        self.kv: Any = None
        self.system: Any = None
        self.block_bytes = 0
        self.kv_per_token = 0
        self.model_name = ""
        self.attention = ""

    # ---- offsets -----------------------------------------------------------------

    def next_batch(self, n: int, ctx: "RunContext") -> tuple[int, list[tuple[int, int]]] | None:
        spec = self.spec
        with self.lock:
            counting = time.perf_counter_ns() >= ctx.ramp_end_ns
            limit = spec.limit_bytes
            if not spec.time_based and counting and limit and self.issued >= limit:
                return None
            ddir = READ if self.rng.random() * 100 < spec.read_pct else WRITE
            lo, hi = spec.bs_range(ddir)
            items = []
            for _ in range(n):
                length = lo if lo == hi else lo * self.rng.randint(1, hi // lo)
                if not spec.time_based and counting and limit and self.issued + length > limit:
                    break  # like fio: no IO past the end of the data set
                if spec.random:
                    if self.perm is None or self.pos >= len(self.perm):
                        self.perm = self.np_rng.permutation(self.nslots)
                        self.pos = 0
                    slot = int(self.perm[self.pos])
                else:
                    if self.perm is not None or self.pos >= self.nslots:
                        self.pos = 0
                        self.perm = None
                    slot = self.pos
                self.pos += 1
                items.append((slot, length))
                if counting:
                    self.issued += length
                if not spec.time_based and counting and limit and self.issued >= limit:
                    break
            return (ddir, items) if items else None

    def block(self, slot: int) -> bytes:
        return block_id(self.namespace, slot * self.slot_size, self.slot_size)

    def layout_length(self, slot: int) -> int:
        lo, hi = self.spec.bs_range(READ)
        if lo == hi:
            return lo
        return lo * random.Random(slot * 7919 + 17).randint(1, hi // lo)

    # ---- outcomes ----------------------------------------------------------------

    def fail(self, message: str, errno: int = EIO) -> None:
        with self.lock:
            self.failed = True
            if not self.error:
                self.error = errno
            if len(self.errors) < MAX_ERRORS_KEPT:
                self.errors.append(message)

    def note_verify(self, message: str) -> None:
        with self.lock:
            self.verify_errors += 1
            if not self.error:
                self.error = EILSEQ
            if len(self.errors) < MAX_ERRORS_KEPT:
                self.errors.append(message)

    def note(self, **counts: int) -> None:
        with self.lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def note_reasons(self, reasons: dict[int, str]) -> None:
        """Why blocks of a call failed (counted by kind, the first message kept): a
        failed put or a get that missed for a reason other than absence."""
        with self.lock:
            for why in reasons.values():
                kind = why.split(":", 1)[0]
                entry = self.item_errors.get(kind)
                if entry is None:
                    self.item_errors[kind] = [1, why]
                else:
                    entry[0] += 1

    def enter(self, n: int, t0_ns: int, ctx: "RunContext") -> int:
        """n blocks go in flight (thread-per-call workers; under the lock): the depth."""
        with self.lock:
            self.inflight += n
            depth = self.inflight
            if depth > self.inflight_max and t0_ns >= ctx.ramp_end_ns:
                self.inflight_max = depth
        return depth

    def leave(self, n: int) -> None:
        with self.lock:
            self.inflight -= n


class RunContext:
    def __init__(self, ramp_s: float, runtime_s: float | None) -> None:
        self.start_ns = 0
        self.ramp_end_ns = 0
        self.deadline_ns: int | None = None
        self.ramp_s = ramp_s
        self.runtime_s = runtime_s
        self.stop = threading.Event()
        self.progress = [0, 0, 0, 0]  # read ios, read bytes, write ios, write bytes

    def begin(self) -> None:
        self.start_ns = time.perf_counter_ns()
        self.ramp_end_ns = self.start_ns + int(self.ramp_s * 1e9)
        if self.runtime_s:
            self.deadline_ns = self.ramp_end_ns + int(self.runtime_s * 1e9)

    def should_stop(self, clone: Clone) -> bool:
        if self.stop.is_set() or clone.failed:
            return True
        deadline = clone.deadline_ns if clone.deadline_ns is not None else self.deadline_ns
        return deadline is not None and time.perf_counter_ns() >= deadline


# ------------------------------------------------------------------------ fio workers


def fio_worker(ctx: RunContext, clone: Clone, rec: Recorder) -> None:
    spec, eng = clone.spec, clone.engine
    batch = spec.iodepth_batch
    full = [eng.buffer(clone.slot_size) for _ in range(batch)]
    payload = _payload(clone, eng)
    verify = spec.verify is not None
    clock = time.perf_counter_ns
    stores = eng.stores
    while not ctx.should_stop(clone):
        nb = clone.next_batch(batch, ctx)
        if nb is None:
            break
        ddir, items = nb
        ids = [clone.block(slot) for slot, _ in items]
        try:
            nr = len(items)
            if ddir == WRITE:
                bufs = [content(b, n) if verify else payload[:n] for b, (_, n) in zip(ids, items)]
                t0 = clock()
                rec.mark_submit(clone.enter(nr, t0, ctx), nr, t0)
                ok = eng.put(ids, bufs)
                lat = clock() - t0
                clone.leave(nr)
                rec.mark_complete(nr, t0 + lat)
                bad = 0
                for (slot, n), good in zip(items, ok):
                    rec.record(WRITE, lat, t0, n if good else 0)
                    if not good:
                        bad += 1
                    elif clone.written is not None:
                        clone.written[slot] = 1
                if bad:
                    clone.note(failed_puts=bad)
            else:
                outs = full[: len(items)] if stores else \
                    [memoryview(full[k])[:n] for k, (_, n) in enumerate(items)]
                t0 = clock()
                rec.mark_submit(clone.enter(nr, t0, ctx), nr, t0)
                got = eng.get(ids, outs)
                lat = clock() - t0
                clone.leave(nr)
                rec.mark_complete(nr, t0 + lat)
                for k, ((slot, _), n) in enumerate(zip(items, got)):
                    rec.record(READ, lat, t0, n or 0)
                    if n is None:
                        clone.note(misses=1)
                        if verify:
                            clone.note_verify(_verify_msg(clone, slot, ids[k], check(ids[k], None)))
                    elif verify:
                        problem = check(ids[k], memoryview(full[k])[:n])
                        if problem:
                            clone.note_verify(_verify_msg(clone, slot, ids[k], problem))
                        else:
                            clone.note(verified=1)
        except Exception as e:  # noqa: BLE001 - any engine failure ends the job, like fio
            clone.fail(f"{spec.name}: {type(e).__name__}: {e}")
            break


def _payload(clone: Clone, eng: Engine) -> memoryview:
    """The bytes every write sends (without verify), in a buffer of the engine's."""
    buf = eng.buffer(len(clone.payload))
    buf[:] = clone.payload
    return buf


class _Slot:
    """One call's place in an async worker: its out buffers and the call in flight."""

    __slots__ = ("bufs", "handle", "ddir", "items", "ids", "keep", "t0", "slat")

    def __init__(self, size: int, batch: int, alloc: Callable[[int], Any]) -> None:
        self.bufs = [alloc(size) for _ in range(batch)]  # this slot's get targets
        self.handle: Any = None
        self.ddir = READ
        self.items: list[tuple[int, int]] = []
        self.ids: list[bytes] = []
        self.keep: list[Any] = []  # a put's buffers, alive until its call is complete
        self.t0 = 0
        self.slat = 0


def fio_async_worker(ctx: RunContext, clone: Clone, rec: Recorder) -> None:
    """The clone's only IO thread: iodepth / iodepth_batch calls in flight at once
    through the engine's start_*/wait_any (fio's libaio engine with iodepth=N,
    iodepth_batch_submit=B, iodepth_batch_complete_min=1)."""
    spec, eng = clone.spec, clone.engine
    batch = spec.iodepth_batch
    free = [_Slot(clone.slot_size, batch, eng.buffer)
            for _ in range(max(1, spec.iodepth // batch))]
    busy: list[_Slot] = []
    payload = _payload(clone, eng)
    verify = spec.verify is not None
    stores = eng.stores
    clock = time.perf_counter_ns
    done, ramp_end = eng.done, ctx.ramp_end_ns
    rec.slat = (array("q"), array("q"))
    stopping = False
    try:
        while True:
            while free and not stopping:  # fill every free slot
                nb = None if ctx.should_stop(clone) else clone.next_batch(batch, ctx)
                if nb is None:
                    stopping = True
                    break
                slot = free.pop()
                _start(clone, eng, slot, nb, payload, verify, stores, clock)
                busy.append(slot)
                nr = len(slot.items)
                clone.inflight += nr  # only this thread touches the clone's count
                if clone.inflight > clone.inflight_max and slot.t0 >= ramp_end:
                    clone.inflight_max = clone.inflight
                rec.mark_submit(clone.inflight, nr, slot.t0)
            if not busy:
                break
            if not any(done(s.handle) for s in busy):
                eng.wait_any([s.handle for s in busy])
            now = clock()
            still: list[_Slot] = []
            reaped = 0
            for s in busy:
                if done(s.handle):
                    _complete(clone, eng, s, now, rec, verify)
                    reaped += len(s.items)
                    free.append(s)
                else:
                    still.append(s)
            busy = still
            clone.inflight -= reaped
            rec.mark_complete(reaped, now)
    except Exception as e:  # noqa: BLE001 - any engine failure ends the job, like fio
        clone.fail(f"{spec.name}: {type(e).__name__}: {e}")


def _start(clone: Clone, eng: Engine, slot: _Slot, nb: tuple[int, list[tuple[int, int]]],
           payload: memoryview, verify: bool, stores: bool, clock: Callable[[], int]) -> None:
    ddir, items = nb
    ids = [clone.block(s) for s, _ in items]
    slot.ddir, slot.items, slot.ids = ddir, items, ids
    if ddir == WRITE:
        bufs = [content(b, n) if verify else payload[:n] for b, (_, n) in zip(ids, items)]
        slot.keep = bufs
        t0 = clock()
        slot.handle = eng.start_put(ids, bufs)
    else:
        outs = slot.bufs[: len(items)] if stores else \
            [memoryview(slot.bufs[k])[:n] for k, (_, n) in enumerate(items)]
        slot.keep = outs
        t0 = clock()
        slot.handle = eng.start_get(ids, outs)
    slot.slat = clock() - t0
    slot.t0 = t0


def _complete(clone: Clone, eng: Engine, slot: _Slot, now: int, rec: Recorder,
              verify: bool) -> None:
    lat, slat, t0, items, ids = now - slot.t0, slot.slat, slot.t0, slot.items, slot.ids
    if slot.ddir == WRITE:
        ok, reasons = eng.finish_put(slot.handle)
        bad = 0
        for (s, n), good in zip(items, ok):
            rec.record_async(WRITE, lat, slat, t0, n if good else 0)
            if not good:
                bad += 1
            elif clone.written is not None:
                clone.written[s] = 1
        if bad:
            clone.note(failed_puts=bad)
    else:
        got, reasons = eng.finish_get(slot.handle)
        for k, ((s, _), n) in enumerate(zip(items, got)):
            rec.record_async(READ, lat, slat, t0, n or 0)
            if n is None:
                clone.note(misses=1)
                if verify:
                    clone.note_verify(_verify_msg(clone, s, ids[k], check(ids[k], None)))
            elif verify:
                problem = check(ids[k], memoryview(slot.bufs[k])[:n])
                if problem:
                    clone.note_verify(_verify_msg(clone, s, ids[k], problem))
                else:
                    clone.note(verified=1)
    if reasons:
        clone.note_reasons(reasons)
    slot.handle = None
    slot.keep = []


def _verify_msg(clone: Clone, slot: int, bid: bytes, problem: str | None) -> str:
    return (f"verify: {problem} in block {bid.hex()} "
            f"({clone.namespace}, offset={slot * clone.slot_size}, slot {slot})")


# ----------------------------------------------------------------- layout and verify


def layout(clone: Clone, log: Callable[[str], None]) -> None:
    """Write every slot the job will read that does not exist yet (fio lays out its file)."""
    spec, eng = clone.spec, clone.engine
    if spec.workload != "fio" or spec.read_pct == 0 or not eng.stores:
        return
    slots = list(range(clone.nslots))
    ids = [clone.block(s) for s in slots]
    missing: list[int] = []
    for first in range(0, len(ids), 1024):
        found = eng.exists(ids[first:first + 1024])
        missing.extend(s for s, hit in zip(slots[first:first + 1024], found) if not hit)
    if not missing:
        return
    log(f"{clone.name}: Laying out IO data ({len(missing)} of {clone.nslots} blocks / "
        f"{num2str(len(missing) * clone.slot_size, 4, 1024, 'B')})")
    per_call = max(1, LAYOUT_CALL_BYTES // clone.slot_size)
    calls = [missing[i:i + per_call] for i in range(0, len(missing), per_call)]

    def put(call: list[int]) -> int:
        bufs = [content(ids[s], clone.layout_length(s)) for s in call]
        ok = eng.put([ids[s] for s in call], bufs)
        return sum(1 for x in ok if not x)

    with ThreadPoolExecutor(min(4, max(1, spec.iodepth))) as pool:
        failed = sum(pool.map(put, calls))
    clone.layout_blocks = len(missing) - failed
    if failed:
        clone.fail(f"{clone.name}: layout: {failed} blocks could not be written "
                   "(is the store large enough for size=?)")


def verify_written(clone: Clone) -> None:
    """After a write job with verify: read back every block it wrote and check it."""
    if clone.written is None or clone.failed:
        return
    slots = [s for s in range(clone.nslots) if clone.written[s]]
    per_call = max(1, LAYOUT_CALL_BYTES // clone.slot_size)
    eng = clone.engine

    def run(call: list[int]) -> None:
        outs = [bytearray(clone.slot_size) for _ in call]
        ids = [clone.block(s) for s in call]
        got = eng.get(ids, outs)
        for s, b, out, n in zip(call, ids, outs, got):
            problem = check(b, None if n is None else memoryview(out)[:n])
            if problem:
                if n is None:
                    clone.note(misses=1)
                clone.note_verify(_verify_msg(clone, s, b, problem))
            else:
                clone.note(verified=1)

    with ThreadPoolExecutor(min(4, max(1, clone.spec.iodepth))) as pool:
        list(pool.map(run, [slots[i:i + per_call] for i in range(0, len(slots), per_call)]))


# ---------------------------------------------------------------------- prefix setup


def setup_prefix(clone: Clone) -> None:
    from . import kvcache

    spec = clone.spec
    if spec.kv_bytes_per_token:
        clone.kv_per_token = spec.kv_bytes_per_token
        clone.model_name = spec.model
        clone.attention = "custom"
    else:
        shape = kvcache.model_shape(spec.model)
        clone.kv_per_token = shape.kv_bytes_per_token(spec.kv_dtype)
        clone.model_name = shape.name
        clone.attention = shape.attention
    clone.block_bytes = clone.kv_per_token * spec.block_tokens
    clone.namespace = spec.filename or f"{clone.model_name}/{spec.kv_dtype}/{spec.block_tokens}"
    clone.kv = kvcache.PrefixStats()
    clone.system = kvcache.system_prompt(spec.seed, spec.system_prompt_tokens)
    clone.payload = bytes(random.Random(spec.seed).getrandbits(8) for _ in range(4096)) * \
        (clone.block_bytes // 4096 + 1)
    clone.payload = clone.payload[: clone.block_bytes]


# ------------------------------------------------------------------------- the run


def _status_char(spec: JobSpec) -> str:
    if spec.workload == "prefix":
        return "P"
    return {"read": "R", "randread": "r", "write": "W", "randwrite": "w", "rw": "M",
            "randrw": "m"}[spec.rw]


class Eta:
    """fio's ETA line, drawn with rich on stderr while the jobs run."""

    def __init__(self, mode: str, ctx: RunContext, clones: list[Clone]) -> None:
        self.ctx, self.clones = ctx, clones
        self.enabled = mode == "always" or (mode == "auto" and sys.stderr.isatty())
        self.live = None
        self.last = (time.perf_counter(), [0, 0, 0, 0])
        self.total_s = (ctx.ramp_s or 0) + (ctx.runtime_s or 0)
        self.limit = sum(c.spec.limit_bytes for c in clones if not c.spec.time_based
                         and c.spec.workload == "fio")

    def __enter__(self) -> "Eta":
        if self.enabled:
            from rich.console import Console
            from rich.live import Live

            self.live = Live(self.render(), console=Console(stderr=True), transient=True,
                             refresh_per_second=2, get_renderable=self.render)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def render(self) -> Any:
        from rich.text import Text

        now = time.perf_counter()
        t_prev, prev = self.last
        cur = list(self.ctx.progress)
        dt = max(now - t_prev, 1e-6)
        if dt >= 0.45:
            self.last = (now, cur)
        rates = [(cur[i] - prev[i]) / dt for i in range(4)]
        running = [c for c in self.clones if c.active > 0]
        kinds: dict[str, int] = {}
        for c in running:
            ch = _status_char(c.spec)
            kinds[ch] = kinds.get(ch, 0) + 1
        state = "".join(f"{k}({v})" for k, v in kinds.items()) or "_"
        elapsed = (time.perf_counter_ns() - self.ctx.start_ns) / 1e9 if self.ctx.start_ns else 0
        pct, eta = 0.0, 0.0
        if self.total_s:
            pct = min(100.0, elapsed / self.total_s * 100)
            eta = max(0.0, self.total_s - elapsed)
        if self.limit:
            done = (cur[1] + cur[3]) / self.limit * 100
            if not self.total_s or done > pct:
                pct = min(100.0, done)
                eta = elapsed * (100 - pct) / pct if pct else 0
        mins, secs = divmod(int(eta + 0.5), 60)
        line = (f"Jobs: {len(running)} (f={len(running)}): [{state}][{pct:.1f}%]"
                f"[r={num2str(rates[1], 4, 1024, 'B/s')},w={num2str(rates[3], 4, 1024, 'B/s')}]"
                f"[r={num2str(rates[0], 4)},w={num2str(rates[2], 4)} IOPS][eta {mins:02d}m:{secs:02d}s]")
        return Text(line)


def run_group(clones: list[Clone], eta_mode: str, log: Callable[[str], None]) -> list[JobResult]:
    """Run one reporting group: every clone at once; results per clone."""
    from . import kvcache

    specs = [c.spec for c in clones]
    for c in clones:
        if c.spec.workload == "prefix":
            setup_prefix(c)
        else:
            layout(c, log)
    ramp = max(s.ramp_time for s in specs)
    runtimes = [s.runtime for s in specs if s.runtime]
    ctx = RunContext(ramp, max(runtimes) if runtimes else None)
    threads: list[threading.Thread] = []
    for c in clones:
        if c.spec.workload == "prefix":  # a thread per conversation stream
            c.io_model, nthreads = "streams", c.spec.iodepth
        elif c.engine.asynchronous:  # one thread keeps every call in flight
            c.io_model, nthreads = "async", 1
        else:  # a thread per call in flight
            c.io_model, nthreads = "threads", max(1, c.spec.iodepth // c.spec.iodepth_batch)
        c.io_threads = nthreads
        for k in range(nthreads):
            rec = Recorder(ctx)
            c.recorders.append(rec)
            if c.spec.workload == "prefix":
                target: Callable[..., None] = _prefix_thread
                args: tuple = (ctx, c, k, rec)
            elif c.io_model == "async":
                target, args = fio_async_worker, (ctx, c, rec)
            else:
                target, args = fio_worker, (ctx, c, rec)
            threads.append(threading.Thread(target=_thread, args=(c, target, args), daemon=True,
                                            name=f"wqs-bench-{c.name}.{c.index}.{k}"))
            c.active += 1
    engines = list({id(c.engine): c.engine for c in clones}.values())
    usage0: UsageSnapshot | None = None
    if not ramp:  # before the clock starts: a first Stats call also connects (ms)
        usage0 = _usage_snapshot(engines, start=True)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    wall0 = time.perf_counter()
    started = time.time()
    ctx.begin()
    for c in clones:  # a job with a shorter runtime than the group's stops on its own
        c.deadline_ns = ctx.ramp_end_ns + int(c.spec.runtime * 1e9) if c.spec.runtime else None
    with Eta(eta_mode, ctx, clones):
        for t in threads:
            t.start()
        try:
            if ramp:  # the ramp's IOs are not counted, so neither is its CPU
                _wait_for_ramp(ctx, threads)
                usage0 = _usage_snapshot(engines, start=True)
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        except KeyboardInterrupt:
            ctx.stop.set()
            for t in threads:
                t.join(5)
            log("wqs-bench: interrupted")
    end_ns = time.perf_counter_ns()
    wall = time.perf_counter() - wall0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    # Read before the write jobs' read-back below, which is not part of the timed IOs.
    usage1 = _usage_snapshot(engines, start=False)
    for c in clones:
        if c.spec.workload == "fio":
            verify_written(c)
    usr = (ru1.ru_utime - ru0.ru_utime) / wall * 100 if wall else 0.0
    sys_ = (ru1.ru_stime - ru0.ru_stime) / wall * 100 if wall else 0.0
    ctxsw = (ru1.ru_nvcsw - ru0.ru_nvcsw) + (ru1.ru_nivcsw - ru0.ru_nivcsw)
    results = []
    for c in clones:
        r = JobResult(spec=c.spec, name=c.name, groupid=c.groupid, clone=c.index,
                      started=started, engine=c.engine.describe())
        for ddir, dname in enumerate(DDIRS):
            r.dirs[dname] = DirData(
                lat=np.concatenate([np.frombuffer(rec.lat[ddir], np.int64) for rec in c.recorders])
                if c.recorders else np.zeros(0, np.int64),
                end=np.concatenate([np.frombuffer(rec.end[ddir], np.int64) for rec in c.recorders])
                if c.recorders else np.zeros(0, np.int64),
                nbytes=np.concatenate([np.frombuffer(rec.nbytes[ddir], np.int64)
                                       for rec in c.recorders])
                if c.recorders else np.zeros(0, np.int64),
                slat=np.concatenate([np.frombuffer(rec.slat[ddir], np.int64)
                                     for rec in c.recorders])
                if c.recorders and all(rec.slat is not None for rec in c.recorders) else None,
            )
        names = {k for rec in c.recorders for k in rec.extras}
        r.extra_lat = {k: np.concatenate([np.frombuffer(rec.extras[k], np.int64)
                                          for rec in c.recorders if k in rec.extras])
                       for k in names}
        done = c.done_ns or end_ns
        r.runtime_ns = max(0, done - ctx.ramp_end_ns)
        r.error = c.error
        r.errors = list(c.errors)
        r.misses, r.verify_errors, r.verified = c.misses, c.verify_errors, c.verified
        r.failed_puts, r.layout_blocks = c.failed_puts, c.layout_blocks
        r.io_model, r.io_threads, r.inflight_max = c.io_model, c.io_threads, c.inflight_max
        r.item_errors = {k: {"count": n, "first": why} for k, (n, why) in c.item_errors.items()}
        if c.spec.workload == "fio":  # the prefix replay keeps none: fio's IO depths as set
            r.depth_hist = [sum(x) for x in zip(*(rec.depth for rec in c.recorders))]
            r.submit_hist = [sum(x) for x in zip(*(rec.submits for rec in c.recorders))]
            r.complete_hist = [sum(x) for x in zip(*(rec.completes for rec in c.recorders))]
        r.usr_cpu, r.sys_cpu, r.ctx = usr, sys_, ctxsw
        r.majf = ru1.ru_majflt - ru0.ru_majflt
        r.minf = ru1.ru_minflt - ru0.ru_minflt
        if c.kv is not None:
            r.kvcache = kvcache.summary(c)
            if c.kv.c["failed_puts"]:
                r.failed_puts += c.kv.c["failed_puts"]
        results.append(r)
    _attach_usage(clones, results, usage0, usage1)
    return results


# (the client's usage, {id(engine): {server name: usage or why not}})
UsageSnapshot = tuple[ProcessUsage, dict[int, dict[str, Reading]]]


def _usage_snapshot(engines: list[Engine], start: bool) -> UsageSnapshot:
    # Reading a daemon is a gRPC call (the first one also connects) that costs this
    # process CPU: read the client after the servers at the start and before them at
    # the end, so that none of it lands inside the client's interval.
    if start:
        servers = {id(e): snapshot(e.server_usage) for e in engines if e.server_usage}
        return self_usage(), servers
    client = self_usage()
    return client, {id(e): snapshot(e.server_usage) for e in engines if e.server_usage}


def _wait_for_ramp(ctx: RunContext, threads: list[threading.Thread]) -> None:
    while not ctx.stop.is_set() and any(t.is_alive() for t in threads):
        left = ctx.ramp_end_ns - time.perf_counter_ns()
        if left <= 0:
            return
        time.sleep(min(0.05, left / 1e9))


def _attach_usage(clones: list[Clone], results: list[JobResult],
                  before: UsageSnapshot | None, after: UsageSnapshot) -> None:
    """Fill every result's ``cpu_client`` and ``cpu_daemon`` (per request).

    All jobs of a run group run in this one process, so the client's CPU is divided by
    the IOs of the whole group, and every job of the group shows that same figure
    (``scope: "group"``; ``"job"`` when the group has one job). A server's CPU is divided
    by the IOs of the group's jobs that use that server: with two jobs on one cluster, its
    daemons' CPU is theirs together; a group mixing engines still gives each its own
    servers' figure."""
    ios = [sum(r.dirs[d].n for d in DDIRS) for r in results]
    group_scope = "job" if len(clones) == 1 else "group"
    if before is None:  # interrupted during the ramp: no reading of the start
        for r in results:
            r.cpu_client = {"scope": group_scope, "requests": sum(ios),
                            "error": "interrupted before the timed part began"}
        return
    client = usage_report(before[0], after[0], sum(ios), group_scope)
    for c, r in zip(clones, results):
        r.cpu_client = client
        if not c.engine.has_server:
            continue  # files, null: everything happens in this process
        mates = [k for k, other in enumerate(clones) if other.engine is c.engine]
        scope = "job" if len(mates) == 1 else "group"
        requests = sum(ios[k] for k in mates)
        if not c.engine.server_usage:
            r.cpu_daemon = {"scope": scope, "requests": requests,
                            "error": f"not measured: ioengine={c.engine.name}'s server was "
                                     "not started by this benchmark, so its process cannot "
                                     "be read"}
            continue
        key = id(c.engine)
        r.cpu_daemon = servers_report(c.engine.server_usage, before[1].get(key, {}),
                                      after[1].get(key, {}), requests, scope)


def _thread(clone: Clone, target: Callable[..., None], args: tuple) -> None:
    try:
        target(*args)
    finally:
        with clone.lock:
            clone.active -= 1
            clone.done_ns = max(clone.done_ns, time.perf_counter_ns())


def _prefix_thread(ctx: RunContext, clone: Clone, stream: int, rec: Recorder) -> None:
    from . import kvcache

    try:
        kvcache.replay_stream(ctx, clone, stream, rec)
    except Exception as e:  # noqa: BLE001
        clone.fail(f"{clone.name}: {type(e).__name__}: {e}")
