"""IO rings on a real file with O_DIRECT (native AIO and the thread fallback) and on the
memory device, driven by a real event loop, including the kernel's own errors."""

from __future__ import annotations

import errno
import logging
import os
import random

import pytest

from tests import spdk_mode
from tests.conftest import MiB
from wqs.config import EngineConfig
from wqs.engine import Engine
from wqs.errors import DeviceError
from wqs.loop.reactor import Reactor
from wqs.nvme import DirectDevice, aio
from wqs.nvme.buffers import IoBuffer
from wqs.nvme.device import DevicePart, watch_ring
from wqs.nvme.memdevice import MemoryDevice

BLOCK = 4096


@pytest.fixture(params=["spdk"] if spdk_mode.ACTIVE else ["aio", "threads", "memory"])
def device(request, tmp_path):
    if request.param == "spdk":  # the namespace through SPDK (tests/spdk_mode.py)
        yield spdk_mode.namespace().device
        return
    if request.param == "aio" and (reason := aio.unavailable_reason()) is not None:
        pytest.skip(f"native AIO is not available here: {reason}")
    if request.param == "memory":
        yield MemoryDevice(8 * MiB)
        return
    dev = DirectDevice.create_file(str(tmp_path / "dev"), 8 * MiB, io_engine=request.param,
                                   io_threads=4)
    assert dev.io_engine == request.param
    yield dev
    dev.close()


class Driver:
    """A ring on a reactor, with every completion recorded as (tag, result)."""

    def __init__(self, device, ring=None) -> None:
        self.loop = Reactor()
        self.ring = ring or device.open_ring()
        watch_ring(self.loop, self.ring)
        self.loop.on_turn_end(self.ring.submit)
        self.done: list[tuple[object, int]] = []

    def record(self, tag, res) -> None:
        self.done.append((tag, res))

    def run(self, n: int) -> None:
        assert self.loop.run_until(lambda: len(self.done) >= n, timeout_s=20), self.done

    def close(self) -> None:
        self.ring.close()
        self.loop.close()


def _filled(n: int, size: int = BLOCK) -> list[IoBuffer]:
    rng = random.Random(n)
    bufs = [IoBuffer(size) for _ in range(n)]
    for b in bufs:
        b.view[:size] = rng.randbytes(size)
    return bufs


def test_round_trip_of_more_ios_than_the_ring_holds(device):
    """IOs beyond the ring's depth wait and go out as earlier ones complete; every
    callback runs once with the full length, and the bytes come back."""
    drv = Driver(device)
    n = aio.RING_DEPTH + 44
    out = _filled(n)
    for i, b in enumerate(out):
        drv.ring.writev(i * BLOCK, [(b.addr, BLOCK)], drv.record, ("w", i))
    drv.run(n)
    assert sorted(drv.done) == [(("w", i), BLOCK) for i in range(n)]
    back = [IoBuffer(BLOCK) for _ in range(n)]
    drv.done.clear()
    for i, b in enumerate(back):
        drv.ring.read(i * BLOCK, b.addr, BLOCK, drv.record, ("r", i))
    drv.run(n)
    assert sorted(drv.done) == [(("r", i), BLOCK) for i in range(n)]
    assert all(bytes(a.view) == bytes(b.view) for a, b in zip(out, back))
    assert drv.ring.pending == 0
    drv.close()


def test_a_vectored_write_lands_back_to_back(device):
    drv = Driver(device)
    sizes = [BLOCK, 2 * BLOCK, BLOCK, 3 * BLOCK, BLOCK]
    parts = [IoBuffer(n) for n in sizes]
    rng = random.Random(3)
    for p, n in zip(parts, sizes):
        p.view[:n] = rng.randbytes(n)
    drv.ring.writev(8 * BLOCK, [(p.addr, n) for p, n in zip(parts, sizes)], drv.record, "v",
                    dsync=True)
    drv.run(1)
    assert drv.done == [("v", sum(sizes))]
    whole = IoBuffer(sum(sizes))
    drv.ring.read(8 * BLOCK, whole.addr, sum(sizes), drv.record, "r")
    drv.run(2)
    assert bytes(whole.view[: sum(sizes)]) == b"".join(bytes(p.view[:n])
                                                       for p, n in zip(parts, sizes))
    drv.close()


@pytest.mark.parametrize("engine", ["aio", "threads"])
def test_a_misaligned_buffer_fails_with_the_kernels_error_and_the_rest_complete(tmp_path,
                                                                                engine):
    if engine == "aio" and (reason := aio.unavailable_reason()) is not None:
        pytest.skip(f"native AIO is not available here: {reason}")
    dev = DirectDevice.create_file(str(tmp_path / "dev"), MiB, io_engine=engine, io_threads=2)
    drv = Driver(dev)
    good = _filled(2)
    odd = IoBuffer(2 * BLOCK)
    drv.ring.writev(0, [(good[0].addr, BLOCK)], drv.record, "a")
    drv.ring.writev(BLOCK, [(odd.addr + 1, BLOCK)], drv.record, "odd")  # not aligned
    drv.ring.writev(2 * BLOCK, [(good[1].addr, BLOCK)], drv.record, "b")
    drv.run(3)
    results = dict(drv.done)
    assert results["a"] == BLOCK and results["b"] == BLOCK
    assert results["odd"] == -errno.EINVAL
    drv.done.clear()
    back = IoBuffer(BLOCK)
    drv.ring.read(2 * BLOCK, back.addr, BLOCK, drv.record, "r")  # and the ring goes on
    drv.run(1)
    assert drv.done == [("r", BLOCK)] and bytes(back.view) == bytes(good[1].view)
    drv.close()
    dev.close()


def test_a_read_past_the_end_of_the_file_is_short(tmp_path):
    dev = DirectDevice.create_file(str(tmp_path / "dev"), MiB, io_engine="threads")
    drv = Driver(dev)
    buf = IoBuffer(2 * BLOCK)
    drv.ring.read(MiB - BLOCK, buf.addr, 2 * BLOCK, drv.record, "r")
    drv.run(1)
    assert drv.done == [("r", BLOCK)]  # callers compare against what they asked for
    drv.close()
    dev.close()


def test_io_engine_choice(tmp_path, monkeypatch, caplog):
    path = str(tmp_path / "dev")
    DirectDevice.create_file(path, MiB).close()
    with pytest.raises(DeviceError, match="io_engine must be one of auto, aio, threads"):
        DirectDevice(path, io_engine="uring")
    monkeypatch.setattr(aio, "unavailable_reason", lambda: "io_setup failed: no AIO here")
    with pytest.raises(DeviceError, match="io_engine aio is not available: io_setup failed"):
        DirectDevice(path, io_engine="aio")
    with caplog.at_level(logging.WARNING, logger="wqs.nvme"):
        dev = DirectDevice(path)  # auto: says why it is not using AIO
    try:
        assert dev.io_engine == "threads"
        assert "no AIO here; IO rings use 16 threads instead" in caplog.text
    finally:
        dev.close()


def test_a_second_opener_is_refused_unless_unlocked(tmp_path):
    path = str(tmp_path / "dev")
    first = DirectDevice.create_file(path, MiB)
    with pytest.raises(DeviceError, match="in use by another process"):
        DirectDevice(path)
    shard = DirectDevice(path, lock=False)  # a shard of the daemon holding the lock
    shard.close()
    first.close()


def test_engine_refuses_a_device_opened_with_another_io_engine(tmp_path):
    path = str(tmp_path / "dev")
    device = DirectDevice.create_file(path, 16 * MiB, io_engine="threads")
    config = EngineConfig(region_size=MiB, dram_cache_bytes=0, io_engine="aio")
    try:
        Engine.format(device, config, force=True)
        with pytest.raises(DeviceError, match="opened with io_engine threads, the "
                                              "configuration asks for aio"):
            Engine.open(device, config)
    finally:
        device.close()


def test_an_aio_ring_refuses_use_across_fork_and_a_child_opens_its_own(tmp_path):
    if (reason := aio.unavailable_reason()) is not None:
        pytest.skip(f"native AIO is not available here: {reason}")
    dev = DirectDevice.create_file(str(tmp_path / "dev"), MiB, io_engine="aio")
    drv = Driver(dev)
    data = _filled(1)[0]
    drv.ring.writev(0, [(data.addr, BLOCK)], drv.record, "w")
    drv.run(1)
    pid = os.fork()
    if pid == 0:  # the child: the parent's ring is not ours, a new one is
        code = 1
        try:
            drv.ring.read(0, data.addr, BLOCK, drv.record, "x")
            try:
                drv.ring.submit()
            except DeviceError as e:
                if "cannot be used across fork" in str(e):
                    code = 0
            if code == 0:
                child = Driver(dev)
                back = IoBuffer(BLOCK)
                child.ring.read(0, back.addr, BLOCK, child.record, "r")
                child.run(1)
                code = 0 if bytes(back.view) == bytes(data.view) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    back = IoBuffer(BLOCK)
    drv.ring.read(0, back.addr, BLOCK, drv.record, "r")  # and the parent's still works
    drv.run(2)
    assert bytes(back.view) == bytes(data.view)
    drv.close()
    dev.close()


def test_a_partition_shifts_every_offset_and_stays_inside(device):
    part = DevicePart(device, 2 * MiB, MiB, index=1)
    assert part.path.endswith("#1") and part.size == MiB
    drv = Driver(part)
    data = _filled(1)[0]
    drv.ring.writev(BLOCK, [(data.addr, BLOCK)], drv.record, "w")
    drv.run(1)
    whole = IoBuffer(BLOCK)
    device.read_into(2 * MiB + BLOCK, whole.view[:BLOCK])  # where it landed
    assert bytes(whole.view) == bytes(data.view)
    part.read_into(BLOCK, whole.view[:BLOCK])
    assert bytes(whole.view) == bytes(data.view)
    with pytest.raises(DeviceError, match="outside"):
        part.write(MiB, whole.view[:BLOCK])
    drv.close()


def test_the_memory_device_injects_write_failures_and_torn_writes():
    dev = MemoryDevice(MiB)
    drv = Driver(dev)
    data = _filled(2, 2 * BLOCK)
    dev.tear_write = BLOCK  # the next write keeps its first unit, then fails
    drv.ring.writev(0, [(data[0].addr, 2 * BLOCK)], drv.record, "torn")
    drv.run(1)
    assert drv.done == [("torn", -errno.EIO)]
    back = IoBuffer(2 * BLOCK)
    dev.read_into(0, back.view)
    assert bytes(back.view[:BLOCK]) == bytes(data[0].view[:BLOCK])
    assert bytes(back.view[BLOCK:]) == bytes(BLOCK)
    dev.fail_writes_after = dev.writes
    drv.ring.writev(0, [(data[1].addr, 2 * BLOCK)], drv.record, "refused")
    drv.run(2)
    assert drv.done[-1] == ("refused", -errno.EIO)
    drv.close()
