"""The handshake rules (wqs/rpc/session.py), without sockets: a server session and a
client session talk to each other through encoded frames."""

from __future__ import annotations

import pytest

from wqs.errors import AuthError, ProtocolError
from wqs.rpc import protocol as p
from wqs.rpc.session import (
    AWAIT_AUTH, AWAIT_HELLO, CLOSED, READY, ClientSession, ServerSession,
)

LIMITS = p.Limits(max_items=16)


def wire(msg):
    """Through the codec, as the peer would receive it."""
    if isinstance(msg, tuple(p._REQUESTS)):
        return p.decode_request(p.encode_request(msg))
    return p.decode_response(p.encode_response(msg))


def handshake(server: ServerSession, client: ClientSession) -> None:
    hello = server.on_hello(wire(client.hello(1)))
    assert not hello.close
    auth = client.on_hello(wire(hello.response), 2)
    if auth is not None:
        verdict = server.on_auth(wire(auth))
        if isinstance(verdict.response, p.ErrorResponse):
            client.on_auth(wire(verdict.response))  # raises
        client.on_auth(wire(verdict.response))


@pytest.mark.parametrize("token", [None, "s3cret"])
def test_both_sides_reach_ready(token):
    server = ServerSession(token, LIMITS, shard=1, shard_ports=(7070, 7073))
    client = ClientSession(token, "node")
    assert server.state == AWAIT_HELLO
    handshake(server, client)
    assert server.state == READY and client.ready
    assert client.limits == LIMITS
    assert client.hello_response.shard == 1 and client.hello_response.shard_ports == (7070, 7073)
    assert server.admit(5, p.Opcode.GET) is None


def test_a_data_request_before_hello_is_refused_and_closes():
    server = ServerSession(None, LIMITS)
    verdict = server.admit(9, p.Opcode.PUT)
    assert verdict.close and verdict.response.status == p.Status.BAD_REQUEST
    assert "HELLO must be the first" in verdict.response.message
    assert server.state == CLOSED


def test_a_data_request_before_auth_is_refused_and_closes():
    server = ServerSession("tok", LIMITS)
    server.on_hello(p.HelloRequest(1))
    assert server.state == AWAIT_AUTH
    verdict = server.admit(2, p.Opcode.GET)
    assert verdict.close and verdict.response.status == p.Status.AUTH_REQUIRED
    assert server.state == CLOSED


def test_a_wrong_proof_fails_and_closes_a_right_one_is_proven_back():
    server = ServerSession("right", LIMITS)
    client = ClientSession("wrong", "node")
    with pytest.raises(AuthError, match="AUTH_FAILED"):
        handshake(server, client)
    assert server.state == CLOSED and not client.ready


def test_auth_before_hello_fails():
    server = ServerSession("tok", LIMITS)
    verdict = server.on_auth(p.AuthRequest(1, bytes(32), bytes(32)))
    assert verdict.close and verdict.response.status == p.Status.AUTH_FAILED


def test_the_client_refuses_a_server_that_cannot_prove_the_token():
    # A server without auth (it cannot know the token) when the client has one.
    server = ServerSession(None, LIMITS)
    client = ClientSession("tok", "fake")
    with pytest.raises(AuthError, match="does not require auth"):
        handshake(server, client)
    # A server that asks for auth but answers with a proof made from another token.
    server = ServerSession("other", LIMITS)
    client = ClientSession("tok", "fake")
    hello = server.on_hello(client.hello(1))
    auth = client.on_hello(wire(hello.response), 2)
    server.state = READY  # a fake that skips checking and answers anything
    fake = p.AuthResponse(2, bytes(32))
    with pytest.raises(AuthError):
        client.on_auth(wire(fake))
    assert auth is not None and not client.ready


def test_the_client_needs_a_token_when_asked():
    server = ServerSession("tok", LIMITS)
    client = ClientSession(None, "node")
    with pytest.raises(AuthError, match="requires an auth token"):
        client.on_hello(wire(server.on_hello(client.hello(1)).response), 2)


def test_the_client_names_an_unexpected_answer():
    client = ClientSession(None, "node")
    with pytest.raises(ProtocolError, match="expected HelloResponse, got PingResponse"):
        client.on_hello(p.PingResponse(1), 2)
    with pytest.raises(ProtocolError, match="handshake refused: BUSY"):
        client.on_hello(p.ErrorResponse(1, p.Opcode.HELLO, p.Status.BUSY, "draining"), 2)


def test_a_repeated_hello_only_repeats_the_answer():
    server = ServerSession("tok", LIMITS)
    first = server.on_hello(p.HelloRequest(1)).response
    again = server.on_hello(p.HelloRequest(2)).response
    assert first.nonce == again.nonce and server.state == AWAIT_AUTH
