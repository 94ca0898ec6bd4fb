"""The daemon's Unix sockets for same-host clients: one per shard.

Shard 0 listens at the configured path, shard k at PATH.k. The supervisor makes them
before it forks the shards (as it makes the TCP listeners) and removes them when it
stops. A socket file left by a daemon that was killed is recognised (nothing accepts on
it) and replaced; one that a live process serves, or a file that is not a socket, stops
the start-up with an error naming it.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import socket
import stat

from wqs.config import MAX_SOCKET_PATH
from wqs.errors import ConfigError

log = logging.getLogger("wqs.daemon")


def shard_paths(base: str, count: int) -> list[str]:
    return [base if k == 0 else f"{base}.{k}" for k in range(count)]


def listen_local(base: str, count: int, mode: int, group: str | None
                 ) -> list[tuple[str, socket.socket]]:
    """A listening Unix socket per shard, with the given mode and group."""
    paths = shard_paths(base, count)
    longest = max(paths, key=len)
    if len(longest.encode()) > MAX_SOCKET_PATH:
        raise ConfigError(f"local_socket: {longest} is longer than {MAX_SOCKET_PATH} bytes, "
                          "the most a Unix socket path takes; set a shorter path")
    gid = -1
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"local_socket_group: no group named {group!r}") from None
    os.makedirs(os.path.dirname(base) or ".", exist_ok=True)
    made: list[tuple[str, socket.socket]] = []
    try:
        for path in paths:
            _clear_stale(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(path)
                os.chown(path, -1, gid)
                os.chmod(path, mode)
                sock.listen(512)
            except OSError as e:
                sock.close()
                raise OSError(f"local_socket: cannot listen on {path}: {e.strerror}") from None
            made.append((path, sock))
    except BaseException:
        close_local(made)
        raise
    return made


def _clear_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"local_socket: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise OSError(f"local_socket: cannot tell whether {path} is in use: "
                          f"{e.strerror}") from None
        log.info("removing stale socket %s (left by a daemon that did not stop)", path)
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(f"local_socket: {path} is served by another process (is another wqsd "
                  "running with the same local_socket?)")


def close_local(socks: list[tuple[str, socket.socket]], unlink: bool = True) -> None:
    for path, sock in socks:
        sock.close()
        if unlink:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
