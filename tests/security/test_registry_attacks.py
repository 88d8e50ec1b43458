"""Attacks on the registry through real gRPC: hijack, lease theft, disclosure, SSRF."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from framework.auth.grants import NameGrants
from framework.auth.policy import AuthPolicy, BearerToken
from framework.client import connect
from framework.errors import (
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from framework.registry.registry import Registry, RegistryConfig
from framework.registry.sqlite import SqliteStore
from gen.registry.v1 import registry_pb2 as pb
from gen.registry.v1.registry_pb2_grpc import RegistryServiceStub
from tests.registry.fleet import RegistryNode, start_registry
from tests.security.kit import ISSUER, Issuer

ORDERS = "orders"
VICTIM_ADDRESS = "127.0.0.1:7001"


@pytest.fixture
def issuer() -> Issuer:
    """The identity provider the registry trusts."""
    return Issuer()


@pytest.fixture
async def node(tmp_path: Path, issuer: Issuer) -> AsyncIterator[RegistryNode]:
    """A registry that authenticates; "orders" may register orders, "billing" billing."""
    n = await start_registry(
        SqliteStore(tmp_path / "r.sqlite"), policies=[AuthPolicy(issuer.verifier())]
    )
    yield n
    await n.stop()


class Clients:
    """One stub per caller: the real instance, an attacker with its own grant, an admin."""

    def __init__(self, address: str, issuer: Issuer) -> None:
        register = ("registry:register", "registry:read")
        self._channels = {
            "anonymous": connect(address),
            "victim": connect(address, policies=[BearerToken(issuer.token(ORDERS, register))]),
            "attacker": connect(address, policies=[BearerToken(issuer.token("billing", register))]),
            "admin": connect(
                address,
                policies=[BearerToken(issuer.token("ops", ("registry:admin", *register)))],
            ),
        }

    def __getitem__(self, who: str) -> RegistryServiceStub:
        return RegistryServiceStub(self._channels[who])

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


@pytest.fixture
async def clients(node: RegistryNode, issuer: Issuer) -> AsyncIterator[Clients]:
    """Stubs for the victim, the attacker, an admin and an anonymous caller."""
    c = Clients(node.address, issuer)
    yield c
    await c.close()


async def _addresses(node: RegistryNode) -> list[str]:
    return [i.address for i in (await node.registry.discover(ORDERS)).instances]


async def test_anonymous_caller_can_neither_read_nor_register(
    node: RegistryNode, clients: Clients
) -> None:
    """Without a token, Register and Discover are UNAUTHENTICATED and nothing is stored."""
    with pytest.raises(UnauthenticatedError):
        await clients["anonymous"].Register(
            pb.RegisterRequest(service=ORDERS, address="127.0.0.1:6666")
        )
    with pytest.raises(UnauthenticatedError):
        await clients["anonymous"].Discover(pb.DiscoverRequest(service=ORDERS))
    assert await _addresses(node) == []


async def test_registry_hijack_under_another_service_name_is_refused(
    node: RegistryNode, clients: Clients
) -> None:
    """A register-scoped caller not granted "orders" cannot put its address under it."""
    await clients["victim"].Register(pb.RegisterRequest(service=ORDERS, address=VICTIM_ADDRESS))
    with pytest.raises(PermissionDeniedError) as caught:
        await clients["attacker"].Register(
            pb.RegisterRequest(service=ORDERS, address="127.0.0.1:6666")
        )
    assert caught.value.reason == "SERVICE_NOT_GRANTED"
    assert await _addresses(node) == [VICTIM_ADDRESS]


async def test_lease_theft_renew_and_deregister_are_refused(
    node: RegistryNode, clients: Clients, tmp_path: Path
) -> None:
    """Holding another caller's lease id is not enough to renew or remove its instance."""
    lease = await clients["victim"].Register(
        pb.RegisterRequest(service=ORDERS, address=VICTIM_ADDRESS)
    )
    for attempt in (
        clients["attacker"].Renew(pb.RenewRequest(lease_id=lease.lease_id)),
        clients["attacker"].Deregister(pb.DeregisterRequest(lease_id=lease.lease_id)),
    ):
        with pytest.raises(PermissionDeniedError) as caught:
            await attempt
        assert caught.value.reason == "LEASE_NOT_OWNED"
    assert await _addresses(node) == [VICTIM_ADDRESS]
    await clients["victim"].Renew(pb.RenewRequest(lease_id=lease.lease_id))  # still the owner's


async def test_reregistering_anothers_address_is_refused(tmp_path: Path, issuer: Issuer) -> None:
    """Two callers granted one name: neither can take over the other's address (and lease)."""
    node = await start_registry(
        SqliteStore(tmp_path / "r.sqlite"),
        policies=[AuthPolicy(issuer.verifier())],
        grants=NameGrants(table={"orders-*": [ORDERS]}),
    )
    scopes = ("registry:register",)
    a = connect(node.address, policies=[BearerToken(issuer.token("orders-a", scopes))])
    b = connect(node.address, policies=[BearerToken(issuer.token("orders-b", scopes))])
    try:
        await RegistryServiceStub(a).Register(
            pb.RegisterRequest(service=ORDERS, address=VICTIM_ADDRESS, version="v1")
        )
        with pytest.raises(PermissionDeniedError) as caught:
            await RegistryServiceStub(b).Register(
                pb.RegisterRequest(service=ORDERS, address=VICTIM_ADDRESS, version="evil")
            )
        assert caught.value.reason == "INSTANCE_OWNED_BY_OTHER"
        [kept] = (await node.registry.discover(ORDERS)).instances
        assert (kept.version, kept.owner) == ("v1", f"jwt|{ISSUER}|orders-a")
    finally:
        await a.close()
        await b.close()
        await node.stop()


async def test_admin_may_remove_any_lease(node: RegistryNode, clients: Clients) -> None:
    """A registry:admin caller deregisters an instance it did not register (operators)."""
    lease = await clients["victim"].Register(
        pb.RegisterRequest(service=ORDERS, address=VICTIM_ADDRESS)
    )
    await clients["admin"].Deregister(pb.DeregisterRequest(lease_id=lease.lease_id))
    assert await _addresses(node) == []
    with pytest.raises(NotFoundError):
        await clients["victim"].Renew(pb.RenewRequest(lease_id=lease.lease_id))


async def test_discovery_views_carry_no_lease_ids(node: RegistryNode, clients: Clients) -> None:
    """Discover and Watch show instances without the lease id their owner renews with."""
    lease = await clients["victim"].Register(
        pb.RegisterRequest(service=ORDERS, address=VICTIM_ADDRESS)
    )
    view = await clients["attacker"].Discover(pb.DiscoverRequest(service=ORDERS))
    stream = clients["attacker"].Watch(pb.WatchRequest(service=ORDERS))
    watched = await stream.read()
    stream.cancel()
    for seen in (view, watched):
        assert isinstance(seen, pb.ServiceView)
        assert [i.address for i in seen.instances] == [VICTIM_ADDRESS]
        assert [i.lease_id for i in seen.instances] == [""]
        assert lease.lease_id not in str(seen)


async def test_registry_logs_carry_no_lease_ids(
    node: RegistryNode, clients: Clients, caplog: pytest.LogCaptureFixture
) -> None:
    """Register, a refused renewal, deregister and expiry log no lease id."""
    caplog.set_level(logging.DEBUG)
    lease = await clients["victim"].Register(
        pb.RegisterRequest(service=ORDERS, address=VICTIM_ADDRESS, ttl_s=1)
    )
    with pytest.raises(PermissionDeniedError):
        await clients["attacker"].Renew(pb.RenewRequest(lease_id=lease.lease_id))
    await clients["victim"].Deregister(pb.DeregisterRequest(lease_id=lease.lease_id))
    with pytest.raises(NotFoundError) as caught:
        await clients["victim"].Renew(pb.RenewRequest(lease_id=lease.lease_id))
    assert lease.lease_id not in caught.value.message
    second = await node.registry.register(ORDERS, VICTIM_ADDRESS, ttl_s=1)
    await node.registry.store.renew(second.lease_id, 0.0)  # make it expire now
    assert [i.address for i in await node.registry.expire_leases()] == [VICTIM_ADDRESS]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "registered orders" in logged and "expired" in logged
    assert lease.lease_id not in logged and second.lease_id not in logged


async def test_prober_targets_are_limited_to_the_allowed_networks(
    tmp_path: Path, issuer: Issuer
) -> None:
    """With allowed_networks, a metadata-service or outside address is refused, never probed."""
    registry = Registry(
        SqliteStore(tmp_path / "r.sqlite"), RegistryConfig(allowed_networks=("127.0.0.0/8",))
    )
    await registry.start()
    try:
        for address in ("169.254.169.254:80", "10.1.2.3:22", "internal.example:443"):
            with pytest.raises(InvalidArgumentError):
                await registry.register(ORDERS, address)
        await registry.register(ORDERS, VICTIM_ADDRESS)
        assert [i.address for i in await registry.store.instances()] == [VICTIM_ADDRESS]
    finally:
        await registry.close()


async def test_unknown_lease_status_is_not_found_without_the_id(clients: Clients) -> None:
    """A made-up lease id is NOT_FOUND for its caller, and the answer does not echo it."""
    with pytest.raises(NotFoundError) as caught:
        await clients["attacker"].Renew(pb.RenewRequest(lease_id="guessed-lease-id"))
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    assert "guessed-lease-id" not in caught.value.message
