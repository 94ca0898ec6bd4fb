"""SPDK's NVMe-oF target (`nvmf_tgt`) on 127.0.0.1 over TCP with RAM namespaces: the
target of the SPDK backend's benchmark (bench/spdk_compare.py) and of its device tests
(tests/spdk_target.py). Nothing of SPDK is in this repository: `program` is the
nvmf_tgt of an SPDK the machine has, `lib_dir` the directory of its shared libraries.

The target is configured at start by a JSON file (no RPC client needed): one bdev per
namespace in one subsystem, a TCP transport, a listener on the given port. It runs
without hugepages (`--no-huge -s MB`), so it needs neither root nor a hugepage pool,
pinned to `cpu` (a spinning reactor and another busy process on one core starve each
other).

Namespaces in RAM, two ways: malloc bdevs in the target's own memory (the default; its
reactor polls, spinning on its core), or, with `files_dir`, aio bdevs on files there
(a tmpfs such as /dev/shm keeps them in RAM). Only the second can sleep: with
`interrupt` the reactor then waits for work instead of spinning, whereas a malloc bdev
keeps it spinning even in interrupt mode (SPDK's malloc bdev has no interrupt support,
as its maintainers say in spdk/spdk#3552; measured here: 97 % of a core, idle).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

NQN = "nqn.2016-06.io.wqs:test"
START_TIMEOUT_S = 60.0


class NvmfTarget:
    """One nvmf_tgt process; `device(ns)` names namespace ns for WQS."""

    def __init__(self, program: str, lib_dir: str, workdir: Path | str, port: int,
                 namespaces_mib: list[int], *, cpu: int, interrupt: bool = False,
                 files_dir: Path | str | None = None, mem_mb: int | None = None,
                 sector_sizes: list[int] | None = None) -> None:
        assert not interrupt or files_dir is not None, \
            "a malloc bdev keeps the reactor spinning: interrupt mode needs files_dir"
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.lib_dir = lib_dir
        self.program = program
        self.namespaces_mib = namespaces_mib
        self.sector_sizes = sector_sizes or [512] * len(namespaces_mib)  # the LBA sizes
        assert len(self.sector_sizes) == len(namespaces_mib)
        self.interrupt = interrupt
        self.files_dir = Path(files_dir) if files_dir is not None else None
        # Malloc namespaces live in the target's DPDK memory, beside its own buffers.
        self.mem_mb = mem_mb or (512 if files_dir is not None else sum(namespaces_mib) + 512)
        self.files: list[Path] = []  # the namespaces' files, removed at stop
        self.cpu = cpu
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "nvmf_tgt.log"

    def device(self, ns: int) -> str:
        return (f"spdk:trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:{self.port} "
                f"subnqn:{NQN} ns:{ns}")

    def perf_target(self, ns: int) -> str:
        """The same namespace as spdk_nvme_perf's -r takes it."""
        return self.device(ns).removeprefix("spdk:")

    def config(self) -> dict:
        if self.files_dir is None:
            bdevs = [{"method": "bdev_malloc_create",
                      "params": {"name": f"Ram{k}", "num_blocks": (mib << 20) // sector,
                                 "block_size": sector}}
                     for k, (mib, sector) in enumerate(zip(self.namespaces_mib,
                                                           self.sector_sizes))]
        else:
            bdevs = [{"method": "bdev_aio_create",
                      "params": {"name": f"Ram{k}", "filename": str(path),
                                 "block_size": sector}}
                     for k, (path, sector) in enumerate(zip(self.files, self.sector_sizes))]
        nvmf = [
            {"method": "nvmf_create_transport", "params": {"trtype": "TCP"}},
            {"method": "nvmf_create_subsystem",
             "params": {"nqn": NQN, "allow_any_host": True, "serial_number": "WQS00000001",
                        "max_namespaces": len(self.namespaces_mib)}},
            *[{"method": "nvmf_subsystem_add_ns",
               "params": {"nqn": NQN, "namespace": {"bdev_name": f"Ram{k}", "nsid": k + 1}}}
              for k in range(len(self.namespaces_mib))],
            {"method": "nvmf_subsystem_add_listener",
             "params": {"nqn": NQN, "listen_address": {"trtype": "TCP", "adrfam": "IPv4",
                                                       "traddr": "127.0.0.1",
                                                       "trsvcid": str(self.port)}}},
        ]
        return {"subsystems": [{"subsystem": "bdev", "config": bdevs},
                               {"subsystem": "nvmf", "config": nvmf}]}

    def start(self) -> "NvmfTarget":
        if self.files_dir is not None:
            self.files = [self.files_dir / f"wqs-nvmf-{os.getpid()}-{self.port}-ns{k + 1}"
                          for k in range(len(self.namespaces_mib))]
            for path, mib in zip(self.files, self.namespaces_mib):
                with open(path, "wb") as f:  # sparse: RAM is used as blocks are written
                    f.truncate(mib << 20)
        cfg = self.workdir / "nvmf.json"
        cfg.write_text(json.dumps(self.config(), indent=1))
        cmd = [self.program, "-m", hex(1 << self.cpu), "--no-huge", "-s", str(self.mem_mb),
               "-r", str(self.workdir / "spdk.sock"), "--json", str(cfg),
               "--disable-cpumask-locks"]  # another SPDK app may hold the core's lock file
        if self.interrupt:
            cmd.append("--interrupt-mode")
        env = dict(os.environ, LD_LIBRARY_PATH=self.lib_dir + (
            os.pathsep + os.environ["LD_LIBRARY_PATH"] if os.environ.get("LD_LIBRARY_PATH")
            else ""))
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._listening():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nvmf_tgt did not listen on 127.0.0.1:{self.port}:\n"
                                   f"{self.log_text()}")
            time.sleep(0.1)
        return self

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        shutil.rmtree(self.workdir / "spdk.sock", ignore_errors=True)
        for path in self.files:
            path.unlink(missing_ok=True)
        self.files = []

    def __enter__(self) -> "NvmfTarget":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
