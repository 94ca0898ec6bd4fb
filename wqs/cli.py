"""`wqs`: the command-line tool for operators.

    wqs format DEVICE [--size 64G] [--region-size 16M] [--max-block-size 64M] [--force] [--yes]
    wqs put BLOCK_ID FILE            store FILE's bytes ("-": stdin) as one block
    wqs get BLOCK_ID [-o FILE]       write the block to FILE, or to stdout
    wqs exists BLOCK_ID...           one line per ID; exit 0 only if every ID is stored
    wqs delete BLOCK_ID...           one line per ID; deleting a missing block is no error
    wqs stat [--json]                engine stats of every node, through the control plane
    wqs ping [--count N] [--json]    data-plane round trip and control-plane health per node
    wqs drain NODE... [--wait S]     stop taking data-plane requests, wait for those in flight
    wqs resume NODE...               undo drain: take data-plane requests again

Block IDs (128-bit) are written as a decimal integer (``42``), a hex integer with a
``0x`` prefix (``0x2a``), or exactly 32 hex digits, the canonical form ``wqs`` prints
(``0000000000000000000000000000002a``). A 32-character string of digits is read as hex.

Common options (before or after the command): ``--servers host:port[,host:port...]``
(data-plane addresses; default 127.0.0.1:7070, or the ``servers`` of ``--config``),
``--config client.yaml`` (`wqs.config.load_client_config`), ``--token`` (or the
environment variable WQS_AUTH_TOKEN, or the config's auth_token / auth_token_file),
``--control-servers`` (control-plane addresses, one per server, in the same order;
default: each data port + 1, as wqsd does), ``--timeout SECONDS`` and ``-v``.

Exit codes: 0 success; 1 an error (one line on stderr), a missing block for ``get``, a
missing block for ``exists``, or a node that does not answer ``stat``/``ping``; 2 a
usage error; 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import stat as stat_mod
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Sequence, TypeVar

from wqs import __version__
from wqs.config import (ClientConfig, format_hostport, load_client_config, parse_hostport,
                        parse_size)
from wqs.errors import WQSError
from wqs.ids import BLOCK_ID_BYTES, block_id_hex

PROG = "wqs"
DEFAULT_SERVER = "127.0.0.1:7070"
TOKEN_ENV = "WQS_AUTH_TOKEN"
CONTROL_PORT_OFFSET = 1  # wqsd's default control_listen: data port + 1
_MAX_ID = 1 << 128
_HEX = set("0123456789abcdefABCDEF")

T = TypeVar("T")


class CLIError(Exception):
    """A failure to report as one line on stderr, with an exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- helpers


def parse_block_id(text: str) -> bytes:
    """A block ID from the command line (see the module doc) -> 16 canonical bytes."""
    s = text.strip()
    try:
        if s[:2].lower() == "0x" and len(s) > 2 and set(s[2:]) <= _HEX:
            value = int(s[2:], 16)
        elif len(s) == 2 * BLOCK_ID_BYTES and set(s) <= _HEX:
            return bytes.fromhex(s)
        elif s.isdigit() and s.isascii():
            value = int(s, 10)
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"invalid block ID {text!r}: expected a decimal integer, a 0x-prefixed "
                         "hex integer, or 32 hex digits") from None
    if value >= _MAX_ID:
        raise ValueError(f"invalid block ID {text!r}: larger than 128 bits")
    return value.to_bytes(BLOCK_ID_BYTES, "big")


def _block_id_arg(text: str) -> bytes:
    try:
        return parse_block_id(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def _split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def human_size(n: int | float) -> str:
    """1536 -> '1.5 KiB'; binary units, as the config's sizes are."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.3f} ms"


def _console(file: IO[str] | None = None) -> Any:
    from rich.console import Console

    file = file or sys.stdout
    tty = hasattr(file, "isatty") and file.isatty()
    # Off a terminal, rich would wrap tables at 80 columns; operators pipe `wqs stat`.
    width = None if tty else max(shutil.get_terminal_size((160, 24)).columns, 160)
    return Console(file=file, width=width, highlight=False, soft_wrap=False)


def _print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def _parallel(fn: Callable[[str], T], items: Sequence[str]) -> list[T]:
    """fn over items, one thread each (nodes answer in parallel); results in order."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(len(items), 32), thread_name_prefix="wqs-cli") as pool:
        return list(pool.map(fn, items))


class _SdkLog(logging.Handler):
    """Collects what the SDK logs about failing nodes, to explain a failure in one line
    (and keeps Python's last-resort handler from printing it raw)."""

    def __init__(self, echo: bool) -> None:
        super().__init__(logging.DEBUG if echo else logging.WARNING)
        self.echo = echo
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.echo:
            print(f"{PROG}: [{record.name}] {record.getMessage()}", file=sys.stderr)
        if record.levelno < logging.WARNING:
            return
        args = record.args if isinstance(record.args, tuple) else ()
        if len(args) == 2:  # the SDK logs (address, reason)
            address, reason = str(args[0]), str(args[1])
            text = reason if reason.startswith(address) else f"{address}: {reason}"
        else:
            text = record.getMessage()
        if text not in self.reasons:
            self.reasons.append(text)


# --------------------------------------------------------------------------- context


@dataclass
class Context:
    """What a command needs to reach the cluster: resolved from the common options,
    opened lazily, closed by `main`."""

    args: argparse.Namespace
    log: _SdkLog
    _config: ClientConfig | None = None
    _client: Any = None
    _controls: dict[str, Any] = field(default_factory=dict)

    # ---- configuration ----------------------------------------------------------------

    @property
    def config(self) -> ClientConfig:
        if self._config is None:
            self._config = self._load_config()
        return self._config

    def _load_config(self) -> ClientConfig:
        a = self.args
        path = getattr(a, "config", None)
        servers = getattr(a, "servers", None)
        token = getattr(a, "token", None) or os.environ.get(TOKEN_ENV) or None
        overrides: dict[str, Any] = {}
        if servers is not None:
            overrides["servers"] = _split_list(servers)
        elif path is None:
            overrides["servers"] = [DEFAULT_SERVER]
        timeout = getattr(a, "timeout", None)
        if timeout is not None:
            overrides["timeout_s"] = timeout
            overrides["connect_timeout_s"] = timeout
        cfg = load_client_config(path, overrides)
        if token is not None:  # the command line and the environment win over the file
            cfg = dataclasses.replace(cfg, auth_token=token, auth_token_file=None)
        if not cfg.servers and cfg.etcd is not None:
            cfg = dataclasses.replace(cfg, servers=self._servers_from_etcd(cfg))
        if not cfg.servers:
            raise CLIError("no servers to talk to: pass --servers host:port[,host:port] "
                           "(or a config whose etcd has registered nodes)")
        return cfg

    @staticmethod
    def _servers_from_etcd(cfg: ClientConfig) -> list[str]:
        from wqs.membership import EtcdClient, EtcdError, NodeRecord

        try:
            kvs, _ = EtcdClient(cfg.etcd).list_prefix()
        except EtcdError as e:
            raise CLIError(str(e)) from None
        return sorted(NodeRecord.from_json(v).address for v in kvs.values())

    @property
    def servers(self) -> list[str]:
        return list(self.config.servers)

    def control_addresses(self) -> dict[str, str]:
        """Data-plane address -> control-plane address, for every server."""
        servers = self.servers
        given = getattr(self.args, "control_servers", None)
        explicit = _split_list(given) if given else getattr(self.config, "control_servers", None)
        if explicit:
            if len(explicit) != len(servers):
                raise CLIError(f"--control-servers lists {len(explicit)} addresses for "
                               f"{len(servers)} servers; give one per server, in order")
            for a in explicit:
                try:
                    parse_hostport(a)
                except ValueError as e:
                    raise CLIError(f"--control-servers: {e}") from None
            return dict(zip(servers, explicit))
        out = {}
        for s in servers:
            host, port = parse_hostport(s)
            if port + CONTROL_PORT_OFFSET > 65535:
                raise CLIError(f"{s}: the control port (data port + 1) exceeds 65535; "
                               "pass --control-servers")
            out[s] = format_hostport(host, port + CONTROL_PORT_OFFSET)
        return out

    # ---- connections ------------------------------------------------------------------

    def client(self) -> Any:
        if self._client is None:
            from wqs.client import Client

            self._client = Client(config=self.config)
        return self._client

    def control(self, address: str) -> Any:
        """A ControlClient for a control-plane address (cached)."""
        if address not in self._controls:
            from wqs.rpc.control import ControlClient

            self._controls[address] = ControlClient(address, auth_token=self.config.auth_token,
                                                    timeout=self.config.timeout_s)
        return self._controls[address]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        for c in self._controls.values():
            c.close()

    # ---- failures ---------------------------------------------------------------------

    def data_call(self, what: str, fn: Callable[[], T],
                  complete: Callable[[T], bool] = lambda result: False) -> T:
        """fn() on the data plane. An SDK error becomes one line naming what failed, and
        so does a node failure the SDK only counted (see `node_failure`), unless
        `complete(result)` says the answer is whole anyway (e.g. a replica answered)."""
        before = self.failed_requests()
        try:
            result = fn()
        except WQSError as e:
            raise CLIError(f"{what}: {e}") from None
        if not complete(result):
            failure = self.node_failure(what, before)
            if failure is not None:
                raise failure
        return result

    def failed_requests(self) -> int:
        return self._client.failed_requests if self._client is not None else 0

    def node_failure(self, what: str, before: int) -> CLIError | None:
        """An error if a data-plane request failed since `before` (the SDK reports node
        failures as misses / False; the CLI must not call that 'not found')."""
        if self.failed_requests() <= before:
            return None
        reason = "; ".join(self.log.reasons) or "a storage node did not answer"
        return CLIError(f"{what}: {reason}")


# --------------------------------------------------------------------------- format


def cmd_format(args: argparse.Namespace, ctx: Context) -> int:
    from wqs.config import EngineConfig
    from wqs.engine import format as fmt
    from wqs.engine.engine import check_formattable
    from wqs.engine.node import auto_shards, format_node
    from wqs.errors import FormatError
    from wqs.nvme.device import DevicePart, DirectDevice
    from wqs.nvme.spdk_target import is_spdk_device

    path = args.device
    try:
        config = EngineConfig(region_size=args.region_size, max_block_size=args.max_block_size,
                              spdk={"lib_dir": args.spdk_lib_dir,
                                    "mem_size": args.spdk_mem_size})
    except WQSError as e:
        raise CLIError(f"invalid format option: {e}") from None
    if args.shards != "auto" and not (args.shards.isdigit() and 1 <= int(args.shards)):
        raise CLIError(f"--shards must be a positive number or auto, got {args.shards!r}")

    created = False
    if is_spdk_device(path):
        from wqs.nvme.spdk import SpdkDevice

        if args.size is not None:
            raise CLIError("--size only applies when creating a device file")
        try:
            device = SpdkDevice(path, config.spdk)
        except WQSError as e:  # the library's key is --spdk-lib-dir here
            raise CLIError(str(e).replace("engine.spdk.lib_dir", "--spdk-lib-dir")) from None
        path = device.path
    elif os.path.lexists(path):
        if stat_mod.S_ISBLK(os.stat(path).st_mode):
            _refuse_busy_block_device(path)
        device = DirectDevice(path)
        if args.size is not None and args.size != device.size:
            device.close()
            raise CLIError(f"{path} exists ({device.size} bytes); --size only applies when "
                           "creating a new device file")
    else:
        if args.size is None:
            raise CLIError(f"{path} does not exist; pass --size SIZE to create a device file")
        device = DirectDevice.create_file(path, args.size)
        created = True

    try:
        if not created:
            # Refuse filesystems, partition tables and WQS devices before asking anything.
            try:
                check_formattable(device, args.force)
            except FormatError as e:  # the engine speaks of its `force` argument
                raise CLIError(str(e).replace("pass force", "pass --force")) from None
            if not args.yes:
                _confirm(f"Format {path} ({human_size(device.size)})? Everything on it is lost.")
        shards = auto_shards(device.size, config) if args.shards == "auto" else int(args.shards)
        if is_spdk_device(path):
            from wqs.nvme.spdk import check_shards

            if args.shards == "auto" and device.target.is_pcie:
                shards = 1
            check_shards(device.target, shards)
        table = format_node(device, config, shards, force=True)
        sbs = [fmt.unpack_superblock(_first_unit(DevicePart(device, o, n, k)))
               for k, (o, n) in enumerate(table.partitions)]
    except BaseException:
        device.close()
        if created:
            os.unlink(path)
        raise
    device.close()

    regions = sum(sb.num_regions for sb in sbs)
    capacity = sum(sb.num_regions * sb.region_size for sb in sbs)
    sb = sbs[0]
    if args.json:
        _print_json({"device": path, "uuid": table.uuid_str(), "device_size": device.size,
                     "region_size": sb.region_size, "num_regions": regions,
                     "capacity_bytes": capacity, "max_block_size": sb.max_block_size,
                     "format_version": sb.version, "created": created, "shards": shards,
                     "partitions": [{"offset": o, "size": n, "uuid": s.uuid_str(),
                                     "num_regions": s.num_regions}
                                    for (o, n), s in zip(table.partitions, sbs)]})
        return 0
    from rich.table import Table

    out = Table(show_header=False, box=None, pad_edge=False)
    out.add_column(style="bold")
    out.add_column()
    out.add_row("device", f"{path}{' (created)' if created else ''}")
    out.add_row("uuid", table.uuid_str())
    out.add_row("device size", f"{human_size(device.size)} ({device.size} B)")
    out.add_row("shards", f"{shards}" + (f" × {human_size(table.partitions[0][1])}"
                                         if shards > 1 else ""))
    out.add_row("regions", f"{regions} × {human_size(sb.region_size)}")
    out.add_row("capacity", f"{human_size(capacity)} ({capacity} B)")
    out.add_row("max block size", human_size(sb.max_block_size))
    out.add_row("format version", str(sb.version))
    console = _console()
    console.print(f"[green]formatted[/green] {path}")
    console.print(out)
    return 0


def _first_unit(device: object) -> memoryview:
    from wqs.engine.recovery import read_unit

    return read_unit(device, 0)  # type: ignore[arg-type]


def _refuse_busy_block_device(path: str) -> None:
    """A mounted (or exclusively opened) block device: refuse even with --force."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == 16:  # EBUSY
            raise CLIError(f"{path} is in use (mounted, or opened exclusively); "
                           "will not format it") from None
        return  # DirectDevice reports other problems with their own message
    os.close(fd)


def _confirm(question: str) -> None:
    if not sys.stdin.isatty():
        raise CLIError("refusing to format an existing device without confirmation: stdin is "
                       "not a terminal; pass --yes")
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        raise CLIError("aborted: the device was not formatted")


# --------------------------------------------------------------------------- data plane


def cmd_put(args: argparse.Namespace, ctx: Context) -> int:
    if args.file == "-":
        data = sys.stdin.buffer.read()
    else:
        try:
            with open(args.file, "rb") as f:
                data = f.read()
        except OSError as e:
            raise CLIError(f"cannot read {args.file}: {e.strerror}") from None
    client = ctx.client()
    hexid = block_id_hex(args.block_id)
    if not ctx.data_call(f"put {hexid} failed", lambda: client.put(args.block_id, data),
                         complete=bool):
        raise CLIError(f"put {hexid} failed: the node did not store it")
    if not args.quiet:
        nodes = client.ring.nodes_for(args.block_id, client.config.replicas)
        print(f"stored {hexid} ({len(data)} B) on {', '.join(nodes)}")
    return 0


def cmd_get(args: argparse.Namespace, ctx: Context) -> int:
    to_stdout = args.output in (None, "-")
    if args.output is None and sys.stdout.isatty():
        raise CLIError("refusing to write a binary block to a terminal; use -o FILE, "
                       "-o - or a redirect")
    hexid = block_id_hex(args.block_id)
    client = ctx.client()
    data = ctx.data_call(f"get {hexid} failed", lambda: client.get(args.block_id),
                         complete=lambda d: d is not None)
    if data is None:
        raise CLIError(f"block {hexid} not found")
    if to_stdout:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        try:
            with open(args.output, "wb") as f:
                f.write(data)
        except OSError as e:
            raise CLIError(f"cannot write {args.output}: {e.strerror}") from None
        print(f"wrote {hexid} ({len(data)} B) to {args.output}", file=sys.stderr)
    return 0


def cmd_exists(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    found = ctx.data_call("exists failed", lambda: client.exists_many(args.block_ids),
                          complete=all)
    for block_id, hit in zip(args.block_ids, found):
        print(f"{block_id_hex(block_id)} {'yes' if hit else 'no'}")
    return 0 if all(found) else 1


def cmd_delete(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    # Every replica must answer: one that did not may still hold the block.
    deleted = ctx.data_call("delete failed", lambda: client.delete_many(args.block_ids))
    for block_id, hit in zip(args.block_ids, deleted):
        print(f"{block_id_hex(block_id)} {'deleted' if hit else 'not found'}")
    return 0


# --------------------------------------------------------------------------- stat


@dataclass
class NodeReport:
    """What one node's control plane said (or why it did not)."""

    address: str  # data plane
    control_address: str
    info: dict[str, Any] | None = None
    stats: dict[str, Any] | None = None
    error: str | None = None
    problem: str | None = None  # unreachable | auth failed | error


    def as_json(self) -> dict[str, Any]:
        return {"address": self.address, "control_address": self.control_address,
                "ok": self.error is None, "error": self.error, "problem": self.problem,
                "node_info": self.info, "stats": self.stats}


def collect_node_reports(ctx: Context, *, want_stats: bool = True,
                         controls: dict[str, str] | None = None) -> list[NodeReport]:
    """node_info() (and stats()) of every server, in parallel."""
    controls = controls if controls is not None else ctx.control_addresses()

    def one(server: str) -> NodeReport:
        r = NodeReport(server, controls[server])
        try:
            cc = ctx.control(r.control_address)
            r.info = cc.node_info()
            if want_stats:
                r.stats = cc.stats()
        except WQSError as e:
            r.error, r.problem = str(e), _problem(e)
        return r

    return _parallel(one, list(controls))


def cluster_members(ctx: Context) -> tuple[dict[str, str], list[str]]:
    """Every node the cluster knows of (data -> control address): the servers given,
    plus whatever their ClusterMap lists (the etcd registrations). And the failures."""
    members = dict(ctx.control_addresses())
    failures = []
    for server, control in list(members.items()):
        try:
            rows = ctx.control(control).cluster_map()
        except WQSError as e:
            failures.append(f"{server}: cluster map: {e}")
            continue
        for row in rows:
            address = row["address"]
            if address and address not in members:
                host, port = parse_hostport(address)
                members[address] = row.get("control_address") or \
                    format_hostport(host, port + CONTROL_PORT_OFFSET)
    return members, failures


def _problem(e: Exception) -> str:
    from wqs.errors import AuthError, NodeUnavailable

    if isinstance(e, NodeUnavailable):
        return "unreachable"
    return "auth failed" if isinstance(e, AuthError) else "error"


def _percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.0f}%" if whole else "—"


_STATE_STYLE = {"serving": "green", "draining": "yellow", "not_serving": "red"}


def render_node_table(reports: Sequence[NodeReport]) -> Any:
    from rich.table import Table

    from wqs.metrics import write_amplification

    table = Table(title="WQS nodes", title_justify="left")
    for name, justify in (("node", "left"), ("state", "left"), ("capacity", "right"),
                          ("used", "right"), ("blocks", "right"),
                          ("hit rate dram/ssd/miss", "right"), ("checksum fail", "right"),
                          ("evicted", "right"), ("reinserted", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    for r in reports:
        name = r.address
        if r.info and r.info.get("node_id") and r.info["node_id"] != r.address:
            name = f"{r.address}\n[dim]{r.info['node_id']}[/dim]"
        backend = (r.info or {}).get("labels", {}).get("io_engine")
        if backend:  # how the node does device IO: aio, threads or spdk (--json: the device)
            name += f"\n[dim]device io: {backend}[/dim]"
        if r.error is not None:  # the reason goes to stderr (see _report_failures)
            state = f"[red]{r.problem}[/red]" if r.info is None else \
                f"[yellow]{r.info.get('status', '?')}: no stats[/yellow]"
            table.add_row(name, state, *["—"] * 7)
            continue
        assert r.info is not None and r.stats is not None
        e = r.stats.get("engine", {})
        status = r.info.get("status", "unknown")
        cap, used = e.get("capacity_bytes", 0), e.get("used_bytes", 0)
        gets = e.get("gets", 0)
        hits = "/".join(_percent(e.get(k, 0), gets) for k in ("hits_dram", "hits_ssd", "misses"))
        if gets:
            hits += f" [dim]({gets} gets)[/dim]"
        cks = e.get("checksum_failures", 0)
        table.add_row(
            name,
            f"[{_STATE_STYLE.get(status, 'red')}]{status}[/]",
            human_size(cap),
            f"{human_size(used)} ({_percent(used, cap)})",
            str(e.get("index_entries", 0)),
            hits,
            f"[red]{cks}[/red]" if cks else "0",
            f"{e.get('evicted_blocks', 0)} ({e.get('evicted_regions', 0)} regions)",
            f"{e.get('reinserted_blocks', 0)} [dim](write ampl. "
            f"{write_amplification(e):.2f})[/dim]",
        )
    return table


def cmd_stat(args: argparse.Namespace, ctx: Context) -> int:
    # --cluster: every node the cluster map knows of, not just the servers given.
    map_failures: list[str] = []
    if args.cluster:
        members, map_failures = cluster_members(ctx)
        reports = collect_node_reports(ctx, controls=members)
    else:
        reports = collect_node_reports(ctx)
    if args.json:
        _print_json([r.as_json() for r in reports])
    else:
        _console().print(render_node_table(reports))
    failures = [f"{r.address}: control plane {r.error}" for r in reports if r.error]
    return _report_failures(len(reports), failures + map_failures)


def _report_failures(total: int, failures: Sequence[str]) -> int:
    """One stderr line naming every node that failed; the exit code."""
    if not failures:
        return 0
    print(f"{PROG}: {len(failures)} of {total} nodes failed: {'; '.join(failures)}",
          file=sys.stderr)
    return 1


# --------------------------------------------------------------------------- ping


def cmd_ping(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    rtts: dict[str, list[float]] = {s: [] for s in ctx.servers}
    for i in range(args.count):
        if i:
            time.sleep(args.interval)
        try:
            answers = client.ping()
        except WQSError as e:  # e.g. an auth failure: the SDK raises those
            raise CLIError(f"ping failed: {e}") from None
        for node, rtt in answers.items():
            if rtt is not None:
                rtts[node].append(rtt)
    controls = ctx.control_addresses()

    def health(server: str) -> tuple[str | None, float | None, str | None, str | None]:
        try:
            cc = ctx.control(controls[server])
            cc.health()  # the first call also opens the channel: time the second
            started = time.perf_counter()
            status = cc.health()
        except WQSError as e:
            return None, None, str(e), _problem(e)
        return status, time.perf_counter() - started, None, None

    healths = dict(zip(ctx.servers, _parallel(health, ctx.servers)))
    data_errors = {s: "; ".join(r[len(s):].lstrip(": ") for r in ctx.log.reasons
                                if r.startswith(s)) or "no answer"
                   for s in ctx.servers if not rtts[s]}

    rows = []
    for s in ctx.servers:
        got = rtts[s]
        status, ctl_rtt, ctl_err, ctl_problem = healths[s]
        rows.append({
            "address": s, "control_address": controls[s],
            "data_ok": bool(got), "data_error": data_errors.get(s),
            "rtt_min_s": min(got) if got else None,
            "rtt_avg_s": sum(got) / len(got) if got else None,
            "rtt_max_s": max(got) if got else None,
            "replies": len(got), "sent": args.count,
            "control_status": status, "control_rtt_s": ctl_rtt, "control_error": ctl_err,
            "control_problem": ctl_problem,
        })
    if args.json:
        _print_json(rows)
    else:
        from rich.table import Table

        table = Table(title="WQS ping", title_justify="left")
        table.add_column("node", no_wrap=True)
        if args.count > 1:
            table.add_column("data rtt min/avg/max", justify="right", no_wrap=True)
            table.add_column("replies", justify="right")
        else:
            table.add_column("data rtt", justify="right", no_wrap=True)
        table.add_column("control", no_wrap=True)
        table.add_column("health", no_wrap=True)
        for row in rows:
            if row["data_ok"]:
                rtt = (f"{_ms(row['rtt_min_s'])} / {_ms(row['rtt_avg_s'])} / "
                       f"{_ms(row['rtt_max_s'])}") if args.count > 1 else _ms(row["rtt_min_s"])
            else:
                rtt = "[red]unreachable[/red]"
            cells = [row["address"], rtt]
            if args.count > 1:
                cells.append(f"{row['replies']}/{row['sent']}")
            cells.append(row["control_address"])
            if row["control_status"] is None:
                cells.append(f"[red]{row['control_problem']}[/red]")
            else:
                st = row["control_status"]
                cells.append(f"[{_STATE_STYLE.get(st, 'red')}]{st}[/] "
                             f"[dim]({_ms(row['control_rtt_s'])})[/dim]")
            table.add_row(*cells)
        _console().print(table)
    failures = []
    for row in rows:
        errs = [e for e in (row["data_error"] and f"data plane {row['data_error']}",
                            row["control_error"] and f"control plane {row['control_error']}")
                if e]
        if errs:
            failures.append(f"{row['address']}: {', '.join(errs)}")
    return _report_failures(len(rows), failures)


# --------------------------------------------------------------------------- drain, resume


def node_controls(ctx: Context, nodes: Sequence[str]) -> dict[str, str]:
    """Data-plane address -> control-plane address of each NODE argument: as
    --control-servers maps it when NODE is one of the servers, else data port + 1."""
    given = getattr(ctx.args, "control_servers", None)
    mapped = ctx.control_addresses() if given else {}
    out = {}
    for node in nodes:
        try:
            host, port = parse_hostport(node)
        except ValueError as e:
            raise CLIError(f"NODE {node!r}: {e}", code=2) from None
        if node in mapped:
            out[node] = mapped[node]
        elif port + CONTROL_PORT_OFFSET > 65535:
            raise CLIError(f"{node}: the control port (data port + 1) exceeds 65535; pass "
                           "--servers and --control-servers")
        else:
            out[node] = format_hostport(host, port + CONTROL_PORT_OFFSET)
    return out


def _node_calls(args: argparse.Namespace, ctx: Context, call: Callable[[Any], dict],
                describe: Callable[[dict], tuple[str, str | None]]) -> int:
    """call(control client) on every NODE in parallel; one line (or JSON row) each.
    describe(answer) -> (text, failure or None)."""
    controls = node_controls(ctx, args.nodes)

    def one(node: str) -> dict[str, Any]:
        row: dict[str, Any] = {"address": node, "control_address": controls[node]}
        try:
            row.update(call(ctx.control(controls[node])))
        except WQSError as e:
            row["error"] = str(e)
        return row

    rows = _parallel(one, list(controls))
    failures = []
    for row in rows:
        if "error" in row:
            text, failure = f"failed: {row['error']}", f"control plane {row['error']}"
        else:
            text, failure = describe(row)
        row["ok"] = failure is None
        if failure is not None:
            failures.append(f"{row['address']}: {failure}")
        if not args.json:
            print(f"{row['address']}  {text}")
    if args.json:
        _print_json(rows)
    return _report_failures(len(rows), failures)


def cmd_drain(args: argparse.Namespace, ctx: Context) -> int:
    def describe(r: dict) -> tuple[str, str | None]:
        took = f"{r['elapsed_seconds']:.2f} s"
        if r["drained"]:
            return f"drained in {took}: {r['status']}", None
        left = f"{r['inflight_remaining']} requests still in flight after {took}"
        return f"draining: {left}", f"not drained ({left})"

    return _node_calls(args, ctx, lambda cc: cc.drain(timeout_s=args.wait), describe)


def cmd_resume(args: argparse.Namespace, ctx: Context) -> int:
    def describe(r: dict) -> tuple[str, str | None]:
        if r["status"] != "serving":
            return f"{r['status']} (was {r['previous']})", f"still {r['status']}"
        return f"serving (was {r['previous']})", None

    return _node_calls(args, ctx, lambda cc: cc.resume(), describe)


# --------------------------------------------------------------------------- parser


def _common_options(defaults: bool) -> argparse.ArgumentParser:
    """Options accepted before and after the command. Only the top-level copy has real
    defaults: a subcommand's copy would otherwise overwrite what was given first."""
    d = (lambda v: v) if defaults else (lambda v: argparse.SUPPRESS)
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection options")
    g.add_argument("--servers", metavar="HOST:PORT[,...]", default=d(None),
                   help=f"data-plane addresses (default: the config's servers, else "
                        f"{DEFAULT_SERVER})")
    g.add_argument("--control-servers", metavar="HOST:PORT[,...]", default=d(None),
                   help="control-plane addresses, one per server in the same order "
                        "(default: each data port + 1)")
    g.add_argument("--config", metavar="FILE", default=d(None),
                   help="client YAML config (servers, auth_token[_file], timeout_s, ...)")
    g.add_argument("--token", metavar="TOKEN", default=d(None),
                   help=f"shared auth token (default: ${TOKEN_ENV}, else the config's)")
    g.add_argument("--timeout", metavar="SECONDS", type=_positive_float, default=d(None),
                   help="per-request and connect timeout (default: the config's, 5 s / 2 s)")
    g.add_argument("-v", "--verbose", action="store_true", default=d(False),
                   help="show the SDK's log messages")
    return p


def _add_stat_parser(sub: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = sub.add_parser("stat", parents=[common], help="engine stats of every node",
                       description="Engine stats of every node, through the control plane.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--cluster", action="store_true",
                   help="every node of the cluster (from the nodes' cluster maps, i.e. "
                        "etcd registrations), with state, capacity, use and hit rate")
    p.set_defaults(func=cmd_stat)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, parents=[_common_options(True)],
        description="WQS command-line tool: format devices, put/get blocks, inspect nodes.",
        epilog="BLOCK_ID: a decimal integer (42), a 0x-prefixed hex integer (0x2a), or "
               "exactly 32 hex digits (the canonical form wqs prints).")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _common_options(False)
    id_help = "block ID: decimal, 0x-hex, or 32 hex digits"

    p = sub.add_parser("format", help="format a device or device file for wqsd",
                       description="Write a fresh WQS format on DEVICE (a raw block device, "
                                   "a file, or an NVMe namespace through SPDK: "
                                   "\"spdk:trtype:PCIe traddr:0000:01:00.0 ns:1\"). Refuses "
                                   "devices holding a filesystem, a partition table or a "
                                   "WQS format unless --force.")
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("--size", type=_size_arg,
                   help="create DEVICE as a file of SIZE bytes (e.g. 64G) if it does not exist")
    p.add_argument("--region-size", default="16M", metavar="SIZE",
                   help="unit of allocation and eviction (default 16M)")
    p.add_argument("--max-block-size", default="64M", metavar="SIZE",
                   help="largest block the device accepts (default 64M)")
    p.add_argument("--shards", default="auto", metavar="N",
                   help="cut the device into N partitions, one per wqsd shard process "
                        "(default auto: one per core, as many as the device holds)")
    p.add_argument("--force", action="store_true",
                   help="overwrite a filesystem, partition table or WQS format")
    p.add_argument("-y", "--yes", action="store_true",
                   help="do not ask before formatting an existing device")
    p.add_argument("--spdk-lib-dir", metavar="DIR",
                   help="for a DEVICE named spdk:...: the directory of SPDK's shared "
                        "libraries (default: the system's library path)")
    p.add_argument("--spdk-mem-size", default="256MiB", metavar="SIZE",
                   help="for a DEVICE named spdk:...: SPDK DMA memory (default 256MiB)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_format)

    p = sub.add_parser("put", parents=[common], help="store a file as one block")
    p.add_argument("block_id", type=_block_id_arg, metavar="BLOCK_ID", help=id_help)
    p.add_argument("file", metavar="FILE", help="the block's bytes; - reads stdin")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=cmd_put)

    p = sub.add_parser("get", parents=[common], help="read one block",
                       description="Read one block. A miss exits with code 1.")
    p.add_argument("block_id", type=_block_id_arg, metavar="BLOCK_ID", help=id_help)
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write the block to FILE (default, or -: stdout)")
    p.set_defaults(func=cmd_get)

    p = sub.add_parser("exists", parents=[common], help="are these blocks stored?",
                       description="One line per ID; exit code 0 if every ID is stored, 1 "
                                   "if any is not.")
    p.add_argument("block_ids", type=_block_id_arg, nargs="+", metavar="BLOCK_ID", help=id_help)
    p.set_defaults(func=cmd_exists)

    p = sub.add_parser("delete", parents=[common], help="delete blocks",
                       description="One line per ID; deleting a block that is not stored "
                                   "is not an error.")
    p.add_argument("block_ids", type=_block_id_arg, nargs="+", metavar="BLOCK_ID", help=id_help)
    p.set_defaults(func=cmd_delete)

    _add_stat_parser(sub, common)

    p = sub.add_parser("ping", parents=[common],
                       help="data-plane round trip and control-plane health per node")
    p.add_argument("-c", "--count", type=_positive_int, default=1,
                   help="data-plane pings per node (default 1)")
    p.add_argument("-i", "--interval", type=_non_negative_float, default=0.2,
                   help="seconds between pings (default 0.2)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_ping)

    node_help = "a node's data-plane address (its control plane: data port + 1, or as " \
                "--servers/--control-servers map it)"
    p = sub.add_parser("drain", parents=[common],
                       help="stop a node taking data-plane requests (undo: resume)",
                       description="Each NODE answers new data-plane requests BUSY (clients "
                                   "re-ask, then treat its blocks as misses) and finishes "
                                   "those in flight. Exit 1 if any NODE still has requests "
                                   "in flight after --wait or did not answer.")
    p.add_argument("nodes", nargs="+", metavar="NODE", help=node_help)
    p.add_argument("--wait", type=_positive_float, default=30.0, metavar="SECONDS",
                   help="how long to wait for requests in flight (default 30)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_drain)

    p = sub.add_parser("resume", parents=[common],
                       help="undo drain: a node takes data-plane requests again",
                       description="Each NODE takes data-plane requests again (a serving "
                                   "node stays serving). Exit 1 if any NODE did not answer.")
    p.add_argument("nodes", nargs="+", metavar="NODE", help=node_help)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_resume)
    return parser


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)

    sdk_log = _SdkLog(echo=bool(getattr(args, "verbose", False)))
    wqs_logger = logging.getLogger("wqs")
    saved = (wqs_logger.level, wqs_logger.propagate)
    wqs_logger.addHandler(sdk_log)
    wqs_logger.setLevel(logging.DEBUG if sdk_log.echo else logging.WARNING)
    wqs_logger.propagate = False
    ctx = Context(args, sdk_log)
    try:
        return int(args.func(args, ctx))
    except CLIError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return e.code
    except WQSError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if isinstance(e, BrokenPipeError):  # `wqs get ... | head`
            try:
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - no flush error at exit
            except OSError:
                pass
            return 1
        where = f"{e.filename}: " if e.filename else ""
        print(f"{PROG}: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        ctx.close()
        wqs_logger.removeHandler(sdk_log)
        wqs_logger.setLevel(saved[0])
        wqs_logger.propagate = saved[1]


if __name__ == "__main__":
    sys.exit(main())
