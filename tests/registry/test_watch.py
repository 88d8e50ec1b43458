"""Watch fan-out: only the changed service's watchers wake, one read per change, deltas."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest

from framework.client import connect
from framework.registry.model import Health, Instance, ServiceView
from framework.registry.store import RegistryStore
from framework.registry.wire import delta_to_proto, view_from_delta, view_to_proto
from gen.registry.v1 import registry_pb2 as pb
from gen.registry.v1.registry_pb2_grpc import RegistryServiceStub
from tests.registry.fleet import RegistryNode, start_registry


@pytest.fixture
async def node(store: RegistryStore) -> AsyncIterator[RegistryNode]:
    """A registry on each backend."""
    n = await start_registry(store)
    yield n
    await n.stop()


async def _read(stream: Any) -> pb.ServiceView:
    message = await asyncio.wait_for(stream.read(), 60)
    assert isinstance(message, pb.ServiceView)
    return message


async def test_a_change_wakes_only_its_services_watchers_with_one_read(
    node: RegistryNode,
) -> None:
    """20 watchers of orders and 20 of billing: registering into orders reads the orders
    view once and sends each orders watcher one delta; the billing watchers' next message
    is billing's own change, so nothing was sent to them for orders."""
    channel = connect(node.address)
    stub = RegistryServiceStub(channel)
    try:
        await stub.Register(pb.RegisterRequest(service="orders", address="127.0.0.1:7001"))
        await stub.Register(pb.RegisterRequest(service="billing", address="127.0.0.1:8001"))
        orders = [stub.Watch(pb.WatchRequest(service="orders", deltas=True)) for _ in range(20)]
        billing = [stub.Watch(pb.WatchRequest(service="billing", deltas=True)) for _ in range(20)]
        for stream in orders + billing:
            assert not (await _read(stream)).delta  # the first message is a full view
        reads = node.registry.hub.reads
        assert reads <= 2 + 2  # one per service, plus a change racing a first read at most

        await stub.Register(pb.RegisterRequest(service="orders", address="127.0.0.1:7002"))
        for stream in orders:
            message = await _read(stream)
            assert message.delta and [i.address for i in message.instances] == ["127.0.0.1:7002"]
        assert node.registry.hub.reads == reads + 1  # one read for 20 watchers

        await stub.SetWeights(pb.SetWeightsRequest(service="billing", version_weights={"v1": 1}))
        for stream in billing:
            message = await _read(stream)
            assert message.delta and dict(message.version_weights) == {"v1": 1}
        for stream in orders + billing:
            stream.cancel()
    finally:
        await channel.close()


async def test_deltas_and_full_views_agree_through_every_kind_of_change(
    node: RegistryNode,
) -> None:
    """A watcher with deltas and one without see the same view after each change: add,
    health NOT_SERVING (leaves the healthy view: removed), back, weights, deregister."""
    channel = connect(node.address)
    stub = RegistryServiceStub(channel)
    try:
        full = stub.Watch(pb.WatchRequest(service="orders"))
        delta = stub.Watch(pb.WatchRequest(service="orders", deltas=True))
        held = view_from_proto_strict(await _read(delta))
        assert not held.instances and not (await _read(full)).instances
        lease = await stub.Register(pb.RegisterRequest(service="orders", address="127.0.0.1:7001"))
        await stub.Register(pb.RegisterRequest(service="orders", address="127.0.0.1:7002"))
        store = node.registry.store

        async def changes() -> AsyncIterator[None]:
            yield  # the registrations above (one or two messages)
            await store.set_health(lease.lease_id, Health.NOT_SERVING)
            yield
            await store.set_health(lease.lease_id, Health.SERVING)
            yield
            await stub.SetWeights(pb.SetWeightsRequest(service="orders", version_weights={"v1": 1}))
            yield
            await stub.Deregister(pb.DeregisterRequest(lease_id=lease.lease_id))
            yield

        async for _ in changes():
            expected = await node.registry.discover("orders")
            while True:
                view = await _read(full)
                message = await _read(delta)
                assert message.delta and message.base_revision == held.revision
                held = view_from_delta(held, message, 0.0)
                assert _listing(held) == _listing_proto(view)
                if view.revision == expected.revision:
                    break
            assert [i.address for i in held.instances] == [i.address for i in expected.instances]
        full.cancel()
        delta.cancel()
    finally:
        await channel.close()


def view_from_proto_strict(message: pb.ServiceView) -> ServiceView:
    from framework.registry.wire import view_from_proto

    assert not message.delta
    return view_from_proto(message, 0.0)


def _listing(view: ServiceView) -> list[tuple[object, ...]]:
    return [(i.address, i.version, i.weight, i.health) for i in view.instances] + [
        sorted(view.version_weights.items())
    ]


def _listing_proto(message: pb.ServiceView) -> list[tuple[object, ...]]:
    return [(i.address, i.version, i.weight, Health(int(i.health))) for i in message.instances] + [
        sorted(message.version_weights.items())
    ]


def test_applying_a_delta_always_gives_the_new_view() -> None:
    """500 random pairs of views: base + delta_to_proto(base, new) == new (instances and
    weights); an instance whose lease was only renewed is not in the delta."""
    rng = random.Random(13)

    def instance(n: int) -> Instance:
        return Instance(
            "s",
            f"10.0.0.{n}:5000",
            f"l{n}",
            expires_at=rng.choice([100.0, 200.0]),  # renewals: never a change
            ttl_s=10.0,
            version=rng.choice(["v1", "v2"]),
            weight=rng.choice([0, 100]),
            metadata={"z": rng.choice(["a", "b"])},
            health=rng.choice(list(Health)),
        )

    for round_ in range(500):
        base = ServiceView("s", round_, _sorted(instance(n) for n in rng.sample(range(30), 10)))
        new = ServiceView(
            "s",
            round_ + 1,
            _sorted(instance(n) for n in rng.sample(range(30), 10)),
            {"v1": rng.randrange(1, 5)},
        )
        message = delta_to_proto(base, new, 0.0)
        applied = view_from_delta(base, message, 0.0)
        assert _listing(applied) == _listing(new)
        assert _listing_proto(view_to_proto(applied, 0.0)) == _listing_proto(
            view_to_proto(new, 0.0)
        )
    renewed = ServiceView("s", 2, tuple(i for i in base.instances))
    assert not delta_to_proto(base, renewed, 0.0).instances


def _sorted(instances: Iterable[Instance]) -> tuple[Instance, ...]:
    """By address, as the stores list them."""
    return tuple(sorted(instances, key=lambda i: i.address))
