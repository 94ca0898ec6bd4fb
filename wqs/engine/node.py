"""A node's device, cut into one engine partition per shard (the shard table).

`format_node` writes the table in the device's first unit and formats each partition as
an engine device of its own; `read_shards` tells a daemon how its device is cut. One
shard is the plain engine layout (an engine superblock in the first unit, no table),
which is also what devices formatted before shards existed hold: it reads as one
partition spanning the device.
"""

from __future__ import annotations

import logging
import os
import time
import uuid as uuidlib

from wqs.config import EngineConfig
from wqs.engine import format as fmt
from wqs.engine import recovery
from wqs.engine.engine import MIN_REGIONS, check_formattable, format_device
from wqs.errors import FormatError
from wqs.nvme.device import BlockDevice, DevicePart, DirectDevice
from wqs.nvme.spdk_target import is_spdk_device

log = logging.getLogger("wqs.engine")

LOCK_WAIT_S = 5.0


def read_shards(device: BlockDevice) -> fmt.ShardTable | None:
    """How the device is cut into shards, or None if it holds no WQS format."""
    unit = recovery.read_unit(device, 0)
    table = fmt.unpack_shard_table(unit)
    if table is not None:
        for k, (offset, size) in enumerate(table.partitions):
            if offset % fmt.SHARD_ALIGN or offset + size > device.size:
                raise FormatError(f"{device.path}: shard {k} [{offset}, {offset + size}) lies "
                                  f"outside the device of {device.size} B")
        return table
    if bytes(unit[:8]) == fmt.SHARDS_MAGIC:
        raise FormatError(f"{device.path}: the shard table is damaged (bad checksum or "
                          "version); reformat with `wqs format --force`")
    sb = fmt.unpack_superblock(unit)
    if sb is not None:  # formatted before shards: one partition, the whole device
        return fmt.ShardTable(sb.uuid, ((0, device.size),), sb.created_unix)
    return None


def max_shards(device_size: int, config: EngineConfig) -> int:
    """The most shards a device of this size holds, each with enough regions."""
    n = 1
    while n < fmt.MAX_SHARDS:
        _, _, _, regions = fmt.compute_geometry(fmt.split_device(device_size, n + 1)[0][1],
                                                config.region_size)
        if regions < MIN_REGIONS:
            break
        n += 1
    return n


def format_node(device: BlockDevice, config: EngineConfig, shards: int, *,
                force: bool = False) -> fmt.ShardTable:
    """Cut the device into `shards` partitions and format each. Destroys its contents."""
    if not 1 <= shards <= fmt.MAX_SHARDS:
        raise FormatError(f"shards must be in 1..{fmt.MAX_SHARDS}, got {shards}")
    check_formattable(device, force)
    parts = fmt.split_device(device.size, shards)
    if shards > max_shards(device.size, config):
        raise FormatError(
            f"{device.path}: {device.size} B cut into {shards} shards leaves each fewer than "
            f"{MIN_REGIONS} regions of {config.region_size} B (at most "
            f"{max_shards(device.size, config)} shards fit; use a bigger device, fewer "
            "workers or a smaller region_size)")
    if shards == 1:  # the plain engine layout, which every tool opens as it is
        sb = format_device(device, config, force=True)
        return fmt.ShardTable(sb.uuid, ((0, device.size),), sb.created_unix)
    table = fmt.ShardTable(uuidlib.uuid4().bytes, parts, int(time.time()))
    # The table goes last: a device whose formatting was interrupted has none, and is
    # refused (or formatted again) rather than half used.
    recovery.write_padded(device, 0, bytes(fmt.UNIT))
    device.flush()
    for k, (offset, size) in enumerate(parts):
        format_device(DevicePart(device, offset, size, k), config, force=True)
    recovery.write_padded(device, 0, fmt.pack_shard_table(table))
    device.flush()
    log.info("formatted %s as %d shard%s of %d B (node uuid %s)", device.path, shards,
             "s" if shards > 1 else "", parts[0][1], table.uuid_str())
    return table


def auto_shards(device_size: int, config: EngineConfig) -> int:
    """One shard per core, as many as the device holds."""
    return max(1, min(os.cpu_count() or 1, max_shards(device_size, config)))


def open_node_device(path: str, size: int, config: EngineConfig,
                     workers: int | None) -> tuple[BlockDevice, fmt.ShardTable]:
    """The daemon's device (locked) and its shard table; a missing device file is created
    and formatted with `workers` shards (None: one per core, as many as fit). An SPDK
    device (spdk:...) must have been formatted with `wqs format`.

    An existing device keeps its cut: `workers` must then be None or match it, since
    recutting would drop every block; `wqs format --shards N --force` does that on
    purpose."""
    spdk = is_spdk_device(path)
    created = not spdk and not os.path.exists(path)
    if spdk:
        from wqs.nvme.spdk import SpdkDevice

        # SPDK cannot be carried over fork(): the supervisor reads the table through a
        # child process, and each shard process connects on its own.
        device: BlockDevice = SpdkDevice(path, config.spdk, connect=False,
                                         lock_wait_s=LOCK_WAIT_S)
    elif created:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        device = DirectDevice.create_file(path, size, io_engine=config.io_engine,
                                          io_threads=config.io_threads)
    else:
        # A restart right after a crash: the old shards may take a moment to exit.
        device = DirectDevice(path, io_engine=config.io_engine, io_threads=config.io_threads,
                              lock_wait_s=LOCK_WAIT_S)
    try:
        if created:
            shards = workers or auto_shards(device.size, config)
            table = format_node(device, config, shards, force=True)
        else:
            table = device.in_child(read_shards) if spdk else read_shards(device)
            if table is None:
                raise FormatError(f"{path} is not a WQS device (no valid superblock); "
                                  "run `wqs format` first")
            if spdk:
                from wqs.nvme.spdk import check_shards

                check_shards(device.target, len(table.partitions))
            have = len(table.partitions)
            if workers is not None and workers != have:
                raise FormatError(
                    f"workers is {workers} but {path} is cut into {have} shard"
                    f"{'s' if have > 1 else ''}: set workers: {have} (or auto), or recut it "
                    f"with `wqs format --shards {workers} --force {path}` (drops every block)")
        return device, table
    except BaseException:
        device.close()
        if created:
            os.unlink(path)
        raise
