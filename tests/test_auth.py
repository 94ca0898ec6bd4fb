"""The shared-token challenge-response handshake."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from wqs.errors import AuthError
from wqs.rpc import auth
from wqs.rpc.auth import client_proof, make_nonce, server_proof, verify
from wqs.rpc.protocol import (
    AuthRequest, AuthResponse, HelloResponse, Limits, decode_request, decode_response,
    encode_request, encode_response)

TOKEN = b"s3cret-token-0123456789"


def handshake(client_token, server_token, server_nonce=None, client_nonce=None) -> None:
    """Both sides of one handshake, through real frames; raises AuthError where it fails."""
    hello = decode_response(encode_response(
        HelloResponse(1, server_nonce or make_nonce(), True, Limits())))
    cn = client_nonce or make_nonce()
    req = decode_request(encode_request(
        AuthRequest(2, cn, client_proof(client_token, hello.nonce, cn))))
    verify(client_proof(server_token, hello.nonce, req.client_nonce), req.proof)  # server side
    resp = decode_response(encode_response(
        AuthResponse(2, server_proof(server_token, hello.nonce, req.client_nonce))))
    verify(server_proof(client_token, hello.nonce, cn), resp.proof)  # client side


def test_nonces_are_fresh_and_32_bytes():
    nonces = {make_nonce() for _ in range(100)}
    assert len(nonces) == 100 and all(len(n) == auth.NONCE_LEN == 32 for n in nonces)


def test_right_token_passes_both_ways():
    handshake(TOKEN, TOKEN)
    handshake("a string token", b"a string token")


def test_wrong_token_fails_on_the_server():
    sn, cn = make_nonce(), make_nonce()
    with pytest.raises(AuthError):
        verify(client_proof(TOKEN, sn, cn), client_proof(b"wrong", sn, cn))
    with pytest.raises(AuthError):
        handshake(b"wrong", TOKEN)


def test_a_fake_server_without_the_token_fails_on_the_client():
    sn, cn = make_nonce(), make_nonce()
    with pytest.raises(AuthError):
        verify(server_proof(TOKEN, sn, cn), server_proof(b"guess", sn, cn))


def test_replayed_proof_fails_against_a_new_server_nonce():
    sn1, sn2, cn = make_nonce(), make_nonce(), make_nonce()
    recorded = client_proof(TOKEN, sn1, cn)
    verify(client_proof(TOKEN, sn1, cn), recorded)
    with pytest.raises(AuthError):
        verify(client_proof(TOKEN, sn2, cn), recorded)  # same client nonce, new connection


def test_replayed_server_proof_fails_against_a_new_client_nonce():
    sn, cn1, cn2 = make_nonce(), make_nonce(), make_nonce()
    with pytest.raises(AuthError):
        verify(server_proof(TOKEN, sn, cn2), server_proof(TOKEN, sn, cn1))


def test_client_and_server_proofs_differ_so_neither_can_be_reflected():
    sn, cn = make_nonce(), make_nonce()
    assert client_proof(TOKEN, sn, cn) != server_proof(TOKEN, sn, cn)
    with pytest.raises(AuthError):
        verify(client_proof(TOKEN, sn, cn), server_proof(TOKEN, sn, cn))


def test_proof_is_the_specified_hmac():
    sn, cn = bytes(range(32)), bytes(range(32, 64))
    want = hmac.new(TOKEN, b"wqs-auth-v1" + sn + cn, hashlib.sha256).digest()
    assert client_proof(TOKEN, sn, cn) == want
    want = hmac.new(TOKEN, b"wqs-auth-v1-server" + sn + cn, hashlib.sha256).digest()
    assert server_proof(TOKEN, sn, cn) == want


def test_token_never_appears_on_the_wire():
    sn, cn = make_nonce(), make_nonce()
    wire = (encode_request(AuthRequest(1, cn, client_proof(TOKEN, sn, cn)))
            + encode_response(AuthResponse(1, server_proof(TOKEN, sn, cn))))
    assert TOKEN not in wire and TOKEN[:8] not in wire


def test_bad_inputs():
    sn = make_nonce()
    with pytest.raises(AuthError, match="empty"):
        client_proof(b"", sn, make_nonce())
    with pytest.raises(AuthError, match="nonce"):
        client_proof(TOKEN, sn, b"short")
    with pytest.raises(AuthError, match="equals"):
        client_proof(TOKEN, sn, sn)  # a peer echoing our nonce back
    with pytest.raises(AuthError):
        verify(client_proof(TOKEN, sn, make_nonce()), b"")
