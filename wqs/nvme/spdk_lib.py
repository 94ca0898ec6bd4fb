"""SPDK's user-space NVMe driver through ctypes: loading an installed libspdk, the
environment (once per process), a controller, its namespace and one IO queue pair.

Nothing here is built with the project: the operator installs SPDK (tested: v26.05,
built as shared libraries) and names its library directory in `engine.spdk.lib_dir`
(unset: the system's library path). The libraries are loaded with RTLD_GLOBAL, each
after the SPDK libraries it needs (found by asking the dynamic loader what is missing,
so no ELF parsing), and the socket implementation (libspdk_sock_posix) explicitly:
it registers itself when loaded, and NVMe over TCP needs one.

ABI: only C functions of SPDK's public headers are called, with arguments of plain C
types. Two structs are laid out here: `spdk_env_opts` (include/spdk/env.h, 128 B since
v24.09; passed with its `opts_size`) and the head of `spdk_nvme_io_qpair_opts` (its
first four fields, passed with opts_size 16: SPDK fills the rest with defaults, which
is what opts_size is for). A completion's status word is read at its fixed offset 14
in `struct spdk_nvme_cpl` (16 B, from the NVMe specification).

Process-wide state: SPDK's environment (DPDK's EAL) can be initialised once per
process and does not survive fork(), so the loaded library and the environment are
kept per process (`_PROCESS`), and a daemon's supervisor never initialises it: it asks
a child process (spdk.py), and each shard process initialises its own.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

from wqs.errors import DeviceError
from wqs.nvme.spdk_target import SpdkTarget

log = logging.getLogger("wqs.nvme")

# Loaded explicitly, in this order; what they need comes first, found on the way.
LIBRARIES = ("libspdk_env_dpdk.so", "libspdk_sock_posix.so", "libspdk_nvme.so")
LIB_DIR_KEY = "engine.spdk.lib_dir"

SPDK_MALLOC_DMA = 0x01
SPDK_ENV_NUMA_ID_ANY = -1
SPDK_NVME_IO_FLAGS_FORCE_UNIT_ACCESS = 1 << 30
SPDK_LOG_WARN = 1
TRID_SIZE = 1024  # struct spdk_nvme_transport_id is 564 B in v26.05; room to spare
IO_QUEUE_REQUESTS = 4096  # requests per queue pair: a large IO is split into several
CPL_STATUS_OFFSET = 14  # struct spdk_nvme_cpl: cdw0, cdw1, sqhd, sqid, cid, status

CommandCallback = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)


class EnvOpts(ctypes.Structure):
    """struct spdk_env_opts (include/spdk/env.h, v24.09+)."""

    _fields_ = [
        ("name", ctypes.c_char_p),
        ("core_mask", ctypes.c_char_p),
        ("lcore_map", ctypes.c_char_p),
        ("shm_id", ctypes.c_int),
        ("mem_channel", ctypes.c_int),
        ("main_core", ctypes.c_int),
        ("mem_size", ctypes.c_int),
        ("no_pci", ctypes.c_bool),
        ("hugepage_single_segments", ctypes.c_bool),
        ("unlink_hugepage", ctypes.c_bool),
        ("no_huge", ctypes.c_bool),
        ("reserved", ctypes.c_uint32),
        ("num_pci_addr", ctypes.c_size_t),
        ("hugedir", ctypes.c_char_p),
        ("pci_blocked", ctypes.c_void_p),
        ("pci_allowed", ctypes.c_void_p),
        ("iova_mode", ctypes.c_char_p),
        ("base_virtaddr", ctypes.c_uint64),
        ("env_context", ctypes.c_void_p),
        ("vf_token", ctypes.c_char_p),
        ("opts_size", ctypes.c_size_t),
        ("enforce_numa", ctypes.c_bool),
        ("reserved2", ctypes.c_uint8 * 7),
    ]


assert ctypes.sizeof(EnvOpts) == 128, "struct spdk_env_opts is 128 bytes"


class IoQpairOptsHead(ctypes.Structure):
    """The first fields of struct spdk_nvme_io_qpair_opts."""

    _fields_ = [
        ("qprio", ctypes.c_int),
        ("io_queue_size", ctypes.c_uint32),
        ("io_queue_requests", ctypes.c_uint32),
        ("delay_cmd_submit", ctypes.c_bool),
        ("reserved13", ctypes.c_uint8 * 3),
    ]


_vp, _u32, _u64, _int = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int
# name: (restype, argtypes)
_FUNCTIONS: dict[str, tuple[Any, list[Any]]] = {
    "spdk_env_opts_init": (None, [ctypes.POINTER(EnvOpts)]),
    "spdk_env_init": (_int, [ctypes.POINTER(EnvOpts)]),
    "spdk_zmalloc": (_vp, [ctypes.c_size_t, ctypes.c_size_t, _vp, _int, _u32]),
    "spdk_free": (None, [_vp]),
    "spdk_log_set_print_level": (None, [_int]),
    "spdk_nvme_transport_id_parse": (_int, [_vp, ctypes.c_char_p]),
    "spdk_nvme_connect": (_vp, [_vp, _vp, ctypes.c_size_t]),
    "spdk_nvme_detach": (_int, [_vp]),
    "spdk_nvme_ctrlr_is_active_ns": (ctypes.c_bool, [_vp, _u32]),
    "spdk_nvme_ctrlr_get_first_active_ns": (_u32, [_vp]),
    "spdk_nvme_ctrlr_get_next_active_ns": (_u32, [_vp, _u32]),
    "spdk_nvme_ctrlr_get_ns": (_vp, [_vp, _u32]),
    "spdk_nvme_ns_get_sector_size": (_u32, [_vp]),
    "spdk_nvme_ns_get_size": (_u64, [_vp]),
    "spdk_nvme_ns_get_md_size": (_u32, [_vp]),
    "spdk_nvme_ns_supports_extended_lba": (ctypes.c_bool, [_vp]),
    "spdk_nvme_ns_get_pi_type": (_int, [_vp]),
    "spdk_nvme_ns_get_max_io_xfer_size": (_u32, [_vp]),
    "spdk_nvme_ctrlr_get_default_io_qpair_opts": (None, [_vp, ctypes.POINTER(IoQpairOptsHead),
                                                         ctypes.c_size_t]),
    "spdk_nvme_ctrlr_alloc_io_qpair": (_vp, [_vp, ctypes.POINTER(IoQpairOptsHead),
                                             ctypes.c_size_t]),
    "spdk_nvme_ctrlr_free_io_qpair": (_int, [_vp]),
    "spdk_nvme_ns_cmd_read": (_int, [_vp, _vp, _vp, _u64, _u32, CommandCallback, _vp, _u32]),
    "spdk_nvme_ns_cmd_write": (_int, [_vp, _vp, _vp, _u64, _u32, CommandCallback, _vp, _u32]),
    "spdk_nvme_ns_cmd_flush": (_int, [_vp, _vp, CommandCallback, _vp]),
    "spdk_nvme_qpair_process_completions": (ctypes.c_int32, [_vp, _u32]),
    "spdk_nvme_ctrlr_process_admin_completions": (ctypes.c_int32, [_vp]),
}


class Library:
    """The SPDK functions WQS calls, bound from the loaded libraries."""

    def __init__(self, handles: list[ctypes.CDLL], where: str) -> None:
        self.where = where
        for name, (restype, argtypes) in _FUNCTIONS.items():
            fn = _find(handles, name)
            if fn is None:
                raise DeviceError(f"the SPDK library in {where} has no {name}: it is not a "
                                  "version WQS supports (tested: v26.05)")
            fn.restype = restype
            fn.argtypes = argtypes
            setattr(self, name, fn)


def _find(handles: list[ctypes.CDLL], name: str) -> Any:
    for h in handles:
        try:
            return getattr(h, name)
        except AttributeError:
            continue
    return None


_MISSING = re.compile(r"(lib[\w.+-]+\.so[\w.]*): cannot open shared object file")


def load_library(lib_dir: str | None) -> Library:
    """Load SPDK from lib_dir (None: the system's library path); a clear DeviceError
    naming the key and the path tried when it is not there."""
    if lib_dir is not None and not os.path.isdir(lib_dir):
        raise DeviceError(f"SPDK library not found: {LIB_DIR_KEY} is {lib_dir!r}, which is "
                          "not a directory (it should hold libspdk_nvme.so)")
    handles: list[ctypes.CDLL] = []
    loaded: set[str] = set()
    for name in LIBRARIES:
        path = os.path.join(lib_dir, name) if lib_dir else name
        if lib_dir is not None and not os.path.exists(path):
            raise DeviceError(f"SPDK library not found: {LIB_DIR_KEY} is {lib_dir!r} and "
                              f"{path} does not exist (SPDK built with --with-shared "
                              "installs it there)")
        handles.append(_load(path, lib_dir, loaded))
    where = lib_dir or "the system's library path"
    return Library(handles, where)


def _load(path: str, lib_dir: str | None, loaded: set[str], depth: int = 0) -> ctypes.CDLL:
    """dlopen(path, RTLD_GLOBAL), first loading from lib_dir whatever it needs that the
    loader cannot find on its own (SPDK's libraries need each other)."""
    assert depth < 64, "dependency chain too deep"
    while True:
        try:
            handle = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            loaded.add(os.path.basename(path))
            return handle
        except OSError as e:
            m = _MISSING.search(str(e))
            dep = m.group(1) if m else None
            if lib_dir is None or dep is None or dep in loaded \
                    or not os.path.exists(os.path.join(lib_dir, dep)):
                if lib_dir is None and dep == os.path.basename(path):
                    raise DeviceError(
                        f"SPDK library not found: {LIB_DIR_KEY} is not set and {dep} is not "
                        "on the system's library path; set it to the directory of "
                        "SPDK's shared libraries (e.g. /usr/local/lib)") from None
                raise DeviceError(f"cannot load {path}: {e}") from None
            _load(os.path.join(lib_dir, dep), lib_dir, loaded, depth + 1)


@dataclass
class _Process:
    pid: int
    lib: Library
    env_ok: bool = False


_PROCESS: dict[str, _Process] = {}  # lib_dir (or "") -> this process's SPDK; see above


def environment(lib_dir: str | None, mem_size: int, hugepages: bool,
                pcie: bool) -> Library:
    """The library, with SPDK's environment initialised in this process (once)."""
    key = lib_dir or ""
    state = _PROCESS.get(key)
    if state is None or state.pid != os.getpid():
        if any(p.pid == os.getpid() and p.env_ok for p in _PROCESS.values()):
            raise DeviceError("SPDK is already initialised in this process from another "
                              f"library directory than {lib_dir!r}")
        state = _Process(os.getpid(), load_library(lib_dir))
        _PROCESS.clear()  # a parent's state is not ours (after fork)
        _PROCESS[key] = state
    if not state.env_ok:
        _init_env(state.lib, mem_size, hugepages, pcie)
        state.env_ok = True
    return state.lib


def _init_env(lib: Library, mem_size: int, hugepages: bool, pcie: bool) -> None:
    opts = EnvOpts()
    opts.opts_size = ctypes.sizeof(EnvOpts)
    lib.spdk_env_opts_init(ctypes.byref(opts))
    # DPDK pins the calling thread to its main core: give it one this process may use,
    # and give the thread its whole set back afterwards.
    cpus = sorted(os.sched_getaffinity(0))
    name = f"wqs{os.getpid()}".encode()
    mask = f"{1 << cpus[0]:#x}".encode()
    # Kept alive until spdk_env_init returns (it copies what it keeps).
    context = ctypes.create_string_buffer(b"--log-level=lib.eal:4")
    opts.name = name
    opts.core_mask = mask
    opts.shm_id = -1  # no shared configuration: every process is its own primary
    opts.mem_size = max(mem_size >> 20, 64)
    opts.no_huge = not hugepages
    opts.no_pci = not pcie
    opts.env_context = ctypes.addressof(context)
    lib.spdk_log_set_print_level(SPDK_LOG_WARN)
    rc = lib.spdk_env_init(ctypes.byref(opts))
    os.sched_setaffinity(0, cpus)
    if rc < 0:
        hint = ("hugepages are configured (engine.spdk.hugepages) but none are free: "
                "see /proc/meminfo" if hugepages else "not enough memory for "
                f"engine.spdk.mem_size ({mem_size >> 20} MiB)")
        raise DeviceError(f"SPDK environment initialisation failed: {os.strerror(-rc)} "
                          f"({hint})")


class Controller:
    """A connected controller, one namespace of it, and one IO queue pair."""

    def __init__(self, lib: Library, target: SpdkTarget) -> None:
        self.lib = lib
        self.target = target
        trid = ctypes.create_string_buffer(TRID_SIZE)
        if lib.spdk_nvme_transport_id_parse(trid, target.trid().encode()) != 0:
            raise DeviceError(f"SPDK did not accept the transport ID {target.trid()!r}")
        self.ctrlr = lib.spdk_nvme_connect(trid, None, 0)
        if not self.ctrlr:
            raise DeviceError(f"{target.where()} is not reachable: spdk_nvme_connect "
                              "failed (is the target up, the address and subnqn right? "
                              "SPDK's own message is in the log above)")
        self.ns = None
        self.qpair = None
        try:
            self._open_namespace()
            self._open_qpair()
        except BaseException:
            self.close()
            raise

    def _open_namespace(self) -> None:
        from wqs.nvme.spdk_target import check_namespace

        lib, ctrlr, nsid = self.lib, self.ctrlr, self.target.ns
        active = bool(lib.spdk_nvme_ctrlr_is_active_ns(ctrlr, nsid))
        ns = lib.spdk_nvme_ctrlr_get_ns(ctrlr, nsid) if active else None
        if not ns:
            ids = []
            n = lib.spdk_nvme_ctrlr_get_first_active_ns(ctrlr)
            while n and len(ids) < 64:
                ids.append(n)
                n = lib.spdk_nvme_ctrlr_get_next_active_ns(ctrlr, n)
            check_namespace(self.target.where(), nsid, active=False, sector_size=0, size=0,
                            active_ids=tuple(ids))
        self.ns = ns
        self.sector_size = int(lib.spdk_nvme_ns_get_sector_size(ns))
        self.size = check_namespace(
            self.target.where(), nsid, active=True, sector_size=self.sector_size,
            size=int(lib.spdk_nvme_ns_get_size(ns)),
            md_size=int(lib.spdk_nvme_ns_get_md_size(ns)),
            extended_lba=bool(lib.spdk_nvme_ns_supports_extended_lba(ns)),
            pi_type=int(lib.spdk_nvme_ns_get_pi_type(ns)))
        self.max_xfer = int(lib.spdk_nvme_ns_get_max_io_xfer_size(ns))

    def _open_qpair(self) -> None:
        opts = IoQpairOptsHead()
        self.lib.spdk_nvme_ctrlr_get_default_io_qpair_opts(self.ctrlr, ctypes.byref(opts),
                                                           ctypes.sizeof(opts))
        opts.io_queue_requests = max(opts.io_queue_requests, IO_QUEUE_REQUESTS)
        self.qpair = self.lib.spdk_nvme_ctrlr_alloc_io_qpair(self.ctrlr, ctypes.byref(opts),
                                                             ctypes.sizeof(opts))
        if not self.qpair:
            raise DeviceError(f"{self.target.where()}: no IO queue pair could be created "
                              "(the controller's queue count is used up?)")

    def close(self) -> None:
        if self.qpair:
            self.lib.spdk_nvme_ctrlr_free_io_qpair(self.qpair)
            self.qpair = None
        if self.ctrlr:
            self.lib.spdk_nvme_detach(self.ctrlr)
            self.ctrlr = None


class IoQpair:
    """The controller's IO queue pair, shared by the device's synchronous IO and its
    ring: each registers a sink and issues commands through a `QpairView`, whose tags
    carry the sink's number in their high bits; every finished command goes to its
    sink as sink(tag, status word), whoever polled."""

    SINK_SHIFT = 32

    def __init__(self, ctrl: Controller) -> None:
        self.ctrl = ctrl
        self.sector_size = ctrl.sector_size
        self.sinks: list[Callable[[int, int], None]] = []
        self.callback = CommandCallback(self._done)  # kept alive as long as we are

    def view(self, sink: Callable[[int, int], None] | None = None) -> "QpairView":
        """A view with a sink of its own (set now, or later with attach)."""
        self.sinks.append(sink or _no_sink)
        return QpairView(self, len(self.sinks) - 1)

    def attach(self, view: "QpairView", sink: Callable[[int, int], None]) -> None:
        self.sinks[view.sink] = sink

    def _done(self, arg: int | None, cpl: int) -> None:
        tag = arg or 0
        try:
            status = ctypes.c_uint16.from_address(cpl + CPL_STATUS_OFFSET).value
            self.sinks[tag >> self.SINK_SHIFT](tag & 0xFFFFFFFF, status)
        except Exception:  # noqa: BLE001 - an exception cannot cross back into C
            log.exception("SPDK completion callback failed")


def _no_sink(tag: int, status: int) -> None:
    raise AssertionError(f"completion of tag {tag} for a view with no sink")


class QpairView:
    """spdk_ring.Qpair over an IoQpair, for one sink."""

    def __init__(self, qpair: IoQpair, sink: int) -> None:
        ctrl, lib = qpair.ctrl, qpair.ctrl.lib
        self.sector_size = qpair.sector_size
        self.sink = sink
        self._high = sink << IoQpair.SINK_SHIFT
        self._cb = qpair.callback
        self._ns, self._qp, self._ctrlr = ctrl.ns, ctrl.qpair, ctrl.ctrlr
        self._read = lib.spdk_nvme_ns_cmd_read
        self._write = lib.spdk_nvme_ns_cmd_write
        self._flush = lib.spdk_nvme_ns_cmd_flush
        self._process = lib.spdk_nvme_qpair_process_completions
        self._admin = lib.spdk_nvme_ctrlr_process_admin_completions

    def read(self, addr: int, lba: int, count: int, tag: int) -> int:
        return self._read(self._ns, self._qp, addr, lba, count, self._cb, self._high | tag, 0)

    def write(self, addr: int, lba: int, count: int, tag: int, fua: bool) -> int:
        return self._write(self._ns, self._qp, addr, lba, count, self._cb, self._high | tag,
                           SPDK_NVME_IO_FLAGS_FORCE_UNIT_ACCESS if fua else 0)

    def flush_cache(self, tag: int) -> int:
        """NVMe Flush: the volatile write cache to media."""
        return self._flush(self._ns, self._qp, self._cb, self._high | tag)

    def process(self) -> int:
        return self._process(self._qp, 0)

    def process_admin(self) -> int:
        return self._admin(self._ctrlr)


def dma_alloc(lib: Library, nbytes: int, align: int = 4096) -> int:
    """nbytes of zeroed DMA memory; its address, or 0 when the environment has none left."""
    return lib.spdk_zmalloc(nbytes, align, None, SPDK_ENV_NUMA_ID_ANY, SPDK_MALLOC_DMA) or 0
