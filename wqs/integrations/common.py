"""What the engine integrations share: naming the cluster, one client per cluster, IDs.

An engine's config names the cluster in one of two ways (the first found wins):

* ``config``: the path of a client YAML (the file `wqs.Client.from_config` reads:
  servers or etcd, timeouts, replicas, auth token file);
* ``servers``: a list of ``host:port`` or one string ``"h1:7070,h2:7070"``;

then the environment: ``WQS_CONFIG`` (a path), else ``WQS_SERVERS``. ``timeout_s``,
``connect_timeout_s`` and ``replicas`` given next to either override the file.

Every connector of one process that names the same cluster shares one `wqs.Client`
(reference-counted: the last `release_client` closes it), as the SDK asks.
"""

from __future__ import annotations

import os
import struct
import threading
from typing import Any, Callable, Mapping

import xxhash

from wqs.client import Client
from wqs.config import load_client_config
from wqs.errors import ConfigError

CONFIG_ENV = "WQS_CONFIG"
SERVERS_ENV = "WQS_SERVERS"
_OVERRIDABLE = ("timeout_s", "connect_timeout_s", "replicas", "connections_per_node")

_lock = threading.Lock()
_clients: dict[tuple, list] = {}  # key -> [client, refcount]


def parse_servers(value: Any) -> list[str]:
    """``["h:p", ...]`` or ``"h:p,h:p"`` (spaces allowed) -> a list of ``host:port``."""
    if value is None:
        return []
    if isinstance(value, str):
        return [s.strip() for s in value.split(",") if s.strip()]
    if isinstance(value, (list, tuple)):
        return [str(s).strip() for s in value if str(s).strip()]
    raise ConfigError(f"servers: expected a list of host:port or 'h:p,h:p', got {value!r}")


def cluster_spec(get: Callable[[str], Any], where: str) -> tuple[str | None, list[str], dict]:
    """(config path, servers, overrides) from an engine config's ``get(name)``.

    `where` names the engine's config keys in error messages, e.g.
    ``"extra_config['remote_storage_plugin.wqs.<key>']"``.
    """
    path = get("config") or os.environ.get(CONFIG_ENV) or None
    servers = parse_servers(get("servers"))
    if not path and not servers:
        servers = parse_servers(os.environ.get(SERVERS_ENV))
    if not path and not servers:
        raise ConfigError(
            f"no WQS cluster configured: set {where.format(key='servers')} (host:port list) "
            f"or {where.format(key='config')} (client YAML path), or ${SERVERS_ENV} / "
            f"${CONFIG_ENV}")
    overrides: dict[str, Any] = {}
    for key in _OVERRIDABLE:
        value = get(key)
        if value is not None:
            overrides[key] = value
    return (str(path) if path else None), servers, overrides


def acquire_client(path: str | None, servers: list[str], overrides: Mapping[str, Any]) -> Client:
    """The process's shared client for this cluster (created on first use)."""
    opts = dict(overrides)
    if servers:
        opts["servers"] = list(servers)
    key = (path, tuple(servers), tuple(sorted((k, repr(v)) for k, v in overrides.items())))
    with _lock:
        entry = _clients.get(key)
        if entry is None:
            entry = [Client(config=load_client_config(path, opts)), 0]
            _clients[key] = entry
        entry[1] += 1
        return entry[0]


def release_client(client: Client) -> None:
    """Drop one reference; the last one closes the client."""
    with _lock:
        for key, entry in list(_clients.items()):
            if entry[0] is client:
                entry[1] -= 1
                if entry[1] <= 0:
                    del _clients[key]
                    client.close()
                return
    client.close()  # not from acquire_client


def derive_id(domain: bytes, *parts: bytes | str) -> bytes:
    """A 16-byte block ID: XXH3-128 over ``domain`` and the length-prefixed parts.

    Length prefixes (u32 little-endian) keep ``("ab", "c")`` and ``("a", "bc")`` apart.
    Pure function of its arguments: the same on every host and process.
    """
    h = xxhash.xxh3_128()
    h.update(domain)
    for part in parts:
        b = part.encode("utf-8") if isinstance(part, str) else bytes(part)
        h.update(struct.pack("<I", len(b)))
        h.update(b)
    return h.digest()
