"""CPU microseconds and context switches per request, for wqs-bench and for the servers.

On a shared 2-vCPU VM MiB/s moves with the neighbours from one minute to the next; the
CPU a request costs, and how often it puts a thread to sleep, hardly does. So every
timed part is bracketed by two readings:

* **client**: `wqs.procstat.self_usage()`, getrusage(RUSAGE_SELF) of this process: every
  thread of the load generator (workers, the SDK's own threads, the ETA line), so it
  includes wqs-bench's own bookkeeping; ``--ioengine=null`` shows that share alone.
* **server**: a `UsageSource` per server process. For WQS daemons, `ControlPlaneUsage`
  asks the daemon's gRPC control plane (Stats, whose ``process`` field is the daemon's
  own getrusage, summed over its processes if it has several). For servers the
  benchmark started itself and cannot ask (redis-server, the raw-socket sink),
  `PidUsage` reads /proc/<pid> (10 ms ticks; see `wqs.procstat.pid_usage`).

The difference of the two readings divided by the IOs counted in the timed part gives
the per-request figures (`usage_report`). A server that cannot be read is reported as
such (an ``error`` instead of numbers), never as zero.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence

from wqs.procstat import ProcessUsage, cost_per_request, pid_usage, total_usage, usage_delta

CONTROL_PORT_OFFSET = 1  # wqsd's default control_listen: data port + 1 (as `wqs` assumes)


class UsageUnavailable(Exception):
    """A server's usage could not be read; the message says which and why."""


class UsageSource(Protocol):
    """One server process (or a daemon of several) whose usage can be read repeatedly."""

    name: str  # what the reports call it: the data-plane address, or the program
    via: str  # where the figures come from: "control HOST:PORT" or "/proc/PID"

    def read(self) -> ProcessUsage:
        """The cumulative usage now; UsageUnavailable if it cannot be had."""
        ...

    def close(self) -> None:
        ...


def control_address(data_address: str) -> str:
    """The control plane of a daemon at `data_address`, by wqsd's default (port + 1)."""
    from wqs.config import format_hostport, parse_hostport

    host, port = parse_hostport(data_address)
    if port + CONTROL_PORT_OFFSET > 65535:
        raise ValueError(f"{data_address}: the control port (data port + 1) exceeds 65535; "
                         "pass --control_servers")
    return format_hostport(host, port + CONTROL_PORT_OFFSET)


class ControlPlaneUsage:
    """A WQS daemon's usage, from its control plane's Stats call."""

    def __init__(self, data_address: str, control: str, auth_token: str | None,
                 timeout_s: float = 5.0) -> None:
        from wqs.rpc.control import ControlClient

        self.name = data_address
        self.via = f"control {control}"
        self.control = control
        # The same token as the data plane: the client config's auth_token(_file).
        self._client = ControlClient(control, auth_token=auth_token, timeout=timeout_s)

    def read(self) -> ProcessUsage:
        from wqs.errors import AuthError, NodeUnavailable, WQSError

        try:
            return self._client.process_usage()
        except NodeUnavailable as e:
            raise UsageUnavailable(f"{self.name}: control plane unreachable: {e}") from None
        except AuthError as e:
            raise UsageUnavailable(f"{self.name}: control plane refused us: {e}") from None
        except WQSError as e:
            raise UsageUnavailable(f"{self.name}: {e}") from None

    def close(self) -> None:
        self._client.close()


class PidUsage:
    """A process this benchmark started, read from /proc/<pid>."""

    def __init__(self, pid: int, name: str) -> None:
        self.pid = pid
        self.name = name
        self.via = f"/proc/{pid}"

    def read(self) -> ProcessUsage:
        try:
            return pid_usage(self.pid)
        except (OSError, ValueError, IndexError) as e:
            raise UsageUnavailable(f"{self.name}: cannot read /proc/{self.pid}: {e}") from None

    def close(self) -> None:
        pass


Reading = ProcessUsage | str  # a usage, or why there is none


def snapshot(sources: Sequence[UsageSource]) -> dict[str, Reading]:
    """Every source's usage now (or the reason it could not be read), by name."""
    out: dict[str, Reading] = {}
    for s in sources:
        try:
            out[s.name] = s.read()
        except UsageUnavailable as e:
            out[s.name] = str(e)
    return out


def usage_report(before: ProcessUsage, after: ProcessUsage, requests: int,
                 scope: str) -> dict[str, Any]:
    """The JSON object of one process (or a sum of them): per-request figures and the
    totals they came from, or ``{"error": ...}`` when there is nothing to divide."""
    base: dict[str, Any] = {"scope": scope}
    try:
        delta = usage_delta(before, after)
    except ValueError as e:
        return {**base, "requests": requests, "error": str(e)}
    if requests <= 0:
        return {**base, "requests": requests,
                "error": "no requests completed in the timed part"}
    return {**base, **cost_per_request(delta, requests).as_dict()}


def servers_report(sources: Sequence[UsageSource], before: Mapping[str, Reading],
                   after: Mapping[str, Reading], requests: int, scope: str) -> dict[str, Any]:
    """The servers' usage over an interval: their sum per request, and each server's
    share (its own CPU divided by the same requests, so the shares add up to the sum).

    If any server could not be read, the sum is not given (a sum over some servers would
    look like a cheaper cluster); the servers that could be read still are."""
    per_server: dict[str, Any] = {}
    deltas: list[ProcessUsage] = []
    problems: list[str] = []
    for s in sources:
        b, a = before.get(s.name), after.get(s.name)
        if not isinstance(b, ProcessUsage) or not isinstance(a, ProcessUsage):
            why = next(x for x in (b, a, "not read") if isinstance(x, str))
            per_server[s.name] = {"via": s.via, "error": why}
            problems.append(why)
            continue
        rep = usage_report(b, a, requests, scope)
        per_server[s.name] = {"via": s.via, **rep}
        if "error" in rep:
            problems.append(f"{s.name}: {rep['error']}")
        else:
            deltas.append(usage_delta(b, a))
    out: dict[str, Any]
    if problems:
        out = {"scope": scope, "requests": requests,
               "error": "not measured: " + "; ".join(problems)}
    else:
        total = total_usage(deltas)
        out = usage_report(ProcessUsage(processes=total.processes), total, requests, scope)
    out["servers"] = per_server
    return out
