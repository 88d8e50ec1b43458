"""The registry over gRPC: leases, bad input, watch, expiry, restart."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from framework.client import connect
from framework.clock import ManualClock
from framework.errors import InvalidArgumentError, NotFoundError
from framework.registry.sqlite import SqliteStore
from framework.registry.store import RegistryStore
from gen.registry.v1 import registry_pb2 as pb
from gen.registry.v1.registry_pb2_grpc import RegistryServiceStub
from tests.registry.fleet import RegistryNode, start_registry


@pytest.fixture
async def node(store: RegistryStore) -> AsyncIterator[RegistryNode]:
    """A registry on each backend, with a manual clock for leases."""
    n = await start_registry(store, clock=ManualClock())
    yield n
    await n.stop()


@pytest.fixture
async def stub(node: RegistryNode) -> AsyncIterator[RegistryServiceStub]:
    """A client of that registry."""
    channel = connect(node.address)
    yield RegistryServiceStub(channel)
    await channel.close()


def _register(address: str = "127.0.0.1:7001", **kw: object) -> pb.RegisterRequest:
    return pb.RegisterRequest(service="orders", address=address, version="v1", **kw)  # type: ignore[arg-type]


async def test_register_discover_deregister(stub: RegistryServiceStub) -> None:
    """A registered instance is discoverable with its fields, and gone after Deregister."""
    lease = await stub.Register(_register(zone="z1", weight=7, metadata={"team": "a"}, ttl_s=5))
    assert lease.lease_id and lease.ttl_s == 5
    view = await stub.Discover(pb.DiscoverRequest(service="orders"))
    [inst] = view.instances
    assert (inst.address, inst.version, inst.zone, inst.weight, dict(inst.metadata)) == (
        "127.0.0.1:7001",
        "v1",
        "z1",
        7,
        {"team": "a"},
    )
    assert inst.lease_remaining_s == pytest.approx(5)
    await stub.Deregister(pb.DeregisterRequest(lease_id=lease.lease_id))
    assert not (await stub.Discover(pb.DiscoverRequest(service="orders"))).instances


async def test_weight_defaults_to_100_and_zero_is_allowed(stub: RegistryServiceStub) -> None:
    """Unset weight is 100; an explicit 0 is kept (takes no traffic)."""
    await stub.Register(_register("127.0.0.1:7001"))
    await stub.Register(_register("127.0.0.1:7002", weight=0))
    view = await stub.Discover(pb.DiscoverRequest(service="orders"))
    assert [i.weight for i in view.instances] == [100, 0]


async def test_selector_filters_version_zone_and_metadata(stub: RegistryServiceStub) -> None:
    """Discover returns only instances matching every selector field."""
    await stub.Register(_register("127.0.0.1:7001", zone="a", metadata={"gpu": "1"}))
    await stub.Register(
        pb.RegisterRequest(service="orders", address="127.0.0.1:7002", version="v2", zone="a")
    )
    await stub.Register(_register("127.0.0.1:7003", zone="b"))

    async def found(**selector: object) -> list[str]:
        req = pb.DiscoverRequest(service="orders", selector=pb.Selector(**selector))  # type: ignore[arg-type]
        return [i.address for i in (await stub.Discover(req)).instances]

    assert await found(version="v2") == ["127.0.0.1:7002"]
    assert await found(zone="a") == ["127.0.0.1:7001", "127.0.0.1:7002"]
    assert await found(metadata={"gpu": "1"}) == ["127.0.0.1:7001"]


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.RegisterRequest(service="", address="127.0.0.1:1"), "service"),
        (pb.RegisterRequest(service="orders", address="127.0.0.1"), "address"),
        (pb.RegisterRequest(service="orders", address="host:99999"), "address"),
        (pb.RegisterRequest(service="orders", address="bad host:80"), "address"),
        (pb.RegisterRequest(service="orders", address="127.0.0.1:1", weight=-1), "weight"),
    ],
)
async def test_bad_registration_is_invalid_argument_and_changes_nothing(
    stub: RegistryServiceStub, request_: pb.RegisterRequest, field: str
) -> None:
    """Empty name, malformed address, negative weight: INVALID_ARGUMENT naming the field."""
    await stub.Register(_register())
    before = await stub.ListServices(pb.ListServicesRequest())
    with pytest.raises(InvalidArgumentError) as caught:
        await stub.Register(request_)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field in caught.value.message
    assert [v.field for v in caught.value.violations] == [field]
    assert await stub.ListServices(pb.ListServicesRequest()) == before


async def test_unknown_lease_is_not_found_and_changes_nothing(stub: RegistryServiceStub) -> None:
    """Renew or Deregister of an unknown lease: NOT_FOUND saying to register again."""
    await stub.Register(_register())
    before = await stub.ListServices(pb.ListServicesRequest())
    for call in (
        stub.Renew(pb.RenewRequest(lease_id="nope")),
        stub.Deregister(pb.DeregisterRequest(lease_id="nope")),
    ):
        with pytest.raises(NotFoundError) as caught:
            await call
        assert "register" in caught.value.message and caught.value.reason == "LEASE_NOT_FOUND"
    with pytest.raises(InvalidArgumentError):
        await stub.Renew(pb.RenewRequest(lease_id=""))
    assert await stub.ListServices(pb.ListServicesRequest()) == before


async def test_negative_or_all_zero_version_weights_are_rejected(
    stub: RegistryServiceStub,
) -> None:
    """SetWeights refuses negative weights and weights that send no traffic anywhere."""
    await stub.SetWeights(pb.SetWeightsRequest(service="orders", version_weights={"v1": 100}))
    before = await stub.ListServices(pb.ListServicesRequest())
    for weights in ({"v1": 90, "v2": -10}, {"v1": 0}):
        with pytest.raises(InvalidArgumentError) as caught:
            await stub.SetWeights(pb.SetWeightsRequest(service="orders", version_weights=weights))
        assert "version_weights" in caught.value.message
    with pytest.raises(InvalidArgumentError):
        await stub.Discover(pb.DiscoverRequest(service=""))
    assert await stub.ListServices(pb.ListServicesRequest()) == before


async def test_watch_sends_snapshot_then_each_change_and_resumes(
    stub: RegistryServiceStub,
) -> None:
    """Watch: the current view first, then a view per change; resuming skips what was seen."""
    await stub.Register(_register("127.0.0.1:7001"))
    stream = stub.Watch(pb.WatchRequest(service="orders"))
    first = await asyncio.wait_for(stream.read(), 60)
    assert [i.address for i in first.instances] == ["127.0.0.1:7001"]
    await stub.Register(_register("127.0.0.1:7002"))
    second = await asyncio.wait_for(stream.read(), 60)
    assert [i.address for i in second.instances] == ["127.0.0.1:7001", "127.0.0.1:7002"]
    assert second.revision > first.revision
    stream.cancel()
    resumed = stub.Watch(pb.WatchRequest(service="orders", after_revision=second.revision))
    await stub.SetWeights(pb.SetWeightsRequest(service="orders", version_weights={"v1": 1}))
    third = await asyncio.wait_for(resumed.read(), 60)
    assert third.revision > second.revision and dict(third.version_weights) == {"v1": 1}
    resumed.cancel()


async def test_lease_expires_without_renewal_and_renewal_keeps_it(
    node: RegistryNode, stub: RegistryServiceStub
) -> None:
    """Past its TTL an unrenewed lease is swept; a renewed one stays; late renew is NOT_FOUND."""
    clock = node.registry.clock
    assert isinstance(clock, ManualClock)
    kept = await stub.Register(_register("127.0.0.1:7001", ttl_s=5))
    lost = await stub.Register(_register("127.0.0.1:7002", ttl_s=5))
    clock.advance(3)
    await stub.Renew(pb.RenewRequest(lease_id=kept.lease_id))
    clock.advance(3)  # `lost` is 6s old, `kept` renewed 3s ago
    await node.registry.expire_leases()
    view = await stub.Discover(pb.DiscoverRequest(service="orders"))
    assert [i.address for i in view.instances] == ["127.0.0.1:7001"]
    with pytest.raises(NotFoundError):
        await stub.Renew(pb.RenewRequest(lease_id=lost.lease_id))


async def test_sweeper_expires_leases_as_the_clock_moves(
    node: RegistryNode, stub: RegistryServiceStub
) -> None:
    """The background sweeper removes an expired lease and watchers see it go."""
    clock = node.registry.clock
    assert isinstance(clock, ManualClock)
    await stub.Register(_register(ttl_s=2))
    stream = stub.Watch(pb.WatchRequest(service="orders"))
    assert len((await asyncio.wait_for(stream.read(), 5)).instances) == 1
    clock.advance(3)
    assert len((await asyncio.wait_for(stream.read(), 5)).instances) == 0
    stream.cancel()


@pytest.mark.parametrize("outage_s", [10, 90])
async def test_registry_restart_keeps_registrations_and_extends_their_leases(
    tmp_path: Path, outage_s: float
) -> None:
    """A registry restarted on the same SQLite file after an outage shorter or longer than
    the TTL (30 s) still knows the instance, under the same lease, which now runs a full
    TTL from the restart (nothing was swept at start), and can be renewed."""
    clock = ManualClock()
    path = tmp_path / "registry.sqlite"
    first = await start_registry(SqliteStore(path), clock=clock)
    channel = connect(first.address)
    lease = await RegistryServiceStub(channel).Register(_register(ttl_s=30))
    await channel.close()
    await first.stop()

    clock.advance(outage_s)
    second = await start_registry(SqliteStore(path), clock=clock)
    channel = connect(second.address)
    stub = RegistryServiceStub(channel)
    try:
        view = await stub.Discover(pb.DiscoverRequest(service="orders"))
        assert [i.address for i in view.instances] == ["127.0.0.1:7001"]
        assert view.instances[0].lease_remaining_s == pytest.approx(30)
        await stub.Renew(pb.RenewRequest(lease_id=lease.lease_id))
    finally:
        await channel.close()
        await second.stop()
