"""SPDK's user-space NVMe driver through ctypes: loading an installed libspdk, the
environment (once per process), a controller, its namespace and one IO queue pair.

Nothing here is built with the project: the operator installs SPDK (tested: v26.05,
built with --with-shared and installed with `make install`) and names its library
directory in `engine.spdk.lib_dir` (unset: the system's library path). Loading, all
with RTLD_GLOBAL: first the system and DPDK libraries SPDK's libraries call without
listing them as dependencies (a program linked against SPDK names them; SPDK's
pkg-config files spdk_syslibs.pc and spdk_dpdklibs.pc say which), then SPDK's own,
each after the SPDK libraries it needs (found by asking the dynamic loader what is
missing, so no ELF parsing), the socket implementation (libspdk_sock_posix)
explicitly: it registers itself when loaded, and NVMe over TCP needs one. SPDK's env
and util libraries need each other's symbols at load time (they are linked with
BIND_NOW), so the loader must find them by itself: an installed SPDK's libraries carry
their directory as run path.

ABI: only C functions of SPDK's public headers are called, with arguments of plain C
types. Two structs are laid out here, whole, with their sizes asserted:
`spdk_env_opts` (include/spdk/env.h, 128 B) and `spdk_nvme_io_qpair_opts` (80 B),
each passed with its `opts_size` (SPDK's way of staying compatible with callers built
against older headers). The transport ID is a zeroed buffer larger than its struct
(564 B in v26.05), filled by SPDK's parser. A completion's status word is read at its
fixed offset 14 in `struct spdk_nvme_cpl` (16 B, from the NVMe specification).

Process-wide state: SPDK's environment (DPDK's EAL) can be initialised once per
process and does not survive fork(), so the loaded library and the environment are
kept per process (`_PROCESS`), and a daemon's supervisor never initialises it: it asks
a child process (spdk.py), and each shard process initialises its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
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


class IoQpairOpts(ctypes.Structure):
    """struct spdk_nvme_io_qpair_opts (include/spdk/nvme.h, v24.01+). Laid out whole:
    SPDK writes its `opts_size` field whatever opts_size says."""

    _fields_ = [
        ("qprio", ctypes.c_int),
        ("io_queue_size", ctypes.c_uint32),
        ("io_queue_requests", ctypes.c_uint32),
        ("delay_cmd_submit", ctypes.c_bool),
        ("reserved13", ctypes.c_uint8 * 3),
        ("sq", ctypes.c_uint64 * 3),  # vaddr, paddr, buffer_size
        ("cq", ctypes.c_uint64 * 3),
        ("create_only", ctypes.c_bool),
        ("async_mode", ctypes.c_bool),
        ("disable_pcie_sgl_merge", ctypes.c_bool),
        ("reserved67", ctypes.c_uint8 * 5),
        ("opts_size", ctypes.c_size_t),
    ]


assert ctypes.sizeof(IoQpairOpts) == 80, "struct spdk_nvme_io_qpair_opts is 80 bytes"


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
    "spdk_nvme_ctrlr_get_default_io_qpair_opts": (None, [_vp, ctypes.POINTER(IoQpairOpts),
                                                         ctypes.c_size_t]),
    "spdk_nvme_ctrlr_alloc_io_qpair": (_vp, [_vp, ctypes.POINTER(IoQpairOpts),
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
    for name in LIBRARIES:
        path = os.path.join(lib_dir, name) if lib_dir else name
        if lib_dir is not None and not os.path.exists(path):
            raise DeviceError(f"SPDK library not found: {LIB_DIR_KEY} is {lib_dir!r} and "
                              f"{path} does not exist (SPDK built with --with-shared "
                              "installs it there)")
    # DPDK's libraries first: SPDK's env library calls them without listing them. The
    # system libraries only if SPDK's need more than they list themselves: preloaded
    # up front, a system copy of one SPDK brings its own of (isa-l) would win.
    handles = _preload_dependencies(lib_dir, "spdk_dpdklibs.pc")
    loaded: set[str] = set()
    try:
        for name in LIBRARIES:
            handles.append(_load(os.path.join(lib_dir, name) if lib_dir else name, lib_dir,
                                 loaded))
    except DeviceError as e:
        if "undefined symbol" not in str(e) or "undefined symbol: spdk_" in str(e):
            raise
        handles += _preload_dependencies(lib_dir, "spdk_syslibs.pc")
        for name in LIBRARIES:
            handles.append(_load(os.path.join(lib_dir, name) if lib_dir else name, lib_dir,
                                 loaded))
    _bind_now(loaded)
    where = lib_dir or "the system's library path"
    return Library(handles, where)


# What SPDK's libraries use without naming it (a program linking SPDK names these, from
# the pkg-config files SPDK installs beside them): used when those files are not there.
_FALLBACK_DEPENDENCIES = {
    "spdk_syslibs.pc": ("isal", "isal_crypto", "uuid", "ssl", "crypto", "aio", "bsd", "numa"),
    "spdk_dpdklibs.pc": ("rte_eal", "rte_kvargs", "rte_log", "rte_telemetry", "rte_argparse",
                         "rte_mempool_ring", "rte_mempool", "rte_ring", "rte_bus_pci",
                         "rte_pci", "rte_power", "rte_timer", "rte_ethdev", "rte_net",
                         "rte_mbuf", "rte_meter"),
}
_IN_LIBC = {"pthread", "rt", "m", "dl", "c"}
_SPDK_BUILDS = {"isal", "isal_crypto"}


def _preload_dependencies(lib_dir: str | None, pc: str) -> list[ctypes.CDLL]:
    """Libraries SPDK's shared libraries call into but do not list as their own
    dependencies, loaded with RTLD_GLOBAL. Their names come from SPDK's pkg-config file
    `pc` in <lib_dir>/pkgconfig (else a list of the usual ones). One that cannot be found
    is left out: loading SPDK then names the symbol it misses."""
    handles = []
    path = os.path.join(lib_dir, "pkgconfig", pc) if lib_dir else ""
    dirs, names = _read_pc(path) if path and os.path.exists(path) else \
        ([], list(_FALLBACK_DEPENDENCIES[pc]))
    for name in names:
        if name in _IN_LIBC:
            continue
        # SPDK builds isa-l itself and its libraries find it by their run path: a system
        # copy (often older, without what SPDK calls) must not be loaded in its place.
        handle = _load_system(name, dirs, search_system=name not in _SPDK_BUILDS)
        if handle is not None:
            handles.append(handle)
    return handles


def _read_pc(path: str) -> tuple[list[str], list[str]]:
    """The -L directories and -l names of a pkg-config file's Libs line."""
    dirs, names = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("Libs:"):
                for word in line[5:].split():
                    if word.startswith("-L"):
                        dirs.append(word[2:])
                    elif word.startswith("-l"):
                        names.append(word[2:])
    return dirs, names


def _load_system(name: str, dirs: list[str], search_system: bool) -> ctypes.CDLL | None:
    candidates = []
    for d in dirs:
        candidates += sorted(glob.glob(os.path.join(d, f"lib{name}.so*")), key=len)[:1]
    found = ctypes.util.find_library(name) if search_system else None
    if found:
        candidates.append(found)
    for path in candidates:
        try:
            return ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
    return None


def _load(path: str, lib_dir: str | None, loaded: set[str], depth: int = 0) -> ctypes.CDLL:
    """dlopen(path) with RTLD_GLOBAL, first loading from lib_dir the SPDK libraries it
    needs that the loader cannot find on its own.

    Lazily bound: SPDK's env and util libraries call each other, so neither loads first
    with every symbol resolved; `_bind_now` checks every symbol once all are loaded."""
    assert depth < 64, "dependency chain too deep"
    dl = _dl()
    while True:
        handle = dl.dlopen(path.encode(), os.RTLD_LAZY | os.RTLD_GLOBAL)
        if handle:
            loaded.add(path)
            return ctypes.CDLL(path, handle=handle)
        error = (dl.dlerror() or b"").decode(errors="replace")
        m = _MISSING.search(error)
        dep = m.group(1) if m else None
        known = {os.path.basename(p) for p in loaded}
        if lib_dir is None or dep is None or dep in known \
                or not os.path.exists(os.path.join(lib_dir, dep)):
            if lib_dir is None and dep == os.path.basename(path):
                raise DeviceError(
                    f"SPDK library not found: {LIB_DIR_KEY} is not set and {dep} is not "
                    "on the system's library path; set it to the directory of "
                    "SPDK's shared libraries (e.g. /usr/local/lib)")
            if "undefined symbol: spdk_" in error:  # SPDK's libraries need each other
                raise DeviceError(
                    f"cannot load {path}: {error}: SPDK's libraries in {lib_dir} do not "
                    "find each other. Install SPDK with `make install` (its libraries then "
                    "carry their directory, the --prefix's lib, as run path), or add "
                    f"{lib_dir} to the loader's path (ldconfig, or LD_LIBRARY_PATH when "
                    "the daemon starts)")
            raise DeviceError(f"cannot load {path}: {error}")
        _load(os.path.join(lib_dir, dep), lib_dir, loaded, depth + 1)


def _bind_now(loaded: set[str]) -> None:
    """Resolve every symbol of the loaded SPDK libraries now (RTLD_NOLOAD|RTLD_NOW), so
    one missing is an error here, naming it, and not a crash at its first call."""
    dl = _dl()
    for path in sorted(loaded):
        if not dl.dlopen(path.encode(), os.RTLD_NOW | os.RTLD_NOLOAD | os.RTLD_GLOBAL):
            error = (dl.dlerror() or b"").decode(errors="replace")
            raise DeviceError(f"cannot load {path}: {error} (a system or DPDK library SPDK "
                              "uses is missing; SPDK's pkgconfig/spdk_syslibs.pc and "
                              "spdk_dpdklibs.pc beside it name them)")


def _dl() -> Any:
    libc = ctypes.CDLL(None)
    libc.dlopen.restype = ctypes.c_void_p
    libc.dlopen.argtypes = [ctypes.c_char_p, ctypes.c_int]
    libc.dlerror.restype = ctypes.c_char_p
    libc.dlerror.argtypes = []
    return libc


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
        opts = IoQpairOpts()
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
