"""The SPDK backend's parts that need no SPDK: device names, NVMe statuses, namespace
checks, the polled ring's queue accounting and completion bookkeeping (over a queue
pair in memory, driven by a real event loop, under the real engine too), and the
errors an operator sees when the library is missing. The backend against a real SPDK
is tests/test_spdk_device.py."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import random
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import ROOT, MiB, block_id
from tests.daemons import pick_ports
from wqs.config import EngineConfig, SpdkConfig
from wqs.engine import Engine
from wqs.engine.engine import format_device
from wqs.errors import ConfigError, DeviceError
from wqs.loop.reactor import Reactor
from wqs.nvme.buffers import IoBuffer
from wqs.nvme.device import watch_ring
from wqs.nvme.memdevice import MemoryDevice
from wqs.nvme.spdk_ring import SpdkRing
from wqs.nvme.spdk_target import (check_namespace, describe_status, parse_device,
                                  split_status, status_errno)

TCP = ("spdk:trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:4420 "
       "subnqn:nqn.2016-06.io.spdk:cnode1 ns:1")


# --------------------------------------------------------------------------- names


def test_a_tcp_device_name_parses_and_normalises():
    t = parse_device("spdk:TRTYPE=tcp adrfam:ipv4 traddr:127.0.0.1 trsvcid:4420 "
                     "subnqn:nqn.2016-06.io.spdk:cnode1 ns:2")
    assert (t.trtype, t.adrfam, t.traddr, t.trsvcid, t.ns) == ("TCP", "IPv4", "127.0.0.1",
                                                               "4420", 2)
    assert t.subnqn == "nqn.2016-06.io.spdk:cnode1"  # its ':' stays in the value
    assert t.trid() == ("trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:4420 "
                        "subnqn:nqn.2016-06.io.spdk:cnode1")
    assert parse_device(t.name()) == t
    assert not t.is_pcie and "127.0.0.1:4420" in t.where()


def test_a_pcie_device_name_parses():
    t = parse_device("spdk:trtype:PCIe traddr:0000:01:00.0 ns:1")
    assert t.is_pcie and t.traddr == "0000:01:00.0" and t.trid() == \
        "trtype:PCIe traddr:0000:01:00.0"
    assert "PCIe controller 0000:01:00.0" in t.where()


@pytest.mark.parametrize("name, message", [
    ("/dev/nvme0n1", "starts with 'spdk:'"),
    ("spdk:traddr:127.0.0.1 ns:1", "trtype is missing"),
    ("spdk:trtype:XYZ traddr:1 ns:1", "trtype must be one of"),
    ("spdk:trtype:PCIe ns:1", "traddr is missing"),
    ("spdk:trtype:PCIe traddr:0000:01:00.0", "ns is missing"),
    ("spdk:trtype:PCIe traddr:0000:01:00.0 ns:0", "ns must be a namespace ID"),
    ("spdk:trtype:PCIe traddr:0000:01:00.0 ns:x", "ns must be a namespace ID"),
    ("spdk:trtype:PCIe traddr:01:00 ns:1", "a PCI address"),
    ("spdk:trtype:PCIe traddr:0000:01:00.0 subnqn:nqn.x ns:1", "subnqn is for NVMe over"),
    ("spdk:trtype:TCP traddr:127.0.0.1 subnqn:nqn.x ns:1", "trsvcid (the port"),
    ("spdk:trtype:TCP traddr:127.0.0.1 trsvcid:99999 subnqn:nqn.x ns:1", "1..65535"),
    ("spdk:trtype:TCP traddr:127.0.0.1 trsvcid:4420 ns:1", "subnqn (the subsystem"),
    ("spdk:trtype:TCP adrfam:IPX traddr:1 trsvcid:1 subnqn:n ns:1", "adrfam must be one of"),
    ("spdk:trtype:TCP trtype:TCP traddr:1 ns:1", "trtype is given twice"),
    ("spdk:trtype:TCP traddr:1 trsvcid:1 subnqn:n ns:1 colour:blue", "unknown transport ID"),
    ("spdk:trtype:TCP traddr", "is not key:value"),
    (f"spdk:trtype:TCP traddr:1 trsvcid:1 subnqn:{'n' * 224} ns:1", "longer than 223"),
])
def test_bad_device_names_say_what_is_wrong(name, message):
    with pytest.raises(ConfigError, match="device: ") as e:
        parse_device(name)
    assert message in str(e.value)


# --------------------------------------------------------------------------- statuses


def test_status_words_map_to_errno_and_words():
    # phase bit set, generic status 0x81 (capacity exceeded)
    assert split_status(0x81 << 1 | 1) == (0, 0x81)
    assert status_errno(0, 0) == 0 and describe_status(0, 0) == "success"
    assert status_errno(0, 0x81) == errno.ENOSPC
    assert status_errno(2, 0x81) == errno.EIO  # unrecovered read error
    assert status_errno(0, 0x08) == errno.ENXIO  # queue deleted: the controller is gone
    assert status_errno(3, 0x00) == errno.ENXIO  # path errors
    assert status_errno(1, 0x82) == errno.EROFS
    assert status_errno(7, 0x12) == errno.EIO  # vendor specific: an IO error
    assert describe_status(2, 0x81) == \
        "unrecovered read error (NVMe status type 0x2, code 0x81)"
    assert describe_status(7, 0x12) == "error (NVMe status type 0x7, code 0x12)"


def test_namespace_checks():
    where = "NVMe-oF TCP controller 127.0.0.1:4420"
    assert check_namespace(where, 1, active=True, sector_size=512, size=10 * 4096 + 512) \
        == 10 * 4096  # whole 4 KiB units
    with pytest.raises(DeviceError, match=r"namespace 3 does not exist .*active "
                                          r"namespaces: 1, 2\)"):
        check_namespace(where, 3, active=False, sector_size=0, size=0, active_ids=(1, 2))
    with pytest.raises(DeviceError, match="520 B sectors; WQS needs a sector size that "
                                          "divides 4096"):
        check_namespace(where, 1, active=True, sector_size=520, size=1 << 30)
    with pytest.raises(DeviceError, match="8192 B sectors"):
        check_namespace(where, 1, active=True, sector_size=8192, size=1 << 30)
    with pytest.raises(DeviceError, match="8 B of metadata per sector"):
        check_namespace(where, 1, active=True, sector_size=4096, size=1 << 30, md_size=8)
    with pytest.raises(DeviceError, match="protection information type 1"):
        check_namespace(where, 1, active=True, sector_size=512, size=1 << 30, md_size=8,
                        pi_type=1)
    with pytest.raises(DeviceError, match="less than one 4096 B unit"):
        check_namespace(where, 1, active=True, sector_size=512, size=2048)


def test_spdk_config_keys():
    c = SpdkConfig(lib_dir="/opt/spdk/lib", mem_size="256MiB", hugepages="yes",
                   poll_wait_us="0")
    assert (c.mem_size, c.hugepages, c.poll_wait_us) == (256 * MiB, True, 0)
    assert EngineConfig().spdk == SpdkConfig()
    with pytest.raises(ConfigError, match=r"spdk.lib_dir: must be an absolute path"):
        EngineConfig(spdk={"lib_dir": "lib"})
    with pytest.raises(ConfigError, match=r"spdk.mem_size: must be at least 64 MiB"):
        EngineConfig(spdk={"mem_size": "32MiB"})
    with pytest.raises(ConfigError, match=r"spdk.pol_wait_us: unknown key .*poll_wait_us"):
        EngineConfig(spdk={"pol_wait_us": 5})


# --------------------------------------------------------------------------- the ring


class MemoryQpair:
    """spdk_ring.Qpair over a MemoryDevice: commands are carried out when queued, sent
    by the next process() and reported by the one after (as a fabric queue pair sends
    on one poll and hears the answer on a later one). `requests` bounds commands outstanding (then -ENOMEM);
    `refuse` / `fail` make commands at chosen LBAs be refused / complete with an NVMe
    status; `broken` makes process() fail as a disconnected queue pair does."""

    def __init__(self, device: MemoryDevice, sector_size: int = 512,
                 requests: int = 10_000) -> None:
        self.device = device
        self.sector_size = sector_size
        self.requests = requests
        self.sink = None
        self.sending: list[tuple[int, int]] = []  # (tag, status): sent on the next poll
        self.outstanding: list[tuple[int, int]] = []  # sent: reported on the next poll
        self.log: list[tuple[str, int, int, bool]] = []  # (op, lba, count, fua)
        self.refuse: dict[int, int] = {}  # lba -> rc
        self.fail: dict[int, int] = {}  # lba -> status word
        self.broken = 0
        self.processed = 0
        self.admin_polls = 0
        self.in_process = False

    def _queue(self, op: str, addr: int, lba: int, count: int, tag: int, fua: bool) -> int:
        if lba in self.refuse:
            return self.refuse[lba]
        if len(self.outstanding) + len(self.sending) >= self.requests:
            return -errno.ENOMEM
        self.log.append((op, lba, count, fua))
        res = self.device.transfer(op == "write", lba * self.sector_size,
                                   [(addr, count * self.sector_size)])
        assert res == count * self.sector_size
        self.sending.append((tag, self.fail.get(lba, 1)))  # phase bit only: success
        return 0

    def read(self, addr, lba, count, tag):
        return self._queue("read", addr, lba, count, tag, False)

    def write(self, addr, lba, count, tag, fua):
        return self._queue("write", addr, lba, count, tag, fua)

    def process(self) -> int:
        self.processed += 1
        if self.broken:
            return -self.broken
        done, self.outstanding, self.sending = self.outstanding, self.sending, []
        self.in_process = True
        for tag, status in done:
            self.sink(tag, status)
        self.in_process = False
        return len(done)

    def process_admin(self) -> int:
        self.admin_polls += 1
        return 0


def _ring(size=8 * MiB, **kw) -> tuple[SpdkRing, MemoryQpair, Reactor, list]:
    qp = MemoryQpair(MemoryDevice(size), **{k: kw.pop(k) for k in ("requests",) if k in kw})
    ring = SpdkRing(qp, **kw)
    qp.sink = ring.command_done
    loop = Reactor()
    watch_ring(loop, ring)
    loop.on_turn_end(ring.submit)
    return ring, qp, loop, []


def _bufs(n: int, size: int = 4096) -> list[IoBuffer]:
    rng = random.Random(n)
    out = [IoBuffer(size) for _ in range(n)]
    for b in out:
        b.view[:size] = rng.randbytes(size)
    return out


def test_more_ios_than_the_ring_holds_wait_their_turn_and_all_complete():
    ring, qp, loop, done = _ring(depth=8)
    out = _bufs(50)
    for i, b in enumerate(out):
        ring.writev(i * 4096, [(b.addr, 4096)], lambda a, r: done.append((a, r)), i)
    assert ring.pending == 50 and ring.in_flight == 0
    ring.submit()
    assert len(qp.log) == ring.commands == 8 and not done  # no callbacks inside submit
    assert loop.run_until(lambda: len(done) == 50, timeout_s=10)
    assert sorted(done) == [(i, 4096) for i in range(50)]
    assert ring.pending == ring.commands == 0
    back = [IoBuffer(4096) for _ in range(50)]
    done.clear()
    for i, b in enumerate(back):
        ring.read(i * 4096, b.addr, 4096, lambda a, r: done.append((a, r)), i)
    assert loop.run_until(lambda: len(done) == 50, timeout_s=10)
    assert all(bytes(b.view[:4096]) == bytes(o.view[:4096]) for b, o in zip(back, out))


def test_a_gather_write_is_one_command_per_buffer_at_its_lba_from_the_base():
    ring, qp, loop, done = _ring(base=1 << 20)
    bufs = _bufs(3, 8192)
    ring.writev(4096, [(b.addr, 8192) for b in bufs], lambda a, r: done.append(r), None,
                dsync=True)
    assert loop.run_until(lambda: done, timeout_s=5)
    assert done == [3 * 8192]
    first = ((1 << 20) + 4096) // 512
    assert qp.log == [("write", first + k * 16, 16, True) for k in range(3)]  # FUA: dsync
    back = IoBuffer(3 * 8192)
    qp.device.read_into((1 << 20) + 4096, back.view[:3 * 8192])
    assert bytes(back.view[:3 * 8192]) == b"".join(bytes(b.view[:8192]) for b in bufs)


def test_a_full_queue_pair_holds_ios_back_until_commands_complete():
    ring, qp, loop, done = _ring(requests=3)
    bufs = _bufs(10)
    ring.writev(0, [(b.addr, 4096) for b in bufs], lambda a, r: done.append(r), None)
    ring.submit()
    assert len(qp.outstanding) == ring.commands == 3 and ring.pending == 1
    assert loop.run_until(lambda: done, timeout_s=5)
    assert done == [10 * 4096]
    assert [lba for _, lba, _, _ in qp.log] == [k * 8 for k in range(10)]  # in order


def test_failed_and_refused_commands_fail_their_io_only(caplog):
    caplog.set_level(logging.ERROR, "wqs.nvme")
    ring, qp, loop, done = _ring()
    qp.fail[8] = (0x81 << 1) | (2 << 9)  # media error: unrecovered read error
    qp.refuse[32] = -errno.EINVAL
    bufs = _bufs(6)
    ring.writev(0, [(b.addr, 4096) for b in bufs[:3]], lambda a, r: done.append((a, r)), "a")
    ring.writev(4 * 4096, [(bufs[3].addr, 4096)], lambda a, r: done.append((a, r)), "b")
    ring.read(4 * 4096, bufs[4].addr, 4096, lambda a, r: done.append((a, r)), "c")
    ring.read(5 * 4096, bufs[5].addr, 4096, lambda a, r: done.append((a, r)), "d")
    assert loop.run_until(lambda: len(done) == 4, timeout_s=5)
    assert dict(done) == {"a": -errno.EIO, "b": -errno.EINVAL, "c": -errno.EINVAL,
                          "d": 4096}
    assert "write failed: unrecovered read error (NVMe status type 0x2, code 0x81)" \
        in caplog.text
    assert "read refused by the driver: Invalid argument" in caplog.text
    assert ring.pending == ring.commands == 0 and ring.failed is None


def test_a_queue_pair_that_fails_fails_every_command_in_flight(caplog):
    ring, qp, loop, done = _ring()
    bufs = _bufs(4)
    for i, b in enumerate(bufs):
        ring.read(i * 4096, b.addr, 4096, lambda a, r: done.append(r), i)
    ring.submit()
    qp.broken = errno.ENXIO
    assert loop.run_until(lambda: len(done) == 4, timeout_s=5)
    assert done == [-errno.ENXIO] * 4
    assert "queue pair failed: No such device or address" in ring.failed
    assert ring.commands == 0


def test_the_loop_polls_only_while_io_is_outstanding_and_keeps_the_controller_alive():
    ring, qp, loop, done = _ring(idle_poll_s=0.05)
    loop.run_until(lambda: False, timeout_s=0.3)
    assert qp.processed == 0  # nothing outstanding: no IO polls ...
    assert qp.admin_polls == 0  # ... and ADMIN_POLL_S (1 s) not yet passed
    ring._admin_due = 0  # as if a second had passed
    loop.run_until(lambda: False, timeout_s=0.2)
    assert qp.admin_polls == 1  # the idle poll ran it
    turns = loop.turns
    loop.run_until(lambda: False, timeout_s=0.3)
    assert loop.turns - turns < 20  # idle: the loop sleeps, it does not spin
    b = _bufs(1)[0]
    ring.read(0, b.addr, 4096, lambda a, r: done.append(r), None)
    assert loop.run_until(lambda: done, timeout_s=5) and done == [4096]


def test_a_spinning_ring_yields_the_core_after_an_empty_poll_only(monkeypatch):
    yields = []
    monkeypatch.setattr(os, "sched_yield", lambda: yields.append(1))
    ring, qp, loop, done = _ring(poll_wait_s=0)
    b = _bufs(1)[0]
    ring.read(0, b.addr, 4096, lambda a, r: done.append(r), None)
    ring.submit()  # sent on this poll, reported on the next ...
    held, qp.outstanding = qp.outstanding, []  # ... but the target has not answered yet
    assert ring.complete() == 0 and yields == [1]  # nothing came: the core is offered
    qp.outstanding = held
    assert ring.complete() == 1 and yields == [1] and done == [4096]  # something came
    sleeper, _, _, _ = _ring(poll_wait_s=20e-6)  # a ring that sleeps between polls
    sleeper.read(0, b.addr, 4096, lambda a, r: None, None)
    sleeper.submit()
    sleeper._qpair.outstanding = []
    assert sleeper.complete() == 0
    assert yields == [1]  # never yields: the loop's wait gives the core up


def test_a_busy_poller_bounds_the_wait_and_still_wakes_for_sockets(monkeypatch):
    import select
    import socket

    class Slow:
        """Outstanding IO that completes on the 20th poll."""
        poll_wait_s = 200e-6
        idle_poll_s = 60.0
        pending = 1
        polls = 0

        def complete(self):
            self.polls += 1
            if self.polls == 20:
                self.pending = 0
                return 1
            return 0

    waits = []
    real_select = select.select
    monkeypatch.setattr(select, "select",
                        lambda r, w, x, t: (waits.append(t), real_select(r, w, x, t))[1])
    loop = Reactor()
    slow = Slow()
    loop.add_poller(slow)
    a, b = socket.socketpair()
    got = []
    loop.add_reader(a.fileno(), lambda: got.append(a.recv(10)))
    b.send(b"x")
    assert loop.run_until(lambda: not slow.pending, timeout_s=5)
    assert got == [b"x"]  # sockets are served while polling
    assert slow.polls == 20  # once a turn while IO is outstanding
    assert waits and set(waits) == {200e-6}  # each wait bounded by poll_wait_s
    waits.clear()
    loop.run_once(0.01)  # nothing outstanding: a plain epoll wait, no polling
    assert waits == [] and slow.polls == 20
    a.close(), b.close(), loop.close()


def test_closing_a_ring_waits_for_its_commands():
    ring, qp, loop, done = _ring()
    b = _bufs(1)[0]
    ring.read(0, b.addr, 4096, lambda a, r: done.append(r), None)
    ring.submit()
    assert ring.commands == 1
    ring.close()
    assert ring.commands == 0 and not done  # drained from the queue pair, not called back


class MemoryNamespace(MemoryDevice):
    """A MemoryDevice whose rings are SpdkRings over a MemoryQpair: the engine on the
    SPDK ring's bookkeeping, without SPDK."""

    io_engine = "spdk"

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.qpairs: list[MemoryQpair] = []

    def open_ring(self, base: int = 0) -> SpdkRing:
        qp = MemoryQpair(self, requests=64)
        self.qpairs.append(qp)
        ring = SpdkRing(qp, base, depth=32, poll_wait_s=0)
        qp.sink = ring.command_done
        return ring


def test_the_engine_runs_on_the_spdk_ring():
    dev = MemoryNamespace(32 * MiB)
    cfg = EngineConfig(region_size=MiB, max_block_size=4 * MiB, dram_cache_bytes=0)
    format_device(dev, cfg, force=True)
    rng = random.Random(7)
    blocks = {block_id(i): rng.randbytes(rng.choice([100, 4096, 65536, 3 * MiB]))
              for i in range(80)}  # more than the device holds: reclaim runs too
    engine = Engine.open(dev, cfg)
    engine.put_many(list(blocks.items()))
    got = engine.get_many(list(blocks))
    assert all(g is None or g == blocks[k] for g, k in zip(got, blocks))
    assert sum(g is not None for g in got) > 10
    assert engine.stats().evicted_regions > 0
    engine.close()
    engine = Engine.open(dev, cfg)  # the checkpoint, written through the ring's device
    assert engine.get_many(list(blocks)) == got
    engine.close()


# --------------------------------------------------------------------------- no library


def test_library_not_found_names_the_key_and_the_path(tmp_path):
    from wqs.nvme.spdk_lib import load_library

    with pytest.raises(DeviceError, match=r"SPDK library not found: engine.spdk.lib_dir is "
                                          r"'/nonexistent/lib', which is not a directory"):
        load_library("/nonexistent/lib")
    with pytest.raises(DeviceError, match=rf"engine.spdk.lib_dir is '{tmp_path}' and "
                                          rf"{tmp_path}/libspdk_env_dpdk.so does not exist"):
        load_library(str(tmp_path))
    if _system_has_spdk():
        pytest.skip("this system's library path has SPDK: the unset-key case cannot fail")
    with pytest.raises(DeviceError, match=r"SPDK library not found: engine.spdk.lib_dir is "
                                          r"not set and libspdk_env_dpdk.so is not on the "
                                          r"system's library path"):
        load_library(None)


def test_a_library_that_is_not_spdk_is_refused(tmp_path):
    import shutil

    from wqs.nvme.spdk_lib import LIBRARIES, load_library

    libc = ctypes.util.find_library("m")  # any shared library without SPDK's functions
    assert libc
    path = next(p for p in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu",
                            "/lib/aarch64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/lib64")
                if os.path.exists(os.path.join(p, libc)))
    for name in LIBRARIES:
        shutil.copy(os.path.join(path, libc), tmp_path / name)
    with pytest.raises(DeviceError, match=r"has no spdk_env_opts_init: it is not a version "
                                          r"WQS supports \(tested: v26.05\)"):
        load_library(str(tmp_path))


def test_the_device_is_locked_against_a_second_user(tmp_path):
    from wqs.nvme.spdk import SpdkDevice

    first = SpdkDevice(TCP, SpdkConfig(), connect=False)
    try:
        with pytest.raises(DeviceError, match="is in use by another process on this host"):
            SpdkDevice(TCP, SpdkConfig(), connect=False)
    finally:
        first.close()
    SpdkDevice(TCP, SpdkConfig(), connect=False).close()  # free again


def test_connecting_in_a_child_reports_the_childs_error(tmp_path):
    from wqs.nvme.spdk import SpdkDevice

    dev = SpdkDevice(TCP, SpdkConfig(lib_dir=str(tmp_path)), connect=False)
    try:
        with pytest.raises(DeviceError, match="SPDK library not found"):
            dev.in_child(lambda d: d.size)
    finally:
        dev.close()


def _system_has_spdk() -> bool:
    try:
        ctypes.CDLL("libspdk_env_dpdk.so")
        return True
    except OSError:
        return False



# --------------------------------------------------------------------------- operators


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None or shutil.which("sfdisk") is None
                    or shutil.which("blkid") is None,
                    reason="needs mkfs.ext4, sfdisk and blkid (e2fsprogs, fdisk, util-linux)")
@pytest.mark.parametrize("make", ["ext4", "gpt"])
def test_format_finds_signatures_on_a_device_the_kernel_does_not_see(tmp_path, make):
    """No path to hand blkid (an SPDK namespace): it looks at an image of the head and
    the tail, where filesystems and partition tables sign."""
    from wqs.engine.engine import check_formattable
    from wqs.errors import FormatError

    img = tmp_path / "img"
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
    if make == "ext4":
        subprocess.run(["mkfs.ext4", "-F", "-q", str(img)], check=True, capture_output=True)
    else:
        subprocess.run(["sfdisk", "-q", str(img)], input=b"label: gpt\n,,L\n", check=True,
                       capture_output=True)
    dev = MemoryDevice(16 * MiB)
    dev.write(0, memoryview(img.read_bytes()))
    assert not os.path.exists(dev.path)
    with pytest.raises(FormatError, match="TYPE=ext4" if make == "ext4" else "PTTYPE=gpt"):
        check_formattable(dev, force=False)
    check_formattable(MemoryDevice(16 * MiB), force=False)  # zeros: nothing found


def test_wqs_format_without_the_library_names_the_option(tmp_path, capsys):
    from wqs.cli import main

    missing = tmp_path / "nolib"
    assert main(["format", TCP, "--yes", "--spdk-lib-dir", str(missing)]) == 1
    err = capsys.readouterr().err
    assert f"SPDK library not found: --spdk-lib-dir is '{missing}', which is not a " \
           "directory" in err
    assert main(["format", "spdk:trtype:TCP traddr:127.0.0.1 ns:1", "--yes"]) == 1
    assert "trsvcid (the port, e.g. 4420) is missing" in capsys.readouterr().err


def test_wqsd_without_the_library_says_which_key_and_path(tmp_path):
    missing = tmp_path / "nolib"
    cfg = tmp_path / "wqsd.yaml"
    port = pick_ports()
    cfg.write_text(yaml.safe_dump({"device": TCP, "data_dir": str(tmp_path),
                                   "listen": f"127.0.0.1:{port}", "metrics_listen": "off",
                                   "engine": {"spdk": {"lib_dir": str(missing)}}}))
    proc = subprocess.run([sys.executable, "-m", "wqs.daemon", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1, proc.stderr
    assert f"cannot start: SPDK library not found: engine.spdk.lib_dir is '{missing}', " \
           "which is not a directory" in proc.stderr
    bad = subprocess.run([sys.executable, "-m", "wqs.daemon", "--device",
                          "spdk:trtype:TCP traddr:127.0.0.1 trsvcid:4420 ns:1"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert bad.returncode == 2
    assert "configuration error: device: subnqn (the subsystem's NQN) is missing" in bad.stderr


def test_a_ring_refuses_use_across_fork():
    ring, qp, loop, done = _ring()
    b = _bufs(1)[0]
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            ring.read(0, b.addr, 4096, lambda a, r: None, None)
            try:
                ring.submit()
            except DeviceError as e:
                code = 0 if "cannot be used across fork" in str(e) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    ring.read(0, b.addr, 4096, lambda a, r: done.append(r), None)  # the parent's still works
    assert loop.run_until(lambda: done, timeout_s=5) and done == [4096]


def test_a_pcie_controller_holds_one_shard():
    from wqs.nvme.spdk import check_shards

    pcie = parse_device("spdk:trtype:PCIe traddr:0000:01:00.0 ns:1")
    check_shards(pcie, 1)
    with pytest.raises(DeviceError, match="a PCIe controller is driven by one process, so it "
                                          "holds one shard, not 2"):
        check_shards(pcie, 2)
    check_shards(parse_device(TCP), 8)  # a fabric takes a connection per shard
