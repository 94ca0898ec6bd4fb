"""The rules of a data-plane connection, sans-IO: who may send what, and when.

Everything that decides the handshake lives here, as h11 keeps its state machine in one
table: the daemon's connection and the SDK's transports feed messages in and send what
comes out; neither keeps flags of its own about HELLO or AUTH.

Server side::

    AWAIT_HELLO --HELLO--> AWAIT_AUTH --AUTH ok--> READY
         |          (no token: straight to READY)    |
         +-- a data request first: BAD_REQUEST ------+--> CLOSED (also: AUTH_FAILED,
             a data request before AUTH: AUTH_REQUIRED          a protocol error)

Client side: `hello()` to start, `on_hello(response)` (which says what to send next:
an AUTH, or nothing), `on_auth(response)`, then `ready`. Mutual authentication: the
client refuses a server that cannot prove the token, and a server that does not ask
for a token when the client has one (it could not prove it either).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from wqs.errors import AuthError, ProtocolError
from wqs.rpc import auth
from wqs.rpc import protocol as p

AWAIT_HELLO, AWAIT_AUTH, READY, CLOSED = "AWAIT_HELLO", "AWAIT_AUTH", "READY", "CLOSED"


@dataclass
class Verdict:
    """What to answer, and whether to close the connection after the answer."""

    response: p.Response | None
    close: bool = False


@dataclass
class ServerSession:
    token: str | None
    limits: p.Limits
    shard: int = 0
    shard_ports: tuple[int, ...] = ()
    instance: bytes = b""
    local_sockets: tuple[str, ...] = ()
    nonce: bytes = field(default_factory=auth.make_nonce)
    state: str = AWAIT_HELLO

    def on_hello(self, req: p.HelloRequest) -> Verdict:
        """HELLO (again, too: it only repeats the answer)."""
        if self.state == AWAIT_HELLO:
            self.state = READY if self.token is None else AWAIT_AUTH
        return Verdict(p.HelloResponse(req.request_id, self.nonce, self.token is not None,
                                       self.limits, self.shard, self.shard_ports,
                                       self.instance, self.local_sockets))

    def on_auth(self, req: p.AuthRequest) -> Verdict:
        if self.token is None:
            return Verdict(p.AuthResponse(req.request_id, bytes(auth.PROOF_LEN)))  # nothing to prove
        try:
            if self.state == AWAIT_HELLO:
                raise AuthError("AUTH before HELLO")
            auth.verify(auth.client_proof(self.token, self.nonce, req.client_nonce), req.proof)
        except AuthError:
            self.state = CLOSED
            return Verdict(p.ErrorResponse(req.request_id, p.Opcode.AUTH, p.Status.AUTH_FAILED,
                                           "authentication failed"), close=True)
        self.state = READY
        return Verdict(p.AuthResponse(
            req.request_id, auth.server_proof(self.token, self.nonce, req.client_nonce)))

    def admit(self, request_id: int, opcode: p.Opcode) -> Verdict | None:
        """None if a data request (or the header of a PUT) may proceed now; else the
        error to answer before closing. Checked before any memory is reserved for it."""
        if self.state == READY:
            return None
        if self.state == AWAIT_HELLO:
            error = p.ErrorResponse(request_id, opcode, p.Status.BAD_REQUEST,
                                    "HELLO must be the first request")
        else:
            error = p.ErrorResponse(request_id, opcode, p.Status.AUTH_REQUIRED,
                                    "this server requires AUTH before data operations")
        self.state = CLOSED
        return Verdict(error, close=True)


@dataclass
class ClientSession:
    token: str | None
    address: str = ""
    client_nonce: bytes = field(default_factory=auth.make_nonce)
    state: str = AWAIT_HELLO
    hello_response: p.HelloResponse | None = None

    @property
    def ready(self) -> bool:
        return self.state == READY

    @property
    def limits(self) -> p.Limits:
        assert self.hello_response is not None
        return self.hello_response.limits

    def hello(self, request_id: int) -> p.HelloRequest:
        return p.HelloRequest(request_id)

    def on_hello(self, resp: p.Response, request_id: int) -> p.AuthRequest | None:
        """The HELLO answer: an AUTH to send next, or None (ready)."""
        hello = _expect(resp, p.HelloResponse, self.address)
        self.hello_response = hello
        if hello.auth_required:
            if self.token is None:
                raise AuthError(f"{self.address} requires an auth token")
            self.state = AWAIT_AUTH
            proof = auth.client_proof(self.token, hello.nonce, self.client_nonce)
            return p.AuthRequest(request_id, self.client_nonce, proof)
        if self.token is not None:
            # A server that does not ask for the token cannot prove it knows it.
            raise AuthError(f"{self.address} does not require auth but a token was "
                            "configured: refusing a server that cannot prove the token")
        self.state = READY
        return None

    def on_auth(self, resp: p.Response) -> None:
        answer = _expect(resp, p.AuthResponse, self.address)
        assert self.token is not None and self.hello_response is not None
        auth.verify(auth.server_proof(self.token, self.hello_response.nonce, self.client_nonce),
                    answer.proof)
        self.state = READY


def _expect(resp: p.Response, kind: type, address: str):
    if isinstance(resp, p.ErrorResponse):
        if resp.status in (p.Status.AUTH_FAILED, p.Status.AUTH_REQUIRED):
            raise AuthError(f"{address}: {resp.status.name}: {resp.message}")
        raise ProtocolError(f"{address}: handshake refused: {resp.status.name}: {resp.message}")
    if not isinstance(resp, kind):
        raise ProtocolError(f"{address}: expected {kind.__name__}, got {type(resp).__name__}")
    return resp
