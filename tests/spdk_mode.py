"""The engine's device-level tests on an NVMe namespace through SPDK.

tests/test_spdk_device.py starts an NVMe-oF target and runs tests/test_engine.py and
tests/test_device.py in a pytest of their own with WQS_TEST_SPDK_DEVICE naming the
namespace (and WQS_TEST_SPDK_LIB_DIR the library). conftest.py then gives those tests
SPDK instead of files: `small_config` has the one parameter "spdk", `open_engine(config,
size, name)` formats a fresh stretch of the namespace (zeroed first, as a new file is)
for each name a test uses and opens the engine on it, and `flip_bytes(path, ...)`
damages that stretch through SPDK. Everything else in those tests runs as written.

A pytest of their own: SPDK's environment is set up once per process and cannot be
carried over fork(), and the main test session forks.
"""

from __future__ import annotations

import os
from pathlib import Path

from wqs.config import EngineConfig, SpdkConfig

DEVICE = os.environ.get("WQS_TEST_SPDK_DEVICE")
LIB_DIR = os.environ.get("WQS_TEST_SPDK_LIB_DIR")
ACTIVE = DEVICE is not None
MiB = 1 << 20
ZERO_CHUNK = 4 * MiB


class _Namespace:
    """The namespace, handed out in stretches: each (test, name) gets the next one, and
    the stretches wrap around when the namespace is used up (tests run one at a time)."""

    def __init__(self) -> None:
        from wqs.nvme.spdk import SpdkDevice

        assert DEVICE is not None
        self.device = SpdkDevice(DEVICE, spdk_config())
        self.next = 0
        self.parts: dict[str, object] = {}  # path -> DevicePart

    def part(self, path: str, size: int) -> tuple[object, bool]:
        """The stretch standing for the file at path; whether it is new."""
        from wqs.nvme.device import DevicePart
        from wqs.nvme.buffers import aligned_buffer

        if path in self.parts:
            return self.parts[path], False
        assert size <= self.device.size, f"a {size} B device does not fit in the namespace"
        if self.next + size > self.device.size:
            self.next = 0
        part = DevicePart(self.device, self.next, size, len(self.parts))
        self.next += size
        zeros = memoryview(aligned_buffer(ZERO_CHUNK))
        for offset in range(0, size, ZERO_CHUNK):
            part.write(offset, zeros[: min(ZERO_CHUNK, size - offset)])
        self.parts[path] = part
        return part, True


_namespace: list[_Namespace] = []  # this process's, made on first use


def namespace() -> _Namespace:
    if not _namespace:
        _namespace.append(_Namespace())
    return _namespace[0]


def spdk_config() -> SpdkConfig:
    return SpdkConfig(lib_dir=LIB_DIR, mem_size=512 * MiB, poll_wait_us=20)


def engine_config() -> EngineConfig:
    """conftest's small_config, on SPDK."""
    return EngineConfig(region_size=1 * MiB, max_block_size=8 * MiB, dram_cache_bytes=0,
                        io_engine="auto", io_threads=4, spdk=spdk_config())


def open_engine(path: Path, size: int, config: EngineConfig):  # noqa: ANN201 - an Engine
    from wqs.engine import Engine
    from wqs.engine.engine import format_device

    part, new = namespace().part(str(path), size)
    if new:  # what open_or_create does with a file it creates
        format_device(part, config, force=True)
    return Engine.open(part, config)


def owns(path: str) -> bool:
    return ACTIVE and bool(_namespace) and path in _namespace[0].parts


def flip_bytes(path: str, offset: int, count: int) -> None:
    """conftest.flip_bytes on the stretch standing for path: through SPDK."""
    from wqs.nvme.buffers import aligned_buffer

    part = _namespace[0].parts[path]
    unit = 4096
    start = offset // unit * unit
    end = -(-(offset + count) // unit) * unit
    buf = memoryview(aligned_buffer(end - start))
    part.read_into(start, buf)
    for i in range(offset - start, offset - start + count):
        buf[i] ^= 0xFF
    part.write(start, buf)
