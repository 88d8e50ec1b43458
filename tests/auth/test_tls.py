"""Transport security through real gRPC: TLS, mTLS, workload identity, certificate rotation."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest

from framework.auth.devca import DevCA, write_dev_pki
from framework.auth.keyset import KeySet, StaticKeys, VerificationKey
from framework.auth.policy import AuthPolicy, JwtConfig, JwtVerifier, current_principal
from framework.auth.tls import (
    CertificateFiles,
    ClientTls,
    ServerTls,
    channel_credentials,
    is_loopback,
    server_credentials,
)
from framework.client import connect
from framework.config import ServerConfig
from framework.errors import PermissionDeniedError, UnauthenticatedError, UnavailableError
from framework.policy import Policy
from framework.server import Server
from gen.echo.v1 import echo_pb2, echo_pb2_grpc

ORDERS = "spiffe://test.example/ns/shop/sa/orders"
BILLING = "spiffe://test.example/ns/shop/sa/billing"
SECRET = secrets.token_bytes(32)


class IdentityEcho(echo_pb2_grpc.EchoServiceServicer):
    """Answers with the caller's subject and workload identity."""

    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        principal = current_principal()
        if principal is None:
            return echo_pb2.EchoResponse(text="anonymous")
        return echo_pb2.EchoResponse(text=f"{principal.subject}|{principal.identity}")

    async def Fail(self, request: echo_pb2.FailRequest, context: Any) -> echo_pb2.FailResponse:
        return echo_pb2.FailResponse()


@dataclass
class Pki:
    """Files of a dev PKI in a temp dir."""

    dir: Path
    ca: DevCA

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def client(self, name: str, uri: str, ca: DevCA | None = None) -> ClientTls:
        (ca or self.ca).issue(uris=[uri]).write(self.path(f"{name}.pem"), self.path(f"{name}.key"))
        return ClientTls(self.path("ca.pem"), self.path(f"{name}.pem"), self.path(f"{name}.key"))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = DevCA.create("test CA")
    ca.write_ca(tmp_path / "ca.pem")
    ca.issue(dns=["localhost"], ips=["127.0.0.1"]).write(
        tmp_path / "server.pem", tmp_path / "server.key"
    )
    return Pki(tmp_path, ca)


def _server_tls(pki: Pki, *, mutual: bool = True) -> ServerTls:
    return ServerTls(
        cert_file=pki.path("server.pem"),
        key_file=pki.path("server.key"),
        client_ca_file=pki.path("ca.pem") if mutual else None,
        check_interval_s=0,
    )


@pytest.fixture
async def start() -> AsyncIterator[Any]:
    servers: list[Server] = []
    channels: list[grpc.aio.Channel] = []

    async def run(credentials: grpc.ServerCredentials, policies: Sequence[Policy]) -> Server:
        server = Server(
            # no policy: an anonymous echo server (scoped Echo then needs insecure_dev)
            ServerConfig(
                name="tls", host="127.0.0.1", port=0, grace_s=0, insecure_dev=not policies
            ),
            policies=policies,
            credentials=credentials,
        )
        server.add(IdentityEcho())
        await server.start()
        servers.append(server)
        return server

    run.channels = channels  # type: ignore[attr-defined]
    yield run
    for channel in channels:
        await channel.close()
    for server in servers:
        await server.stop(grace_s=0)


async def _echo(
    start: Any, server: Server, tls: ClientTls, metadata: Sequence[tuple[str, str]] = ()
) -> str:
    channel = connect(server.address, credentials=channel_credentials(tls))
    start.channels.append(channel)
    stub = echo_pb2_grpc.EchoServiceStub(channel)
    reply = await stub.Echo(echo_pb2.EchoRequest(text="x"), metadata=metadata, timeout=10)
    return str(reply.text)


def _mtls_policy(**kwargs: Any) -> AuthPolicy:
    return AuthPolicy(None, allowed_identities={"echo.v1.EchoService/Echo": [ORDERS]}, **kwargs)


async def test_mtls_identity_is_the_principal(start: Any, pki: Pki) -> None:
    """An allowed workload calls without a token; its SPIFFE ID reaches the servicer."""
    server = await start(server_credentials(_server_tls(pki)), [_mtls_policy()])
    assert await _echo(start, server, pki.client("orders", ORDERS)) == f"{ORDERS}|{ORDERS}"


async def test_identity_rule_may_be_a_callable(start: Any, pki: Pki) -> None:
    """A callable decides per (method, identity); its verdict is enforced."""
    policy = AuthPolicy(None, allowed_identities=lambda method, identity: identity == BILLING)
    server = await start(server_credentials(_server_tls(pki)), [policy])
    assert await _echo(start, server, pki.client("billing", BILLING)) == f"{BILLING}|{BILLING}"
    with pytest.raises(PermissionDeniedError):
        await _echo(start, server, pki.client("orders", ORDERS))


async def test_client_without_certificate_is_refused(start: Any, pki: Pki) -> None:
    """With mTLS required, a client that presents no certificate fails the handshake."""
    server = await start(server_credentials(_server_tls(pki)), [_mtls_policy()])
    with pytest.raises(UnavailableError):
        await _echo(start, server, ClientTls(ca_file=pki.path("ca.pem")))


async def test_client_certificate_from_another_ca_is_refused(start: Any, pki: Pki) -> None:
    """A certificate not signed by the trusted client CA fails the handshake."""
    server = await start(server_credentials(_server_tls(pki)), [_mtls_policy()])
    rogue = pki.client("rogue", ORDERS, ca=DevCA.create("rogue CA"))
    with pytest.raises(UnavailableError):
        await _echo(start, server, rogue)


async def test_identity_not_allowed_is_permission_denied(start: Any, pki: Pki) -> None:
    """A verified workload whose identity is not allowed for the method gets PERMISSION_DENIED."""
    server = await start(server_credentials(_server_tls(pki)), [_mtls_policy()])
    with pytest.raises(PermissionDeniedError) as error:
        await _echo(start, server, pki.client("billing", BILLING))
    assert error.value.reason == "IDENTITY_NOT_ALLOWED"
    assert BILLING in error.value.message


async def test_jwt_and_identity_combine(start: Any, pki: Pki) -> None:
    """Over mTLS a JWT caller keeps its subject and gains the identity; a bad token fails."""
    keys = KeySet(StaticKeys([VerificationKey.hmac("k1", SECRET)]))
    verifier = JwtVerifier(keys, JwtConfig(issuer=None, audience=None))
    policy = AuthPolicy(verifier, allowed_identities={"echo.v1.EchoService/Echo": [ORDERS]})
    server = await start(server_credentials(_server_tls(pki)), [policy])
    token = jwt.encode(
        {"sub": "carol", "exp": int(time.time()) + 60, "scope": "echo:read"},
        SECRET,
        algorithm="HS256",
        headers={"kid": "k1"},
    )
    metadata = [("authorization", f"Bearer {token}")]
    billing = pki.client("billing", BILLING)
    assert await _echo(start, server, billing, metadata) == f"carol|{BILLING}"
    with pytest.raises(PermissionDeniedError):
        await _echo(start, server, billing)  # no token, and billing is not allowed
    with pytest.raises(UnauthenticatedError):
        await _echo(start, server, billing, [("authorization", "Bearer a.b.c")])


async def test_server_only_tls_serves_clients_without_certificates(start: Any, pki: Pki) -> None:
    """Plain TLS (no client CA) encrypts; the caller has no workload identity."""
    server = await start(server_credentials(_server_tls(pki, mutual=False)), [])
    assert await _echo(start, server, ClientTls(ca_file=pki.path("ca.pem"))) == "anonymous"


async def test_rotated_server_certificate_is_served_without_restart(start: Any, pki: Pki) -> None:
    """After the files are replaced, new connections get the new certificate; old ones live on."""
    server = await start(server_credentials(_server_tls(pki)), [_mtls_policy()])
    orders = pki.client("orders", ORDERS)
    old_channel = connect(server.address, credentials=channel_credentials(orders))
    start.channels.append(old_channel)
    stub = echo_pb2_grpc.EchoServiceStub(old_channel)
    await stub.Echo(echo_pb2.EchoRequest(text="x"), timeout=10)

    new_ca = DevCA.create("next CA")
    new_ca.write_ca(pki.path("next-ca.pem"))
    new_ca.issue(dns=["localhost"], ips=["127.0.0.1"]).write(
        pki.path("server.pem"), pki.path("server.key")
    )
    trusting_new = ClientTls(pki.path("next-ca.pem"), orders.cert_file, orders.key_file)
    assert await _echo(start, server, trusting_new) == f"{ORDERS}|{ORDERS}"
    with pytest.raises(UnavailableError):
        await _echo(start, server, orders)  # the old server certificate is gone
    assert (await stub.Echo(echo_pb2.EchoRequest(text="x"), timeout=10)).text.startswith(ORDERS)


def test_broken_replacement_keeps_the_previous_certificate(pki: Pki) -> None:
    """A broken or mismatched pair is not loaded; the previous one stays until both match."""
    fetcher = CertificateFiles(_server_tls(pki))
    fetcher.load()
    assert fetcher() is None  # unchanged
    Path(pki.path("server.pem")).write_bytes(b"not a certificate")
    assert fetcher() is None
    assert fetcher.loads == 1
    fresh = pki.ca.issue(dns=["localhost"])
    Path(pki.path("server.pem")).write_bytes(fresh.cert_pem)  # the key is not replaced yet
    assert fetcher() is None
    Path(pki.path("server.key")).write_bytes(fresh.key_pem)
    assert fetcher() is not None
    assert fetcher.loads == 2


def test_config_validation_names_the_field(pki: Pki) -> None:
    """Bad TLS configs fail at construction with the field named."""
    with pytest.raises(ValueError, match="client_ca_file"):
        ServerTls(pki.path("server.pem"), pki.path("server.key"), require_client_cert=True)
    with pytest.raises(ValueError, match="key_file"):
        ClientTls(cert_file="c.pem")


def test_write_dev_pki_writes_usable_files(tmp_path: Path) -> None:
    """The demo helper writes a CA, a server pair and client pairs that load as mTLS config."""
    paths = write_dev_pki(tmp_path / "pki", clients={"orders": ORDERS})
    assert sorted(paths) == ["ca", "orders.key", "orders.pem", "server.key", "server.pem"]
    tls = ServerTls(str(paths["server.pem"]), str(paths["server.key"]), str(paths["ca"]))
    assert CertificateFiles(tls).load() is not None
    assert channel_credentials(
        ClientTls(str(paths["ca"]), str(paths["orders.pem"]), str(paths["orders.key"]))
    )
    assert paths["orders.key"].stat().st_mode & 0o077 == 0


def test_is_loopback() -> None:
    """Only loopback hosts count as local."""
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")
    assert not is_loopback("example.org")
