"""The gRPC control plane: health, stats, node info, drain and resume, evict-all, cluster map.

Server side: `ControlService` (the servicer) and `start_control_server`, which returns a
`ControlServer` handle. Client side: `ControlClient`.

Authentication, when the daemon has a token (see also the top of proto/wqs.proto):

1. ``GetChallenge`` (the only unauthenticated RPC) returns a fresh server nonce, valid for
   `NonceTable.ttl` seconds. The table of issued nonces is bounded, so a flood of
   challenges costs bounded memory (the oldest nonces are dropped first).
2. Every other call carries ``wqs-auth: <client_nonce>:<server_nonce>:<proof>`` (hex),
   proof = `wqs.rpc.auth.client_proof(token, server_nonce, client_nonce)`.
3. `AuthInterceptor` accepts the call only if the server issued that nonce, it has not
   expired, the proof verifies, and the nonce is not already bound to another client
   nonce (the first valid proof binds it: one nonce serves one client session). It then
   sends ``wqs-auth-server: <server_proof>`` in the initial metadata so the client knows
   it talks to a daemon that holds the token too.

The header is reusable until the nonce expires, so this protects the token but not the
channel: someone who can read the traffic can replay a captured header for up to the
TTL. Use TLS or a private network where that matters.
"""

from __future__ import annotations

import collections
import importlib.metadata
import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import grpc

from wqs.errors import AuthError, NodeUnavailable, RemoteError
from wqs.procstat import ProcessUsage, self_usage
from wqs.rpc import auth
from wqs.rpc import control_pb2 as pb
from wqs.rpc import control_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from wqs.engine import Engine
    from wqs.metrics import RequestMetrics

log = logging.getLogger("wqs.control")

AUTH_HEADER = "wqs-auth"  # gRPC metadata keys must be lower case
SERVER_PROOF_HEADER = "wqs-auth-server"
CHALLENGE_METHOD = "/wqs.v1.Control/GetChallenge"
DEFAULT_NONCE_TTL = 60.0
DEFAULT_MAX_NONCES = 4096
DEFAULT_DRAIN_TIMEOUT = 30.0

SERVING, DRAINING, NOT_SERVING = "serving", "draining", "not_serving"
_STATUS_TO_PB = {
    SERVING: pb.SERVING_STATUS_SERVING,
    DRAINING: pb.SERVING_STATUS_DRAINING,
    NOT_SERVING: pb.SERVING_STATUS_NOT_SERVING,
}
_PB_TO_STATUS = {v: k for k, v in _STATUS_TO_PB.items()}


def _status_name(value: int) -> str:
    return _PB_TO_STATUS.get(value, "unknown")


def software_version() -> str:
    try:
        return importlib.metadata.version("wqs")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        import wqs

        return str(getattr(wqs, "__version__", "unknown"))


# --------------------------------------------------------------------------- server side


@dataclass(frozen=True)
class DrainResult:
    """What the daemon's drain callback reports."""

    drained: bool  # no data-plane request is in flight any more
    inflight_remaining: int = 0
    message: str = ""


# on_drain(timeout_seconds) stops new data-plane requests and waits for in-flight ones.
# It may return a DrainResult, a bool (drained?) or None (= drained).
DrainCallback = Callable[[float], "DrainResult | bool | None"]

# on_resume() undoes a drain: the data plane takes new requests again. It raises (any
# exception, its message reported to the caller) when it cannot, e.g. while stopping.
ResumeCallback = Callable[[], None]

# What Stats reports as the daemon's CPU and context switches. The default is the
# process the control plane runs in; a daemon of several processes passes a function
# that adds up its shards' usages (wqs.procstat.total_usage).
UsageProvider = Callable[[], ProcessUsage]


@dataclass(frozen=True)
class ClusterNodeInfo:
    """One row of the cluster map."""

    node_id: str
    address: str  # data plane host:port
    state: str = SERVING  # serving | draining | not_serving
    capacity_bytes: int = 0
    used_bytes: int = 0
    hit_rate: float = 0.0
    control_address: str = ""


class NonceTable:
    """Server nonces handed out by GetChallenge: issued, bounded, expiring, bound once.

    Thread-safe. Insertion order is expiry order (one TTL for all), so the oldest entry is
    both the first to expire and the one dropped when the table is full.
    """

    def __init__(self, ttl: float = DEFAULT_NONCE_TTL, max_entries: int = DEFAULT_MAX_NONCES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        # server_nonce -> [expires_at, bound client nonce or None]
        self._nonces: collections.OrderedDict[bytes, list[Any]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def issue(self) -> bytes:
        nonce = auth.make_nonce()
        with self._lock:
            now = self._clock()
            self._expire(now)
            while len(self._nonces) >= self.max_entries:
                self._nonces.popitem(last=False)
            self._nonces[nonce] = [now + self.ttl, None]
        return nonce

    def check(self, server_nonce: bytes, client_nonce: bytes) -> str | None:
        """None if the nonce may be used with this client nonce, else why not."""
        with self._lock:
            entry = self._nonces.get(server_nonce)
            if entry is None:
                return "unknown or expired server nonce; call GetChallenge"
            if entry[0] <= self._clock():
                del self._nonces[server_nonce]
                return "server nonce expired; call GetChallenge"
            if entry[1] is not None and entry[1] != client_nonce:
                return "server nonce already used by another client"
            return None

    def bind(self, server_nonce: bytes, client_nonce: bytes) -> bool:
        """Tie the nonce to the first client nonce that proved the token with it.

        Called only after the proof verified, so a peer without the token cannot burn
        someone else's nonce."""
        with self._lock:
            entry = self._nonces.get(server_nonce)
            if entry is None:
                return False
            if entry[1] is None:
                entry[1] = client_nonce
            return entry[1] == client_nonce

    def __len__(self) -> int:
        with self._lock:
            return len(self._nonces)

    def _expire(self, now: float) -> None:
        while self._nonces:
            first = next(iter(self._nonces.values()))
            if first[0] > now:
                break
            self._nonces.popitem(last=False)


def parse_auth_header(value: str) -> tuple[bytes, bytes, bytes]:
    """``client:server:proof`` (hex) -> the three byte strings; ValueError if malformed."""
    parts = value.split(":")
    if len(parts) != 3:
        raise ValueError("expected <client_nonce>:<server_nonce>:<proof> in hex")
    client_nonce, server_nonce, proof = (bytes.fromhex(p) for p in parts)
    if len(client_nonce) != auth.NONCE_LEN or len(server_nonce) != auth.NONCE_LEN:
        raise ValueError(f"nonces must be {auth.NONCE_LEN} bytes")
    if len(proof) != auth.PROOF_LEN:
        raise ValueError(f"proof must be {auth.PROOF_LEN} bytes")
    return client_nonce, server_nonce, proof


def format_auth_header(token: str | bytes, server_nonce: bytes, client_nonce: bytes) -> str:
    proof = auth.client_proof(token, server_nonce, client_nonce)
    return f"{client_nonce.hex()}:{server_nonce.hex()}:{proof.hex()}"


def _reject(message: str) -> grpc.RpcMethodHandler:
    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(handler)


class AuthInterceptor(grpc.ServerInterceptor):
    """Rejects every call but GetChallenge that lacks a valid ``wqs-auth`` proof."""

    def __init__(self, token: str | bytes, nonces: NonceTable) -> None:
        self._token = token
        self._nonces = nonces

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          details: grpc.HandlerCallDetails) -> Any:
        if details.method == CHALLENGE_METHOD:
            return continuation(details)
        header = next((v for k, v in (details.invocation_metadata or ())
                       if k == AUTH_HEADER), None)
        if header is None:
            return _reject("this daemon requires authentication (wqs-auth metadata missing)")
        try:
            client_nonce, server_nonce, proof = parse_auth_header(
                header.decode() if isinstance(header, bytes) else header)
        except ValueError as e:
            return _reject(f"malformed wqs-auth metadata: {e}")
        problem = self._nonces.check(server_nonce, client_nonce)
        if problem is not None:
            return _reject(problem)
        try:
            auth.verify(auth.client_proof(self._token, server_nonce, client_nonce), proof)
        except AuthError as e:
            return _reject(str(e))
        if not self._nonces.bind(server_nonce, client_nonce):
            return _reject("server nonce already used by another client")
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler  # unknown method (gRPC answers UNIMPLEMENTED) or not unary
        return _with_server_proof(
            handler, auth.server_proof(self._token, server_nonce, client_nonce).hex())


def _with_server_proof(handler: grpc.RpcMethodHandler, proof_hex: str) -> grpc.RpcMethodHandler:
    inner = handler.unary_unary

    def behaviour(request: Any, context: grpc.ServicerContext) -> Any:
        context.send_initial_metadata(((SERVER_PROOF_HEADER, proof_hex),))
        return inner(request, context)

    return grpc.unary_unary_rpc_method_handler(
        behaviour, request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer)


class ControlService(pb_grpc.ControlServicer):
    """The Control servicer. Holds the node's serving status; everything else it reads
    from the engine (through `engine_provider`, which returns None while no engine is
    open) and from the callbacks the daemon passes in."""

    def __init__(self, engine_provider: Callable[[], "Engine | None"],
                 node_info: Mapping[str, Any], *,
                 on_drain: DrainCallback | None = None,
                 on_resume: ResumeCallback | None = None,
                 request_metrics: "RequestMetrics | None" = None,
                 cluster_provider: Callable[[], Sequence[ClusterNodeInfo]] | None = None,
                 nonces: NonceTable | None = None,
                 usage_provider: UsageProvider = self_usage) -> None:
        info = dict(node_info)
        self.node_id = str(info.pop("node_id", ""))
        self.data_address = str(info.pop("data_address", ""))
        self.control_address = str(info.pop("control_address", ""))
        self.version = str(info.pop("version", None) or software_version())
        self.start_time = float(info.pop("start_time", None) or time.time())
        labels = info.pop("labels", None) or {}
        # Whatever else the daemon passes (transport, rdma device, ...) is advertised too.
        self.labels = {str(k): str(v) for k, v in {**info, **labels}.items() if v is not None}
        self._engine_provider = engine_provider
        self._on_drain = on_drain
        self._on_resume = on_resume
        self._metrics = request_metrics
        self._cluster_provider = cluster_provider
        self._nonces = nonces
        self._usage_provider = usage_provider
        self._started = time.monotonic() - max(0.0, time.time() - self.start_time)
        self._status = SERVING
        self._lock = threading.Lock()

    # ---- state the daemon may set ------------------------------------------------------

    @property
    def status(self) -> str:
        """serving | draining | not_serving, as Health reports it."""
        if self._engine_provider() is None:
            return NOT_SERVING
        with self._lock:
            return self._status

    def set_status(self, status: str) -> None:
        if status not in _STATUS_TO_PB:
            raise ValueError(f"status must be one of {sorted(_STATUS_TO_PB)}, got {status!r}")
        with self._lock:
            self._status = status

    def uptime(self) -> float:
        return time.monotonic() - self._started

    # ---- RPCs ------------------------------------------------------------------------

    def GetChallenge(self, request: pb.GetChallengeRequest,
                     context: grpc.ServicerContext) -> pb.GetChallengeResponse:
        if self._nonces is None:
            return pb.GetChallengeResponse(auth_required=False)
        return pb.GetChallengeResponse(server_nonce=self._nonces.issue(),
                                       ttl_seconds=self._nonces.ttl, auth_required=True)

    def Health(self, request: pb.HealthRequest,
               context: grpc.ServicerContext) -> pb.HealthResponse:
        status = self.status
        message = ""
        if self._engine_provider() is None:
            message = "storage engine is not open"
        elif status == DRAINING:
            message = "draining: new data-plane requests are refused"
        elif status == NOT_SERVING:
            message = "drained"
        return pb.HealthResponse(status=_STATUS_TO_PB[status], node_id=self.node_id,
                                 uptime_seconds=self.uptime(), message=message)

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        engine = self._require_engine(context)
        resp = pb.StatsResponse(node_id=self.node_id, uptime_seconds=self.uptime())
        for name, value in engine.stats().as_dict().items():
            resp.engine[name] = int(value)
        if self._metrics is not None:
            for s in self._metrics.summaries():
                resp.latency.add(op=s.op, count=s.count, sum_seconds=s.sum_seconds,
                                 p50_seconds=s.p50_seconds, p90_seconds=s.p90_seconds,
                                 p99_seconds=s.p99_seconds, errors=s.errors)
        u = self._usage_provider()
        resp.process.cpu_user_seconds = u.user_s
        resp.process.cpu_system_seconds = u.system_s
        resp.process.voluntary_ctx_switches = u.voluntary_ctx
        resp.process.involuntary_ctx_switches = u.involuntary_ctx
        resp.process.processes = u.processes
        return resp

    def NodeInfo(self, request: pb.NodeInfoRequest,
                 context: grpc.ServicerContext) -> pb.NodeInfoResponse:
        resp = pb.NodeInfoResponse(
            node_id=self.node_id, data_address=self.data_address,
            control_address=self.control_address, software_version=self.version,
            uptime_seconds=self.uptime(), start_time_unix=self.start_time,
            status=_STATUS_TO_PB[self.status], labels=self.labels,
        )
        engine = self._engine_provider()
        if engine is not None:  # identity still answers while the engine is down
            info = engine.info()
            resp.capacity_bytes = int(info.get("capacity_bytes", 0))
            resp.format_version = int(info.get("format_version", 0))
            resp.device_uuid = str(info.get("uuid", ""))
            resp.device_path = str(info.get("device", ""))
            resp.device_size = int(info.get("device_size", 0))
            resp.region_size = int(info.get("region_size", 0))
            resp.num_regions = int(info.get("num_regions", 0))
            resp.max_block_size = int(info.get("max_block_size", 0))
        return resp

    def Drain(self, request: pb.DrainRequest, context: grpc.ServicerContext) -> pb.DrainResponse:
        timeout = request.timeout_seconds if request.timeout_seconds > 0 else DEFAULT_DRAIN_TIMEOUT
        start = time.monotonic()
        self.set_status(DRAINING)
        if self._on_drain is None:
            result = DrainResult(True, message="no data plane attached")
        else:
            raw = self._on_drain(timeout)
            result = raw if isinstance(raw, DrainResult) else DrainResult(raw is None or bool(raw))
        if result.drained:
            with self._lock:  # unless a Resume came in meanwhile
                if self._status == DRAINING:
                    self._status = NOT_SERVING
        log.info("drain: drained=%s in-flight=%d", result.drained, result.inflight_remaining)
        return pb.DrainResponse(
            drained=result.drained, inflight_remaining=result.inflight_remaining,
            elapsed_seconds=time.monotonic() - start, status=_STATUS_TO_PB[self.status],
            message=result.message,
        )

    def Resume(self, request: pb.ResumeRequest,
               context: grpc.ServicerContext) -> pb.ResumeResponse:
        self._require_engine(context)
        previous = self.status
        if self._on_resume is not None:
            try:
                self._on_resume()
            except Exception as e:  # noqa: BLE001 - reported to the caller, state unchanged
                log.warning("resume refused: %s", e)
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"cannot resume: {e}")
        self.set_status(SERVING)
        log.info("resume: %s -> serving", previous)
        return pb.ResumeResponse(status=_STATUS_TO_PB[self.status],
                                 previous=_STATUS_TO_PB[previous])

    def EvictAll(self, request: pb.EvictAllRequest,
                 context: grpc.ServicerContext) -> pb.EvictAllResponse:
        engine = self._require_engine(context)
        n = engine.evict_all()
        log.warning("evict-all through the control plane dropped %d blocks", n)
        return pb.EvictAllResponse(evicted_blocks=n)

    def ClusterMap(self, request: pb.ClusterMapRequest,
                   context: grpc.ServicerContext) -> pb.ClusterMapResponse:
        if self._cluster_provider is not None:
            nodes, source = list(self._cluster_provider()), "cluster"
        else:
            nodes, source = [self.local_node()], "local"
        resp = pb.ClusterMapResponse(source=source)
        for n in nodes:
            resp.nodes.add(node_id=n.node_id, address=n.address,
                           state=_STATUS_TO_PB.get(n.state, pb.SERVING_STATUS_UNSPECIFIED),
                           capacity_bytes=n.capacity_bytes, used_bytes=n.used_bytes,
                           hit_rate=n.hit_rate, control_address=n.control_address)
        return resp

    def local_node(self) -> ClusterNodeInfo:
        """This daemon as a cluster-map row (also what it would publish to etcd)."""
        engine = self._engine_provider()
        capacity = used = 0
        hit_rate = 0.0
        if engine is not None:
            s = engine.stats()
            capacity, used = s.capacity_bytes, s.used_bytes
            hit_rate = (s.hits_dram + s.hits_ssd) / s.gets if s.gets else 0.0
        return ClusterNodeInfo(node_id=self.node_id, address=self.data_address,
                               state=self.status, capacity_bytes=capacity, used_bytes=used,
                               hit_rate=hit_rate, control_address=self.control_address)

    def _require_engine(self, context: grpc.ServicerContext) -> "Engine":
        engine = self._engine_provider()
        if engine is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "storage engine is not open")
        return engine  # type: ignore[return-value]  # abort() raises


@dataclass
class ControlServer:
    """A running control server: the grpc.Server, the port it bound and its servicer."""

    server: grpc.Server
    port: int
    service: ControlService

    @property
    def address(self) -> str:
        return self.service.control_address

    def stop(self, grace: float | None = None) -> threading.Event:
        return self.server.stop(grace)

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.server.wait_for_termination(timeout)


def start_control_server(engine_provider: Callable[[], "Engine | None"], address: str,
                         node_info: Mapping[str, Any], auth_token: str | None,
                         on_drain: DrainCallback | None = None, *,
                         on_resume: ResumeCallback | None = None,
                         request_metrics: "RequestMetrics | None" = None,
                         cluster_provider: Callable[[], Sequence[ClusterNodeInfo]] | None = None,
                         nonce_ttl: float = DEFAULT_NONCE_TTL,
                         max_workers: int = 8,
                         usage_provider: UsageProvider = self_usage) -> ControlServer:
    """Serve the Control service on `address` ("host:port"; port 0 picks a free one).

    node_info: ``node_id``, ``data_address`` and optionally ``control_address``
    (default: the bound address), ``version``, ``start_time`` (unix seconds), ``labels``
    (dict); other keys become labels. With `auth_token`, every RPC but GetChallenge needs
    the challenge-response proof. `usage_provider` supplies the CPU and context switches
    Stats reports (default: this process's getrusage).
    """
    nonces = NonceTable(ttl=nonce_ttl) if auth_token else None
    interceptors: list[grpc.ServerInterceptor] = []
    if auth_token and nonces is not None:
        interceptors.append(AuthInterceptor(auth_token, nonces))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="wqs-control"),
        interceptors=interceptors,
        # gRPC sets SO_REUSEPORT by default: a second daemon on the same port would then
        # start "fine" and steal half the calls. Fail the bind instead.
        options=[("grpc.so_reuseport", 0)],
    )
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as e:  # recent grpcio raises; older ones return 0
        raise OSError(f"control plane cannot listen on {address}: {e}") from None
    if port == 0:
        raise OSError(f"control plane cannot listen on {address}")
    host = address.rsplit(":", 1)[0]
    info = dict(node_info)
    info.setdefault("control_address", f"{host}:{port}")
    service = ControlService(engine_provider, info, on_drain=on_drain, on_resume=on_resume,
                             request_metrics=request_metrics,
                             cluster_provider=cluster_provider, nonces=nonces,
                             usage_provider=usage_provider)
    pb_grpc.add_ControlServicer_to_server(service, server)
    server.start()
    log.info("control plane listening on %s:%d (auth %s)", host, port,
             "on" if auth_token else "off")
    return ControlServer(server=server, port=port, service=service)


# --------------------------------------------------------------------------- client side


@dataclass
class _Session:
    """The nonce pair and header of one channel's authentication."""

    server_nonce: bytes
    client_nonce: bytes
    header: str
    server_proof_hex: str
    expires_at: float  # monotonic


class ControlClient:
    """Blocking client of one daemon's control plane. Thread-safe.

    With `auth_token`, the client fetches one challenge per channel (renewed before it
    expires) and also checks the daemon's proof on every answer; a daemon that does not
    authenticate is refused. Errors come as WQS exceptions with the grpc.RpcError as
    ``__cause__``: AuthError (UNAUTHENTICATED, or a daemon that cannot prove it holds the
    token), NodeUnavailable
    (UNAVAILABLE or DEADLINE_EXCEEDED), RemoteError (anything else).
    """

    def __init__(self, address: str, auth_token: str | None = None, timeout: float = 5.0) -> None:
        self.address = address
        self.timeout = timeout
        self._token = auth_token
        self._channel = grpc.insecure_channel(address)
        self._stub = pb_grpc.ControlStub(self._channel)
        self._session: _Session | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- RPCs ------------------------------------------------------------------------

    def health(self) -> str:
        """"serving", "draining" or "not_serving"."""
        return _status_name(self._call("Health", pb.HealthRequest()).status)

    def stats(self) -> dict[str, Any]:
        """{"node_id", "uptime_seconds", "engine": {field: int},
        "latency": {op: {"count", "sum_seconds", "p50_seconds", "p90_seconds",
        "p99_seconds", "errors"}},
        "process": {"user_s", "system_s", "voluntary_ctx", "involuntary_ctx",
        "processes"} (the fields of wqs.procstat.ProcessUsage), or None from a daemon
        that does not report it}"""
        r = self._call("Stats", pb.StatsRequest())
        return {
            "node_id": r.node_id,
            "uptime_seconds": r.uptime_seconds,
            "engine": dict(r.engine),
            "latency": {s.op: {"count": s.count, "sum_seconds": s.sum_seconds,
                               "p50_seconds": s.p50_seconds, "p90_seconds": s.p90_seconds,
                               "p99_seconds": s.p99_seconds, "errors": s.errors}
                        for s in r.latency},
            "process": _usage_from_pb(r.process).as_dict() if r.HasField("process") else None,
        }

    def process_usage(self) -> ProcessUsage:
        """The daemon's CPU and context switches so far (one Stats call). RemoteError
        if the daemon is too old to report them."""
        r = self._call("Stats", pb.StatsRequest())
        if not r.HasField("process"):
            raise RemoteError(f"{self.address} Stats: the daemon does not report its "
                              "process usage (a wqsd older than this client)")
        return _usage_from_pb(r.process)

    def node_info(self) -> dict[str, Any]:
        """Every NodeInfoResponse field by name; status as a string, labels as a dict."""
        r = self._call("NodeInfo", pb.NodeInfoRequest())
        out = {f.name: getattr(r, f.name) for f in r.DESCRIPTOR.fields}
        out["status"] = _status_name(r.status)
        out["labels"] = dict(r.labels)
        return out

    def drain(self, timeout_s: float = DEFAULT_DRAIN_TIMEOUT) -> dict[str, Any]:
        """{"drained", "inflight_remaining", "elapsed_seconds", "status", "message"}"""
        r = self._call("Drain", pb.DrainRequest(timeout_seconds=timeout_s),
                       deadline=timeout_s + self.timeout)
        return {"drained": r.drained, "inflight_remaining": r.inflight_remaining,
                "elapsed_seconds": r.elapsed_seconds, "status": _status_name(r.status),
                "message": r.message}

    def resume(self) -> dict[str, str]:
        """Undo a drain: {"status": "serving", "previous": what the node was before}."""
        r = self._call("Resume", pb.ResumeRequest())
        return {"status": _status_name(r.status), "previous": _status_name(r.previous)}

    def evict_all(self) -> int:
        """Drop every block on the node; returns how many were dropped."""
        return self._call("EvictAll", pb.EvictAllRequest(), deadline=max(self.timeout, 60.0)
                          ).evicted_blocks

    def cluster_map(self) -> list[dict[str, Any]]:
        """[{"node_id", "address", "state", "capacity_bytes", "used_bytes", "hit_rate",
        "control_address"}]"""
        r = self._call("ClusterMap", pb.ClusterMapRequest())
        return [{"node_id": n.node_id, "address": n.address, "state": _status_name(n.state),
                 "capacity_bytes": n.capacity_bytes, "used_bytes": n.used_bytes,
                 "hit_rate": n.hit_rate, "control_address": n.control_address}
                for n in r.nodes]

    # ---- plumbing --------------------------------------------------------------------

    def _call(self, method: str, request: Any, deadline: float | None = None) -> Any:
        rpc = getattr(self._stub, method)
        timeout = self.timeout if deadline is None else deadline
        for attempt in range(2):
            session = self._auth_session() if self._token else None
            metadata = ((AUTH_HEADER, session.header),) if session else None
            try:
                response, call = rpc.with_call(request, timeout=timeout, metadata=metadata)
            except grpc.RpcError as e:
                code = e.code() if isinstance(e, grpc.Call) else None
                # The daemon restarted or our nonce expired early: one fresh challenge.
                if code == grpc.StatusCode.UNAUTHENTICATED and session and attempt == 0:
                    with self._lock:
                        if self._session is session:
                            self._session = None
                    continue
                raise _translate(e, self.address, method) from e
            if session is not None:
                self._check_server_proof(call, session)
            return response
        raise AssertionError("unreachable")

    def _auth_session(self) -> _Session:
        with self._lock:
            s = self._session
            # Renew a little before the daemon would refuse the nonce.
            if s is not None and time.monotonic() < s.expires_at:
                return s
            try:
                ch = self._stub.GetChallenge(pb.GetChallengeRequest(), timeout=self.timeout)
            except grpc.RpcError as e:
                raise _translate(e, self.address, "GetChallenge") from e
            if not ch.auth_required:
                # Mutual authentication: a daemon that skips it could be anyone.
                raise AuthError(f"{self.address}: the daemon does not ask for authentication "
                                "but this client has a token; refusing to trust it")
            assert self._token is not None
            client_nonce = auth.make_nonce()
            server_nonce = bytes(ch.server_nonce)
            ttl = ch.ttl_seconds or DEFAULT_NONCE_TTL
            self._session = _Session(
                server_nonce=server_nonce, client_nonce=client_nonce,
                header=format_auth_header(self._token, server_nonce, client_nonce),
                server_proof_hex=auth.server_proof(self._token, server_nonce, client_nonce).hex(),
                expires_at=time.monotonic() + ttl * 0.8,
            )
            return self._session

    def _check_server_proof(self, call: grpc.Call, session: _Session) -> None:
        got = next((v for k, v in (call.initial_metadata() or ()) if k == SERVER_PROOF_HEADER), "")
        try:
            auth.verify(bytes.fromhex(session.server_proof_hex), bytes.fromhex(str(got)))
        except (AuthError, ValueError):
            raise AuthError(f"{self.address}: the daemon did not prove it holds the "
                            "auth token") from None


def _usage_from_pb(p: pb.ProcessUsage) -> ProcessUsage:
    return ProcessUsage(user_s=p.cpu_user_seconds, system_s=p.cpu_system_seconds,
                        voluntary_ctx=p.voluntary_ctx_switches,
                        involuntary_ctx=p.involuntary_ctx_switches, processes=p.processes)


def _translate(e: grpc.RpcError, address: str, method: str) -> Exception:
    code = e.code() if isinstance(e, grpc.Call) else None
    details = e.details() if isinstance(e, grpc.Call) else str(e)
    msg = f"{address} {method}: {details}"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthError(msg)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return NodeUnavailable(msg)
    return RemoteError(f"{msg} ({code.name if code else 'error'})")
