"""Configuration: dataclasses loaded from YAML, validated with errors that name the key.

Every dataclass checks and normalises its own fields in ``__post_init__`` (so a config
built in code is held to the same rules as one read from a file); a problem raises
``ConfigError("<dotted.key>: <what is wrong>, got <value>")``. Unknown keys are errors,
with a did-you-mean hint.

Sizes are ints (bytes) or strings: a number, optional spaces and an optional suffix.
Suffixes are binary and case-insensitive: ``B``; ``k``/``KB``/``KiB`` = 1024;
``M``/``MB``/``MiB`` = 1024**2; ``G``/``GB``/``GiB`` = 1024**3; ``T``/``TB``/``TiB``
= 1024**4. ``"1.5G"`` is fine (a whole number of bytes); ``"0.1k"`` is not.

Derived defaults are fixed when the object is built: ``control_listen`` is the data
port + 1, ``metrics_listen`` the data port + 2, ``device`` is ``<data_dir>/wqs.dev`` and
``node_id`` is ``<hostname>:<data port>``. (``dataclasses.replace`` keeps them.)
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import yaml

from wqs.errors import ConfigError

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
_UNITS = {"": 1, "b": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_HOST_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")


# --------------------------------------------------------------------------- parsers


def parse_size(value: str | int) -> int:
    """Bytes from an int or a string such as ``"16MiB"``, ``"256M"``, ``"1G"``, ``"64k"``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative, got {value}")
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)  # YAML reads 1e9 as a float
    if not isinstance(value, str):
        raise ValueError(f"expected a size like 16MiB, got {value!r}")
    m = _SIZE_RE.match(value)
    if not m or (m.group(3) and not m.group(2) and m.group(3).lower() == "ib"):
        raise ValueError(f"expected a size like 16MiB, 256M, 1G or 4096, got {value!r}")
    number, unit = m.group(1), _UNITS[m.group(2).lower()]
    if "." not in number:
        return int(number) * unit
    whole, frac = (number.split(".") + [""])[:2]
    scaled = int(whole or 0) * unit * 10 ** len(frac) + int(frac or 0) * unit
    if scaled % 10 ** len(frac):  # exact arithmetic: no float rounding on big sizes
        raise ValueError(f"size {value!r} is not a whole number of bytes")
    return scaled // 10 ** len(frac)


def parse_hostport(value: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6addr]:port"`` -> ``(host, port)``; the host is unbracketed."""
    if not isinstance(value, str):
        raise ValueError(f"expected host:port, got {value!r}")
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise ValueError(f"expected [ipv6]:port, got {value!r}")
        try:
            ipaddress.IPv6Address(host.split("%")[0])  # allow a %zone suffix
        except ValueError:
            raise ValueError(f"{host!r} in {value!r} is not an IPv6 address") from None
    else:
        host, sep, port = value.rpartition(":")
        if not sep:
            raise ValueError(f"expected host:port, got {value!r}")
        if ":" in host:
            raise ValueError(f"IPv6 addresses need brackets, as in [::1]:7070; got {value!r}")
        if not _HOST_RE.match(host):
            raise ValueError(f"bad host {host!r} in {value!r}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"port must be 1..65535, got {port!r} in {value!r}")
    return host, int(port)


def format_hostport(host: str, port: int) -> str:
    """Inverse of `parse_hostport` (brackets IPv6 hosts)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------- field checks
# Each takes the key (for the message) and the raw value, and returns the clean value.


def _fail(key: str, problem: str, value: Any) -> ConfigError:
    return ConfigError(f"{key}: {problem}, got {value!r}")


def _size(key: str, v: Any, lo: int = 0, hi: int | None = None, multiple: int = 1) -> int:
    try:
        n = parse_size(v)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None
    if n % multiple:
        raise _fail(key, f"must be a multiple of {multiple}", v)
    if n < lo:
        raise _fail(key, f"must be at least {_fmt_size(lo)}", v)
    if hi is not None and n > hi:
        raise _fail(key, f"must be at most {_fmt_size(hi)}", v)
    return n


def _int(key: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        v = int(v)  # command-line overrides arrive as strings
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail(key, "must be an integer", v)
    if not lo <= v <= hi:
        raise _fail(key, f"must be in {lo}..{hi}", v)
    return v


def _float(key: str, v: Any, gt: float = 0.0) -> float:
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            raise _fail(key, "must be a number", v) from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _fail(key, "must be a number", v)
    if not v > gt:
        raise _fail(key, f"must be greater than {gt:g}", v)
    return float(v)


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _bool(key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in _TRUE | _FALSE:
        return v.lower() in _TRUE
    raise _fail(key, "must be true or false", v)


def _choice(key: str, v: Any, choices: tuple[str, ...]) -> str:
    if isinstance(v, str) and v.lower() in choices:
        return v.lower()
    raise _fail(key, f"must be one of {', '.join(choices)}", v)


def _str(key: str, v: Any, optional: bool = False) -> str | None:
    if v is None and optional:
        return None
    if not isinstance(v, str) or not v:
        raise _fail(key, "must be a non-empty string", v)
    return v


def _hostport(key: str, v: Any) -> str:
    try:
        return format_hostport(*parse_hostport(v))
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def _str_list(key: str, v: Any) -> list[str]:
    if isinstance(v, str):
        v = [s for s in v.split(",") if s.strip()]  # "a:1,b:2" from a command line
    if not isinstance(v, (list, tuple)):
        raise _fail(key, "must be a list", v)
    return [_str(f"{key}[{i}]", s).strip() for i, s in enumerate(v)]


def _list(key: str, v: Any) -> list[Any]:
    if v is None:
        return []
    if isinstance(v, str):
        v = [s.strip() for s in v.split(",") if s.strip()]  # "7073,7074" from a command line
    if not isinstance(v, (list, tuple)):
        raise _fail(key, "must be a list", v)
    return list(v)


def _fmt_size(n: int) -> str:
    for name, unit in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n} bytes"


def _nested(key: str, v: Any, cls: type) -> Any:
    """A nested section: a mapping becomes ``cls``; errors get the section's prefix."""
    if v is None or isinstance(v, cls):
        return v
    if not isinstance(v, Mapping):
        raise _fail(key, "must be a mapping", v)
    return _build(cls, v, key)


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else str(k)
            hint = difflib.get_close_matches(str(k), names, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else f"; known: {', '.join(names)}"
            raise ConfigError(f"{where}: unknown key{extra}")
    try:
        return cls(**data)
    except ConfigError as e:
        raise ConfigError(f"{prefix}.{e}" if prefix else str(e)) from None


# --------------------------------------------------------------------------- sections


@dataclass
class EtcdConfig:
    """Where nodes register (a lease per node) and clients discover them."""

    endpoints: list[str] = field(default_factory=lambda: ["127.0.0.1:2379"])
    prefix: str = "/wqs/nodes/"
    lease_ttl: int = 10  # seconds; a dead node drops out of the ring this long after

    def __post_init__(self) -> None:
        self.endpoints = _str_list("endpoints", self.endpoints)
        if not self.endpoints:
            raise _fail("endpoints", "needs at least one endpoint", self.endpoints)
        for i, ep in enumerate(self.endpoints):
            scheme, sep, rest = ep.partition("://")
            if sep and scheme not in ("http", "https"):
                raise _fail(f"endpoints[{i}]", "scheme must be http or https", ep)
            _hostport(f"endpoints[{i}]", rest.rstrip("/") if sep else ep)
        self.prefix = _str("prefix", self.prefix)
        if not self.prefix.startswith("/"):
            raise _fail("prefix", "must start with '/'", self.prefix)
        if not self.prefix.endswith("/"):
            self.prefix += "/"  # so "/wqs/nodes" cannot also match "/wqs/nodes2/..."
        self.lease_ttl = _int("lease_ttl", self.lease_ttl, 2, 3600)


@dataclass
class SpdkConfig:
    """The SPDK device backend (a device named ``spdk:<transport ID> ns:<n>``)."""

    # Directory of SPDK's shared libraries (libspdk_nvme.so, ...); None: the system's
    # library path. The daemon loads SPDK from here; nothing of SPDK ships with WQS.
    lib_dir: str | None = None
    mem_size: int = GiB  # DMA memory per process (each shard): IO buffers come from it
    hugepages: bool = False  # back it with hugepages (PCIe needs them); else plain memory
    # Longest a shard's loop sleeps between polls of its queue pair while IO is
    # outstanding; 0: spin, offering the core to other processes after each empty poll
    # (a short sleep costs more than that, bench/README.md#results-spdk-backend). With
    # nothing outstanding it sleeps as usual.
    poll_wait_us: int = 0

    def __post_init__(self) -> None:
        self.lib_dir = _str("lib_dir", self.lib_dir, optional=True)
        if self.lib_dir is not None and not os.path.isabs(self.lib_dir):
            raise _fail("lib_dir", "must be an absolute path", self.lib_dir)
        self.mem_size = _size("mem_size", self.mem_size, 64 * MiB, multiple=MiB)
        self.hugepages = _bool("hugepages", self.hugepages)
        self.poll_wait_us = _int("poll_wait_us", self.poll_wait_us, 0, 100_000)


@dataclass
class RdmaConfig:
    """The RDMA transport (wqs/rdma/): where the daemon takes RDMA_CONNECT."""

    # "auto": serve RDMA if an RDMA device is usable, else say why in the log and serve
    # TCP only; "on": refuse to start without it; "off".
    enabled: str = "auto"
    device: str | None = None  # e.g. mlx5_0; None: the first device
    port: int = 1
    gid_index: int = 0  # RoCE v2 over IPv4 is often 3: `show_gids` tells

    def __post_init__(self) -> None:
        self.enabled = _choice("enabled", self.enabled, ("auto", "on", "off"))
        self.device = _str("device", self.device, optional=True)
        self.port = _int("port", self.port, 1, 255)
        self.gid_index = _int("gid_index", self.gid_index, 0, 1 << 16)


@dataclass
class EngineConfig:
    """The storage engine's knobs."""

    region_size: int = 16 * MiB  # unit of allocation and eviction on the device
    max_block_size: int = 64 * MiB
    dram_cache_bytes: int = 256 * MiB  # hot tier in host memory; 0 disables it
    dram_policy: Literal["s3fifo", "lru"] = "s3fifo"
    # Which region goes and which of its blocks are copied forward (wqs/engine/policy.py).
    eviction: Literal["fifo", "lru", "block-lru"] = "block-lru"
    reinsert_hits: bool = True  # copy blocks still in use forward when their region goes
    sync: bool = False  # fdatasync after each write
    # How batches of device IO run: "aio" (Linux native AIO), "threads" (io_threads
    # threads, one IO each), or "auto" (AIO where the kernel allows it, else threads).
    io_engine: Literal["auto", "aio", "threads"] = "auto"
    io_threads: int = 16
    spdk: SpdkConfig = field(default_factory=SpdkConfig)  # for a device named spdk:...
    # Pins (a client's lease on blocks it is about to load, wqs/engine/pins.py): the
    # longest lease, and the most of the device pinned blocks may hold at once.
    max_pin_s: float = 30.0
    max_pinned_share: float = 0.25

    def __post_init__(self) -> None:
        self.region_size = _size("region_size", self.region_size, MiB, 4 * GiB, 4096)
        self.max_block_size = _size("max_block_size", self.max_block_size, 1, GiB)
        self.dram_cache_bytes = _size("dram_cache_bytes", self.dram_cache_bytes)
        self.dram_policy = _choice("dram_policy", self.dram_policy, ("s3fifo", "lru"))
        self.eviction = _choice("eviction", self.eviction, ("fifo", "lru", "block-lru"))
        self.reinsert_hits = _bool("reinsert_hits", self.reinsert_hits)
        self.max_pin_s = _float("max_pin_s", self.max_pin_s)
        self.max_pinned_share = _float("max_pinned_share", self.max_pinned_share)
        if self.max_pinned_share > 0.5:
            raise _fail("max_pinned_share", "must be at most 0.5 (the rest of the device "
                        "stays evictable)", self.max_pinned_share)
        self.sync = _bool("sync", self.sync)
        self.io_engine = _choice("io_engine", self.io_engine, ("auto", "aio", "threads"))
        self.io_threads = _int("io_threads", self.io_threads, 1, 1024)
        self.spdk = _nested("spdk", self.spdk, SpdkConfig) or SpdkConfig()


_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_OFF = ("", "off")
MAX_SOCKET_PATH = 107  # bytes of a Unix socket path (sun_path is 108 with its NUL)
TRANSPORTS = ("auto", "tcp", "shm", "rdma")


@dataclass
class DaemonConfig:
    """``wqsd``: one daemon serving one device."""

    listen: str = "127.0.0.1:7070"  # data plane
    control_listen: str | None = None  # None or "auto": data port + 1
    metrics_listen: str | None = "auto"  # "auto": data port + 2; None, "" or "off": disabled
    data_dir: str = "/var/lib/wqs"
    device: str | None = None  # None: <data_dir>/wqs.dev
    device_size: int = GiB  # size of the device file when it must be created
    auth_token: str | None = field(default=None, repr=False)
    auth_token_file: str | None = None  # read at load time (see load_daemon_config)
    node_id: str | None = None  # None: <hostname>:<data port>
    log_level: str = "info"
    # Shard processes, each with its own event loop, partition of the device and data
    # port. "auto": as the device is cut, or one per core for a new device.
    workers: int | str = "auto"
    # Data ports of shards 1.. (shard 0 uses `listen`); empty: ports the kernel picks.
    # Clients learn them from shard 0's HELLO; set them to open fixed firewall ports.
    shard_ports: list[int] = field(default_factory=list)
    max_connections: int = 1024  # per shard
    # Payload bytes a shard holds for requests in flight (PUT payloads received, GET
    # answers not yet sent): per connection and in all. Past either, reading pauses.
    max_connection_bytes: int = 64 * MiB
    max_inflight_bytes: int = 512 * MiB
    frame_timeout_s: float = 30.0  # a client stalled mid-request this long is dropped
    # Same-host clients: a Unix socket per shard (shard 0 at this path, shard k at
    # PATH.k) over which they register shared memory and move blocks through it.
    # "auto": <data_dir>/wqsd.sock; "off" (or null): TCP only.
    local_socket: str | None = "auto"
    local_socket_mode: int | str = 0o660  # who may connect: the socket file's mode ...
    local_socket_group: str | None = None  # ... and group (None: the daemon's)
    rdma: RdmaConfig = field(default_factory=RdmaConfig)
    etcd: EtcdConfig | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        self.listen = _hostport("listen", self.listen)
        host, port = parse_hostport(self.listen)
        if self.control_listen is None or str(self.control_listen).lower() == "auto":
            self.control_listen = format_hostport(host, _next_port("control_listen", port, 1))
        self.control_listen = _hostport("control_listen", self.control_listen)
        m = self.metrics_listen
        if m is None or m is False or (isinstance(m, str) and m.lower() in _OFF):
            self.metrics_listen = None  # YAML 1.1 reads a bare `off` as False
        else:
            if isinstance(m, str) and m.lower() == "auto":
                m = format_hostport(host, _next_port("metrics_listen", port, 2))
            self.metrics_listen = _hostport("metrics_listen", m)
        ports = (port, self.control_addr[1])
        if ports[1] == port:
            raise _fail("control_listen", "must use another port than listen", self.control_listen)
        if self.metrics_listen and self.metrics_addr[1] in ports:
            problem = "must use another port than listen and control_listen"
            raise _fail("metrics_listen", problem, self.metrics_listen)
        self.data_dir = _str("data_dir", self.data_dir)
        self.device = _str("device", self.device, optional=True) or os.path.join(
            self.data_dir, "wqs.dev"
        )
        if self.device.startswith("spdk:"):  # an SPDK transport ID: checked now
            from wqs.nvme.spdk_target import parse_device

            parse_device(self.device)
        self.device_size = _size("device_size", self.device_size, MiB, multiple=4096)
        self.auth_token = _str("auth_token", self.auth_token, optional=True)
        self.auth_token_file = _str("auth_token_file", self.auth_token_file, optional=True)
        self.node_id = _str("node_id", self.node_id, optional=True)
        self.node_id = self.node_id or f"{socket.gethostname()}:{port}"
        self.log_level = _choice("log_level", self.log_level, _LOG_LEVELS)
        if isinstance(self.workers, str) and self.workers.lower() == "auto":
            self.workers = "auto"
        else:
            self.workers = _int("workers", self.workers, 1, 253)
        self.shard_ports = [_int(f"shard_ports[{i}]", v, 1, 65535)
                            for i, v in enumerate(_list("shard_ports", self.shard_ports))]
        if len(set(self.shard_ports)) != len(self.shard_ports) or port in self.shard_ports:
            raise _fail("shard_ports", "lists a port twice, or the listen port", self.shard_ports)
        self.max_connection_bytes = _size("max_connection_bytes", self.max_connection_bytes,
                                          MiB)
        self.max_inflight_bytes = _size("max_inflight_bytes", self.max_inflight_bytes, MiB)
        self.max_connections = _int("max_connections", self.max_connections, 1, 1 << 20)
        self.frame_timeout_s = _float("frame_timeout_s", self.frame_timeout_s)
        ls = self.local_socket
        if ls is None or ls is False or (isinstance(ls, str) and ls.lower() in _OFF):
            self.local_socket = None
        else:
            ls = _str("local_socket", ls)
            if ls.lower() == "auto":
                ls = "auto"
            elif not os.path.isabs(ls):
                raise _fail("local_socket", "must be an absolute path, auto or off", ls)
            elif len(ls.encode()) + 4 > MAX_SOCKET_PATH:  # room for ".NNN" of shard 253
                raise _fail("local_socket", f"is longer than {MAX_SOCKET_PATH - 4} bytes, "
                            "the most a Unix socket path takes with a shard suffix", ls)
            self.local_socket = ls
        mode = self.local_socket_mode
        if isinstance(mode, str):
            try:
                mode = int(mode, 8)
            except ValueError:
                raise _fail("local_socket_mode", "must be an octal mode such as 0660",
                            self.local_socket_mode) from None
        self.local_socket_mode = _int("local_socket_mode", mode, 0, 0o777)
        self.local_socket_group = _str("local_socket_group", self.local_socket_group,
                                       optional=True)
        self.rdma = _nested("rdma", self.rdma, RdmaConfig) or RdmaConfig()
        self.etcd = _nested("etcd", self.etcd, EtcdConfig)
        self.engine = _nested("engine", self.engine, EngineConfig)
        if self.engine is None:
            raise _fail("engine", "must be a mapping", None)

    @property
    def listen_addr(self) -> tuple[str, int]:
        return parse_hostport(self.listen)

    @property
    def local_socket_path(self) -> str | None:
        """Shard 0's Unix socket (None: off); "auto" resolved under data_dir."""
        if self.local_socket == "auto":
            return os.path.join(self.data_dir, "wqsd.sock")
        return self.local_socket

    @property
    def shard_count(self) -> int | None:
        """workers as a number, or None for auto."""
        return None if self.workers == "auto" else int(self.workers)

    @property
    def control_addr(self) -> tuple[str, int]:
        return parse_hostport(self.control_listen)

    @property
    def metrics_addr(self) -> tuple[str, int] | None:
        return parse_hostport(self.metrics_listen) if self.metrics_listen else None


@dataclass
class ClientConfig:
    """The client library: which nodes, how to talk to them."""

    servers: list[str] = field(default_factory=list)  # host:port of each data plane
    # Relative share of the blocks per server, in any unit (e.g. capacity in bytes); an
    # unlisted server weighs 1, so list every server when the unit is not 1.
    # Every client of a cluster must use the same weights, or they disagree on placement.
    weights: dict[str, float] | None = None
    auth_token: str | None = field(default=None, repr=False)
    auth_token_file: str | None = None
    timeout_s: float = 5.0
    connect_timeout_s: float = 2.0
    connections_per_node: int = 2
    replicas: int = 1
    # How blocks travel: "tcp"; "shm" (shared memory through a daemon on this host, an
    # error where there is none); "rdma"; "auto": shm where the node is on this host
    # (it announces a Unix socket this process can reach), else tcp.
    transport: str = "auto"
    # Shared memory (per client, mapped on first use) through which blocks whose buffers
    # are not in Client.shared_memory move on shm and RDMA links: one copy by the client
    # instead of two through the socket. 0: none (inline on shm; an error on RDMA).
    bounce_bytes: int = 64 * MiB
    etcd: EtcdConfig | None = None

    def __post_init__(self) -> None:
        servers = _str_list("servers", self.servers)
        self.servers = [_hostport(f"servers[{i}]", s) for i, s in enumerate(servers)]
        if len(set(self.servers)) != len(self.servers):
            raise _fail("servers", "lists a server twice", self.servers)
        if self.weights is not None:
            if not isinstance(self.weights, Mapping):
                raise _fail("weights", "must be a mapping of host:port to a number", self.weights)
            weights = {}
            for server, w in self.weights.items():
                key = f"weights[{server}]"
                if _hostport(key, server) not in self.servers:
                    raise _fail(key, "is not one of servers", server)
                weights[_hostport(key, server)] = _float(key, w)
            self.weights = weights
        self.auth_token = _str("auth_token", self.auth_token, optional=True)
        self.auth_token_file = _str("auth_token_file", self.auth_token_file, optional=True)
        self.timeout_s = _float("timeout_s", self.timeout_s)
        self.connect_timeout_s = _float("connect_timeout_s", self.connect_timeout_s)
        self.connections_per_node = _int(
            "connections_per_node", self.connections_per_node, 1, 1024
        )
        self.replicas = _int("replicas", self.replicas, 1, 16)
        self.transport = _choice("transport", self.transport, TRANSPORTS)
        self.bounce_bytes = _size("bounce_bytes", self.bounce_bytes, 0, 64 * GiB, 4096)
        self.etcd = _nested("etcd", self.etcd, EtcdConfig)
        if not self.servers and self.etcd is None:
            raise _fail("servers", "needs at least one host:port, or configure etcd", self.servers)


def _next_port(key: str, port: int, offset: int) -> int:
    if port + offset > 65535:
        raise ConfigError(f"{key}: the default, data port + {offset}, exceeds 65535; set it")
    return port + offset


# --------------------------------------------------------------------------- loading


def load_daemon_config(
    path: str | None = None, overrides: Mapping[str, Any] | None = None
) -> DaemonConfig:
    """Read ``path`` (None: defaults only), apply ``overrides``, validate.

    ``overrides`` keys are top-level names or dotted paths (``"engine.region_size"``);
    ``None`` values are skipped so argparse defaults can be passed as they are. Overrides
    win over the file. ``auth_token_file`` is read here, into ``auth_token``.
    """
    data = _merge(_read_yaml(path), overrides or {})
    return with_token_file(_build(DaemonConfig, data))


def load_client_config(
    path: str | None = None, overrides: Mapping[str, Any] | None = None
) -> ClientConfig:
    """Like `load_daemon_config`, for the client library."""
    data = _merge(_read_yaml(path), overrides or {})
    return with_token_file(_build(ClientConfig, data))


def _read_yaml(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for dotted, value in overrides.items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = out
        for i, p in enumerate(parents):
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            elif not isinstance(child, dict):
                where = ".".join(parents[: i + 1])
                raise ConfigError(f"{where}: must be a mapping to set {dotted}")
            else:
                child = node[p] = dict(child)
            node = child
        node[leaf] = value
    return out


def with_token_file(cfg: Any) -> Any:
    """cfg with auth_token read from auth_token_file, if one is named."""
    if cfg.auth_token_file is None:
        return cfg
    try:
        with open(cfg.auth_token_file, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise ConfigError(
            f"auth_token_file: cannot read {cfg.auth_token_file}: {e.strerror}"
        ) from None
    if not token:
        raise ConfigError(f"auth_token_file: {cfg.auth_token_file} is empty")
    if cfg.auth_token is not None and cfg.auth_token != token:
        raise ConfigError("auth_token: both auth_token and auth_token_file are set; give one")
    cfg.auth_token = token
    return cfg
