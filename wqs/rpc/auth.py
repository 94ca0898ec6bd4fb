"""Mutual challenge-response over a shared token; the token itself never crosses the wire.

The handshake, on top of the HELLO and AUTH frames of wqs.rpc.protocol::

    client -> server  HELLO
    server -> client  HELLO   server_nonce (32 random bytes, fresh per connection)
    client -> server  AUTH    client_nonce, client_proof(token, server_nonce, client_nonce)
    server            verify(client_proof(token, server_nonce, client_nonce), received)
    server -> client  AUTH    server_proof(token, server_nonce, client_nonce)
                      (or an AUTH_FAILED error, then the server closes the connection)
    client            verify(server_proof(token, server_nonce, client_nonce), received)

Each side contributes a fresh nonce, so a proof recorded on one connection is worthless on
the next (the server's nonce differs), and a fake server cannot replay an old answer to a
client either (the client's nonce differs). The two proofs hash different labels, so one
side can never be made to compute the proof it expects from the other (reflection).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from wqs.errors import AuthError

NONCE_LEN = 32
PROOF_LEN = 32  # SHA-256
CLIENT_LABEL = b"wqs-auth-v1"
SERVER_LABEL = b"wqs-auth-v1-server"  # longer than CLIENT_LABEL: the two inputs never collide


def make_nonce() -> bytes:
    """A fresh random nonce from the OS CSPRNG."""
    return secrets.token_bytes(NONCE_LEN)


def _key(token: bytes | str) -> bytes:
    key = token.encode("utf-8") if isinstance(token, str) else bytes(token)
    if not key:
        raise AuthError("the shared token is empty")
    return key


def _nonces(server_nonce: bytes, client_nonce: bytes) -> bytes:
    for name, n in (("server", server_nonce), ("client", client_nonce)):
        if len(n) != NONCE_LEN:
            raise AuthError(f"{name} nonce must be {NONCE_LEN} bytes, got {len(n)}")
    if hmac.compare_digest(server_nonce, client_nonce):
        raise AuthError("client nonce equals server nonce")  # a reflected or broken peer
    return bytes(server_nonce) + bytes(client_nonce)


def client_proof(token: bytes | str, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """HMAC-SHA256(token, b"wqs-auth-v1" + server_nonce + client_nonce)."""
    return hmac.new(_key(token), CLIENT_LABEL + _nonces(server_nonce, client_nonce),
                    hashlib.sha256).digest()


def server_proof(token: bytes | str, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """HMAC-SHA256(token, b"wqs-auth-v1-server" + server_nonce + client_nonce)."""
    return hmac.new(_key(token), SERVER_LABEL + _nonces(server_nonce, client_nonce),
                    hashlib.sha256).digest()


def verify(expected: bytes, received: bytes) -> None:
    """Raise AuthError unless received equals expected, compared in constant time."""
    if len(received) != PROOF_LEN or not hmac.compare_digest(expected, received):
        raise AuthError("authentication failed: the peer does not know the shared token")
