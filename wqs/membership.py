"""Cluster membership through etcd: daemons register, clients watch.

A daemon puts `<prefix><node_id>` = JSON NodeRecord under a lease and keeps the lease
alive; if the daemon dies the lease expires and the key disappears. A client lists the
prefix, then watches it, and rebuilds its hash ring on every change.

This speaks etcd's v3 JSON gateway (/v3/kv/range, /v3/lease/*, /v3/watch) over plain
HTTP with the standard library. It is written by hand on purpose: the Python etcd3
client on PyPI has been unmaintained since 2020 and its generated protobuf code does not
load with protobuf >= 4, which grpcio needs here.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

from wqs.config import EtcdConfig
from wqs.errors import WQSError

log = logging.getLogger("wqs.membership")

HTTP_TIMEOUT_S = 5.0
MAX_RESPONSE = 64 * 1024 * 1024  # bytes of one etcd answer we are willing to read


class EtcdError(WQSError):
    """etcd could not be reached or refused a request."""


@dataclass(frozen=True)
class NodeRecord:
    """What a daemon publishes about itself."""

    node_id: str
    address: str  # data plane host:port
    control_address: str
    capacity_bytes: int
    version: str = ""
    transport: str = "tcp"

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "NodeRecord":
        data = json.loads(raw)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with prefix (etcd's range_end)."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


class EtcdClient:
    """The few etcd v3 calls WQS needs, tried against each endpoint in turn."""

    def __init__(self, config: EtcdConfig) -> None:
        self.endpoints = [e if "://" in e else f"http://{e}" for e in config.endpoints]
        self.prefix = config.prefix.encode()
        self.lease_ttl = config.lease_ttl

    def _call(self, path: str, body: dict, timeout: float = HTTP_TIMEOUT_S) -> dict:
        errors = []
        for endpoint in self.endpoints:
            req = urllib.request.Request(endpoint + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    return json.loads(resp.read(MAX_RESPONSE))
            except urllib.error.HTTPError as e:
                raise EtcdError(f"etcd {endpoint}{path}: HTTP {e.code}: "
                                f"{e.read(4096).decode(errors='replace')}") from None
            except (OSError, ValueError) as e:
                errors.append(f"{endpoint}: {e}")
        raise EtcdError("no etcd endpoint answered: " + "; ".join(errors))

    def grant(self, ttl: int) -> int:
        return int(self._call("/v3/lease/grant", {"TTL": ttl})["ID"])

    def keepalive(self, lease: int) -> int:
        """Renew a lease; its remaining TTL (0: the lease is gone)."""
        result = self._call("/v3/lease/keepalive", {"ID": lease}).get("result", {})
        return int(result.get("TTL", 0))

    def revoke(self, lease: int) -> None:
        self._call("/v3/lease/revoke", {"ID": lease})

    def put(self, key: bytes, value: bytes, lease: int = 0) -> None:
        body = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = lease
        self._call("/v3/kv/put", body)

    def get(self, key: bytes) -> bytes | None:
        kvs = self._call("/v3/kv/range", {"key": _b64(key)}).get("kvs", [])
        return base64.b64decode(kvs[0].get("value", "")) if kvs else None

    def delete(self, key: bytes) -> None:
        self._call("/v3/kv/deleterange", {"key": _b64(key)})

    def list_prefix(self) -> tuple[dict[bytes, bytes], int]:
        """All keys under the prefix and the store revision they were read at."""
        resp = self._call("/v3/kv/range", {"key": _b64(self.prefix),
                                            "range_end": _b64(_prefix_end(self.prefix))})
        kvs = {base64.b64decode(kv["key"]): base64.b64decode(kv.get("value", ""))
               for kv in resp.get("kvs", [])}
        return kvs, int(resp["header"]["revision"])

    def watch(self, start_revision: int, stop: threading.Event) -> Iterator[tuple[str, bytes, bytes]]:
        """Events ("PUT"|"DELETE", key, value) under the prefix from start_revision on."""
        endpoint = self.endpoints[0].split("://", 1)[1]
        conn = http.client.HTTPConnection(endpoint, timeout=HTTP_TIMEOUT_S)
        body = json.dumps({"create_request": {
            "key": _b64(self.prefix), "range_end": _b64(_prefix_end(self.prefix)),
            "start_revision": start_revision}})
        try:
            conn.request("POST", "/v3/watch", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise EtcdError(f"etcd watch: HTTP {resp.status}")
            # Progress arrives at least every few seconds only if events happen; a short
            # socket timeout lets us notice `stop` and is otherwise harmless.
            conn.sock.settimeout(1.0)
            buf = b""
            while not stop.is_set():
                try:
                    chunk = resp.read1(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    raise EtcdError("etcd closed the watch stream")
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield from self._events(json.loads(line))
                if len(buf) > MAX_RESPONSE:
                    raise EtcdError("etcd watch message too large")
        finally:
            conn.close()

    @staticmethod
    def _events(message: dict) -> Iterator[tuple[str, bytes, bytes]]:
        result = message.get("result", {})
        for ev in result.get("events", []):
            kv = ev.get("kv", {})
            yield (ev.get("type", "PUT"), base64.b64decode(kv.get("key", "")),
                   base64.b64decode(kv.get("value", "")))


class Registrar:
    """Daemon side: keep this node's record in etcd while the daemon runs."""

    def __init__(self, client: EtcdClient, record: NodeRecord) -> None:
        self.client = client
        self.record = record
        self.key = client.prefix + record.node_id.encode()
        self._lease = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep_alive, name="wqs-etcd-lease",
                                        daemon=True)

    def start(self) -> None:
        self._register()
        self._thread.start()
        log.info("registered %s in etcd as %r (lease ttl %ds)", self.record.address,
                 self.key.decode(), self.client.lease_ttl)

    def _register(self) -> None:
        existing = self.client.get(self.key)
        if existing is not None:
            other = NodeRecord.from_json(existing)
            if other.address != self.record.address:
                # Two daemons under one node_id would overwrite each other's record.
                raise EtcdError(f"node_id {self.record.node_id!r} is already registered by "
                                f"{other.address}; give each daemon its own node_id")
        self._lease = self.client.grant(self.client.lease_ttl)
        self.client.put(self.key, self.record.to_json(), self._lease)

    def _keep_alive(self) -> None:
        interval = max(0.5, self.client.lease_ttl / 3)
        while not self._stop.wait(interval):
            try:
                if self.client.keepalive(self._lease) <= 0:
                    log.warning("etcd lease expired; registering again")
                    self._register()
            except EtcdError as e:
                log.warning("etcd keepalive failed: %s", e)

    def stop(self) -> None:
        """Leave the cluster now rather than when the lease runs out."""
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.client.revoke(self._lease)
        except EtcdError as e:
            log.warning("could not revoke the etcd lease: %s", e)


class MembershipWatcher:
    """Client side: the current set of NodeRecords, kept up to date from etcd."""

    def __init__(self, client: EtcdClient, on_change: Callable[[dict[str, NodeRecord]], None]) -> None:
        self.client = client
        self.on_change = on_change
        self.nodes: dict[str, NodeRecord] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wqs-etcd-watch", daemon=True)

    def start(self) -> dict[str, NodeRecord]:
        """Load the current members (raises EtcdError if etcd is unreachable), then watch."""
        self._revision = self._load()
        self._thread.start()
        return self.nodes

    def _load(self) -> int:
        kvs, revision = self.client.list_prefix()
        nodes = {}
        for key, value in kvs.items():
            try:
                rec = NodeRecord.from_json(value)
                nodes[rec.address] = rec
            except (ValueError, TypeError, KeyError) as e:
                log.warning("ignoring malformed node record %r: %s", key, e)
        self._set(nodes)
        return revision

    def _set(self, nodes: dict[str, NodeRecord]) -> None:
        if nodes != self.nodes:
            self.nodes = nodes
            self.on_change(dict(nodes))

    def _run(self) -> None:
        revision = self._revision
        while not self._stop.is_set():
            try:
                for kind, key, value in self.client.watch(revision + 1, self._stop):
                    nodes = dict(self.nodes)
                    if kind == "DELETE":
                        nodes = {a: r for a, r in nodes.items()
                                 if self.client.prefix + r.node_id.encode() != key}
                    else:
                        rec = NodeRecord.from_json(value)
                        nodes = {a: r for a, r in nodes.items() if r.node_id != rec.node_id}
                        nodes[rec.address] = rec
                    self._set(nodes)
                if self._stop.is_set():
                    return
            except (EtcdError, OSError, ValueError) as e:
                if self._stop.is_set():
                    return
                log.warning("etcd watch interrupted (%s); resynchronising", e)
                time.sleep(0.5)
            # After any interruption, list again: events may have been missed.
            try:
                revision = self._load()
            except EtcdError as e:
                log.warning("etcd unreachable: %s", e)
                self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
