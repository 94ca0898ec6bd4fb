"""Batches of device IO (read_many/write_many) through native AIO and through threads,
on a real file with O_DIRECT, including the kernel's own errors."""

from __future__ import annotations

import logging
import os
import random

import pytest

from tests.conftest import MiB, run_concurrently
from wqs.config import EngineConfig
from wqs.engine import Engine
from wqs.errors import DeviceError
from wqs.nvme import DirectDevice, aio, aligned_buffer

BLOCK = 4096


@pytest.fixture(params=["aio", "threads"])
def device(request, tmp_path):
    if request.param == "aio" and (reason := aio.unavailable_reason()) is not None:
        pytest.skip(f"native AIO is not available here: {reason}")
    dev = DirectDevice.create_file(str(tmp_path / "dev"), 8 * MiB, io_engine=request.param,
                                   io_threads=4)
    assert dev.io_engine == request.param
    yield dev
    dev.close()


def _buffers(n: int, size: int = BLOCK) -> list[memoryview]:
    return [memoryview(aligned_buffer(size))[:size] for _ in range(n)]


def test_many_round_trip_beyond_one_context(device):
    # More requests than one AIO context holds (MAX_EVENTS): slots are recycled.
    n = aio.MAX_EVENTS + 44
    offsets = random.Random(1).sample(range(device.size // BLOCK), n)
    offsets = [o * BLOCK for o in offsets]
    out = _buffers(n)
    for i, buf in enumerate(out):
        buf[:] = os.urandom(BLOCK)
    device.write_many(iter(list(zip(offsets, out))))  # any iterable, even a one-shot one
    back = _buffers(n)
    completed = []
    device.read_many(list(zip(offsets, back)), completed.append)
    assert sorted(completed) == list(range(n))
    assert all(a == b for a, b in zip(out, back))
    single = _buffers(1)[0]
    device.read_into(offsets[7], single)
    assert single == out[7]


def test_a_misaligned_buffer_fails_with_the_kernels_error_and_the_rest_completes(device):
    raw = bytearray(2 * BLOCK + 1)
    misaligned = memoryview(raw)[1 : 1 + BLOCK]  # O_DIRECT refuses this address
    try:
        device.write(0, misaligned)
    except DeviceError:
        pass
    else:
        pytest.skip(f"{device.path}'s filesystem accepts unaligned O_DIRECT buffers, so the "
                    "kernel returns no error to test")
    good = _buffers(3)
    for buf in good:
        buf[:] = b"x" * BLOCK
    with pytest.raises(DeviceError, match=r"write at 4096 failed: Invalid argument \(1 of 4 IOs"):
        device.write_many([(0, good[0]), (BLOCK, misaligned), (2 * BLOCK, good[1]),
                           (3 * BLOCK, good[2])])
    back = _buffers(1)[0]
    device.read_into(3 * BLOCK, back)
    assert back == good[2]  # the batch's other writes were done, and waited for
    device.write_many([(BLOCK, good[0])])  # and the device goes on working
    done = []
    with pytest.raises(DeviceError, match=r"read at 0 failed: Invalid argument"):
        device.read_many([(0, misaligned), (BLOCK, back)], done.append)
    assert done == [1]  # only a read that delivered all its bytes is handed over


def test_a_failing_completion_handler_is_raised_after_every_read_is_done(device):
    bufs = _buffers(16)
    seen = []

    def handler(i):
        seen.append(i)
        if len(seen) == 1:
            raise ValueError("handler broke")

    with pytest.raises(ValueError, match="handler broke"):
        device.read_many([(i * BLOCK, b) for i, b in enumerate(bufs)], handler)
    assert len(seen) == 1  # not called again after it raised
    device.read_many([(0, bufs[0])])  # the queue is sound afterwards


def test_a_producer_that_fails_midway_leaves_nothing_in_flight(device):
    bufs = _buffers(4)

    def produce():
        yield 0, bufs[0]
        yield BLOCK, bufs[1]
        raise RuntimeError("could not fill the next chunk")

    with pytest.raises(RuntimeError, match="could not fill"):
        device.write_many(produce())
    device.write_many([(0, bufs[2]), (BLOCK, bufs[3])])


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
        assert "no AIO here; batches use 16 IO threads instead" in caplog.text
    finally:
        dev.close()


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


def test_a_forked_child_can_use_the_device(device):
    bufs = _buffers(4)
    for i, buf in enumerate(bufs):
        buf[:] = bytes([i + 1]) * BLOCK
    device.write_many([(i * BLOCK, b) for i, b in enumerate(bufs)])  # contexts exist now
    pid = os.fork()
    if pid == 0:  # the child: AIO contexts are not inherited, new ones must be made
        code = 1
        try:
            back = _buffers(4)
            device.read_many([(i * BLOCK, b) for i, b in enumerate(back)])
            code = 0 if all(a == b for a, b in zip(bufs, back)) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    device.read_many([(0, bufs[0])])  # and the parent's contexts still work


def test_concurrent_batches_share_a_bounded_number_of_contexts(tmp_path, monkeypatch):
    if (reason := aio.unavailable_reason()) is not None:
        pytest.skip(f"native AIO is not available here: {reason}")
    monkeypatch.setattr(aio, "MAX_CONTEXTS", 2)
    dev = DirectDevice.create_file(str(tmp_path / "dev"), 8 * MiB, io_engine="aio")

    def reader(k):
        bufs = _buffers(8)
        for _ in range(50):
            dev.read_many([(((k * 8 + i) % 2048) * BLOCK, b) for i, b in enumerate(bufs)])

    errors = run_concurrently(reader, 6)
    try:
        assert not errors
        assert 1 <= len(dev._aio._all) <= 2  # six threads waited their turn for two
    finally:
        dev.close()
