"""The SPDK the device tests use, if the machine has one, and its NVMe-oF target.

Nothing of SPDK is in this repository: the tests use an SPDK the machine has, named by
two environment variables:

    WQS_TEST_SPDK_LIB_DIR   directory of SPDK's shared libraries (libspdk_nvme.so, ...;
                            an SPDK built with --with-shared and installed with
                            `make install`)
    WQS_TEST_NVMF_TGT       SPDK's nvmf_tgt program

The target (bench/nvmf.py) takes the last CPU this process may use; the tests keep
their own processes on the others.
"""

from __future__ import annotations

import os
from pathlib import Path

from bench.nvmf import NvmfTarget

LIB_DIR_ENV = "WQS_TEST_SPDK_LIB_DIR"
NVMF_TGT_ENV = "WQS_TEST_NVMF_TGT"


def missing() -> str | None:
    """Why the SPDK device tests cannot run here, or None."""
    lib_dir, tgt = os.environ.get(LIB_DIR_ENV), os.environ.get(NVMF_TGT_ENV)
    if not lib_dir or not tgt:
        unset = " and ".join(v for v, x in ((LIB_DIR_ENV, lib_dir), (NVMF_TGT_ENV, tgt))
                             if not x)
        return (f"no SPDK configured: {unset} not set ({LIB_DIR_ENV}: directory of SPDK's "
                f"shared libraries, {NVMF_TGT_ENV}: its nvmf_tgt program; see "
                "tests/spdk_target.py)")
    if not os.path.exists(os.path.join(lib_dir, "libspdk_nvme.so")):
        return f"{LIB_DIR_ENV}={lib_dir} has no libspdk_nvme.so"
    if not (os.path.isfile(tgt) and os.access(tgt, os.X_OK)):
        return f"{NVMF_TGT_ENV}={tgt} is not an executable program"
    if len(os.sched_getaffinity(0)) < 2:
        return "the SPDK target needs a core of its own: this process may use only one CPU"
    return None


def target_cpu() -> int:
    """The CPU the target takes: the last one this process may use."""
    return max(os.sched_getaffinity(0))


def other_cpus() -> set[int]:
    return set(os.sched_getaffinity(0)) - {target_cpu()}


RAM_DIR = "/dev/shm"


def target(workdir: Path, port: int, namespaces_mib: list[int],
           sector_sizes: list[int] | None = None) -> NvmfTarget:
    """A target for the tests. The namespaces are files in RAM_DIR (a tmpfs) where it
    has room, and the target runs in interrupt mode: it sleeps between requests instead
    of spinning on its core (the tests measure nothing). Elsewhere, malloc bdevs and a
    spinning target (see bench/nvmf.py)."""
    need = sum(namespaces_mib) << 20
    try:
        st = os.statvfs(RAM_DIR)
        in_ram = os.access(RAM_DIR, os.W_OK) and st.f_bavail * st.f_frsize > 2 * need
    except OSError:
        in_ram = False
    return NvmfTarget(os.environ[NVMF_TGT_ENV], os.environ[LIB_DIR_ENV], workdir, port,
                      namespaces_mib, cpu=target_cpu(), interrupt=in_ram,
                      files_dir=RAM_DIR if in_ram else None, sector_sizes=sector_sizes)
