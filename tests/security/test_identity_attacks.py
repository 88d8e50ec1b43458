"""SPIFFE identity confusion over real mTLS: only a certificate's URI SAN is an identity."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from framework.auth.devca import DevCA
from framework.auth.policy import AuthPolicy
from framework.auth.tls import ClientTls, ServerTls, channel_credentials, server_credentials
from framework.config import ServerConfig
from framework.errors import PermissionDeniedError, UnauthenticatedError
from framework.testing import serve
from framework.testing.echo import EchoServicer
from gen.echo.v1.echo_pb2 import EchoRequest
from gen.echo.v1.echo_pb2_grpc import EchoServiceStub

ORDERS = "spiffe://shop.example/ns/prod/sa/orders"
SECURE = ServerConfig(name="secure", host="127.0.0.1", port=0, grace_s=0)


async def _call_as(
    tmp_path: Path,
    *,
    common_name: str | None = None,
    dns: Sequence[str] = (),
    uris: Sequence[str] = (),
) -> tuple[EchoServicer, BaseException | str]:
    """Call Echo over mTLS with a client certificate carrying exactly these names."""
    ca = DevCA.create("test CA")
    ca.write_ca(tmp_path / "ca.pem")
    ca.issue(dns=["localhost"], ips=["127.0.0.1"]).write(tmp_path / "s.pem", tmp_path / "s.key")
    ca.issue(common_name=common_name, dns=dns, uris=uris).write(
        tmp_path / "c.pem", tmp_path / "c.key"
    )
    server_tls = ServerTls(
        str(tmp_path / "s.pem"), str(tmp_path / "s.key"), str(tmp_path / "ca.pem")
    )
    client_tls = ClientTls(
        str(tmp_path / "ca.pem"), str(tmp_path / "c.pem"), str(tmp_path / "c.key")
    )
    servicer = EchoServicer()
    auth = AuthPolicy(None, allowed_identities={"echo.v1.EchoService/Echo": [ORDERS]})
    async with serve(
        servicer,
        policies=[auth],
        config=SECURE,
        credentials=server_credentials(server_tls),
        client_credentials=channel_credentials(client_tls),
    ) as t:
        try:
            reply = await t.stub(EchoServiceStub).Echo(EchoRequest(text="hi"))
        except (UnauthenticatedError, PermissionDeniedError) as error:
            return servicer, error
    return servicer, reply.text


@pytest.mark.parametrize(
    "names",
    [
        {"dns": [ORDERS]},  # a DNS SAN spelled like the SPIFFE ID
        {"common_name": ORDERS},  # the CN of a certificate without SANs
        {"common_name": ORDERS, "dns": ["client.evil.example"]},  # the CN beside a DNS SAN
        {"uris": [ORDERS, "spiffe://shop.example/ns/prod/sa/evil"]},  # two SPIFFE IDs
    ],
    ids=["dns-san", "common-name-only", "common-name", "two-spiffe-ids"],
)
async def test_spiffe_id_spelled_in_another_name_kind_is_not_an_identity(
    tmp_path: Path, names: dict[str, object]
) -> None:
    """The allowed SPIFFE ID in a DNS SAN, the CN, or beside a second SPIFFE ID is no
    identity: the caller is anonymous and gets UNAUTHENTICATED."""
    servicer, outcome = await _call_as(tmp_path, **names)  # type: ignore[arg-type]
    assert isinstance(outcome, UnauthenticatedError), outcome
    assert servicer.calls == {}


async def test_the_uri_san_is_the_identity(tmp_path: Path) -> None:
    """A certificate whose URI SAN is the allowed SPIFFE ID calls without a token."""
    servicer, outcome = await _call_as(tmp_path, common_name="anything", uris=[ORDERS])
    assert outcome == "hi"
    assert servicer.calls == {"Echo": 1}


async def test_another_spiffe_id_is_permission_denied(tmp_path: Path) -> None:
    """A real URI SAN that is not the allowed one (compared exactly) is PERMISSION_DENIED."""
    servicer, outcome = await _call_as(tmp_path, uris=[ORDERS.upper()])
    assert isinstance(outcome, PermissionDeniedError) and outcome.reason == "IDENTITY_NOT_ALLOWED"
    assert servicer.calls == {}
