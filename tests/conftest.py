"""Shared fixtures: real files opened with O_DIRECT, small region sizes to keep tests fast."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from wqs.config import EngineConfig  # noqa: E402
from wqs.engine import Engine, open_or_create  # noqa: E402
from wqs.nvme import aio  # noqa: E402
from tests import spdk_mode  # noqa: E402

MiB = 1024 * 1024


@pytest.fixture(params=["spdk"] if spdk_mode.ACTIVE else ["aio", "threads"])
def small_config(request: pytest.FixtureRequest) -> EngineConfig:
    """1 MiB regions, no DRAM tier: every get goes to the device. Once for each way the
    device runs batches of IO (or on SPDK only: tests/spdk_mode.py)."""
    if request.param == "spdk":
        return spdk_mode.engine_config()
    if request.param == "aio" and (reason := aio.unavailable_reason()) is not None:
        pytest.skip(f"native AIO is not available here: {reason}")
    return EngineConfig(region_size=1 * MiB, max_block_size=8 * MiB, dram_cache_bytes=0,
                        io_engine=request.param, io_threads=4)


@pytest.fixture
def open_engine(tmp_path: Path) -> Iterator[Callable[..., Engine]]:
    """open_engine(config, size=16 MiB, name='dev') -> Engine on a file under tmp_path."""
    opened: list[Engine] = []

    def _open(config: EngineConfig, size: int = 16 * MiB, name: str = "dev") -> Engine:
        if spdk_mode.ACTIVE:
            engine = spdk_mode.open_engine(tmp_path / name, size, config)
        else:
            engine = open_or_create(str(tmp_path / name), size, config)
        opened.append(engine)
        return engine

    yield _open
    for e in opened:
        if not e._closed and not getattr(e.device, "_closed", False):
            e.close()


def random_block(rng, n: int) -> bytes:
    return rng.randbytes(n)


def block_id(i: int) -> bytes:
    return i.to_bytes(16, "big")


def run_concurrently(work: Callable[[int], None], n: int,
                     timeout: float = 60.0) -> list[BaseException]:
    """Run work(0) .. work(n-1) in n threads; what they raised (a thread still running
    after `timeout` counts as a TimeoutError)."""
    errors: list[BaseException] = []

    def body(k: int) -> None:
        try:
            work(k)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            errors.append(e)

    threads = [threading.Thread(target=body, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        if t.is_alive():
            errors.append(TimeoutError(f"{t.name} still running after {timeout} s"))
    return errors


def crash(engine: Engine) -> None:
    """Drop the engine as a killed process would: no checkpoint, device just closed."""
    engine.abandon()


def flip_bytes(path: str, offset: int, count: int = 8) -> None:
    if spdk_mode.owns(path):
        return spdk_mode.flip_bytes(path, offset, count)
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(count))
        for i in range(len(data)):
            data[i] ^= 0xFF
        f.seek(offset)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
