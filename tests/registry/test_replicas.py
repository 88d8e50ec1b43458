"""Two registry replicas on one PostgreSQL schema share one view."""

from __future__ import annotations

import asyncio
import uuid

from framework.client import connect
from framework.registry.postgres import PostgresStore
from gen.registry.v1 import registry_pb2 as pb
from gen.registry.v1.registry_pb2_grpc import RegistryServiceStub
from tests.registry.fleet import start_registry


async def test_watch_on_one_replica_sees_changes_made_through_the_other(
    postgres_dsn: str,
) -> None:
    """Register, reweigh and deregister through replica A; replica B's watcher sees each."""
    schema = f"reg_{uuid.uuid4().hex[:12]}"
    a = await start_registry(PostgresStore(postgres_dsn, schema=schema))
    b = await start_registry(PostgresStore(postgres_dsn, schema=schema))
    channel_a, channel_b = connect(a.address), connect(b.address)
    try:
        stub_a, stub_b = RegistryServiceStub(channel_a), RegistryServiceStub(channel_b)
        stream = stub_b.Watch(pb.WatchRequest(service="orders"))
        assert not (await asyncio.wait_for(stream.read(), 5)).instances
        lease = await stub_a.Register(
            pb.RegisterRequest(service="orders", address="127.0.0.1:7001")
        )
        seen = await asyncio.wait_for(stream.read(), 5)
        assert [i.address for i in seen.instances] == ["127.0.0.1:7001"]
        await stub_a.SetWeights(pb.SetWeightsRequest(service="orders", version_weights={"v1": 1}))
        assert dict((await asyncio.wait_for(stream.read(), 5)).version_weights) == {"v1": 1}
        await stub_b.Renew(pb.RenewRequest(lease_id=lease.lease_id))  # B knows A's lease
        await stub_a.Deregister(pb.DeregisterRequest(lease_id=lease.lease_id))
        assert not (await asyncio.wait_for(stream.read(), 5)).instances
        stream.cancel()
    finally:
        await channel_a.close()
        await channel_b.close()
        await a.stop()
        await b.stop()
        cleanup = PostgresStore(postgres_dsn, schema=schema)
        await cleanup.drop()


async def test_replica_without_notifications_still_sees_changes_by_polling(
    postgres_dsn: str,
) -> None:
    """With its LISTEN connection gone, a replica's watcher catches up within the poll bound
    (and the replica listens again)."""
    schema = f"reg_{uuid.uuid4().hex[:12]}"
    store_b = PostgresStore(postgres_dsn, schema=schema)
    a = await start_registry(PostgresStore(postgres_dsn, schema=schema))
    b = await start_registry(store_b)
    channel_a, channel_b = connect(a.address), connect(b.address)
    try:
        await store_b._listener.close()  # notifications from A no longer reach B
        stream = RegistryServiceStub(channel_b).Watch(pb.WatchRequest(service="orders"))
        assert not (await asyncio.wait_for(stream.read(), 5)).instances
        await RegistryServiceStub(channel_a).Register(
            pb.RegisterRequest(service="orders", address="127.0.0.1:7001")
        )
        seen = await asyncio.wait_for(stream.read(), 5)  # poll bound: watch_poll_s = 0.5
        assert [i.address for i in seen.instances] == ["127.0.0.1:7001"]
        assert not store_b._listener.is_closed()
        stream.cancel()
    finally:
        await channel_a.close()
        await channel_b.close()
        await a.stop()
        await b.stop()
        await PostgresStore(postgres_dsn, schema=schema).drop()
