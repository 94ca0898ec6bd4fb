"""The engine on a real loop block device (root and losetup needed)."""

from __future__ import annotations

import os
import random
import shutil
import subprocess

import pytest

from tests.conftest import MiB, block_id, crash
from wqs.config import EngineConfig
from wqs.engine import Engine
from wqs.errors import FormatError
from wqs.nvme import DirectDevice


def _loop_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to attach a loop device"
    if shutil.which("losetup") is None:
        return "needs losetup (util-linux)"
    return None


@pytest.fixture
def loop_device(tmp_path):
    reason = _loop_unavailable()
    if reason:
        pytest.skip(reason)
    backing = tmp_path / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(32 * MiB)
    try:
        dev = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True,
                             capture_output=True, text=True).stdout.strip()
    except subprocess.CalledProcessError as e:
        pytest.skip(f"losetup could not attach a loop device here: {e.stderr.strip()}")
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_engine_on_a_loop_device(loop_device):
    config = EngineConfig(region_size=1 * MiB, dram_cache_bytes=0)
    device = DirectDevice(loop_device)
    assert device.is_block_device and device.size == 32 * MiB
    assert device.align in (512, 4096)
    Engine.format(device, config)
    engine = Engine.open(device, config)
    rng = random.Random(1)
    blocks = {block_id(i): rng.randbytes(rng.randrange(1, 300_000)) for i in range(40)}
    engine.put_many(list(blocks.items()))
    assert engine.get_many(list(blocks)) == list(blocks.values())
    crash(engine)
    device = DirectDevice(loop_device)
    engine = Engine.open(device, config)
    assert engine.get_many(list(blocks)) == list(blocks.values())
    engine.close()


def test_format_refuses_a_partitioned_loop_device(loop_device):
    if shutil.which("sfdisk") is None:
        pytest.skip("needs sfdisk (fdisk package) to write a partition table")
    subprocess.run(["sfdisk", "-q", loop_device], input="label: gpt\n,\n", text=True,
                   check=True, capture_output=True)
    device = DirectDevice(loop_device)
    try:
        with pytest.raises(FormatError, match="PTTYPE=gpt"):
            Engine.format(device, EngineConfig(region_size=1 * MiB))
    finally:
        device.close()
