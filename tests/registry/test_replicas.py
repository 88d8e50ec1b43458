"""Registry replicas on one PostgreSQL schema: one view, one leader, the database's clock."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from pathlib import Path

import asyncpg
import grpc
import pytest

from framework.client import connect
from framework.registry.health_probe import ProbeConfig
from framework.registry.model import Health
from framework.registry.postgres import PostgresStore
from gen.registry.v1 import registry_pb2 as pb
from gen.registry.v1.registry_pb2_grpc import RegistryServiceStub
from tests.registry.fleet import (
    ECHO,
    RegistryNode,
    eventually,
    free_port,
    spawn,
    start_echo,
    start_registry,
    wait_until,
)


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
        seen = await asyncio.wait_for(stream.read(), 60)
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


# A probe timeout far above a loaded machine's stalls: two 1 s timeouts in a row of a
# healthy instance marked it NOT_SERVING, a flap blamed on the replicas. An unreachable
# address still fails at once (connection refused, no wait for ready).
PROBE = ProbeConfig(interval_s=0.05, timeout_s=30.0, unhealthy_after=2, healthy_after=2)


async def _health(node: RegistryNode) -> tuple[int, list[Health]]:
    view = await node.registry.store.view(ECHO)
    return view.revision, [i.health for i in view.instances]


async def test_replicas_that_disagree_about_an_instance_do_not_make_it_flap(
    postgres_dsn: str,
) -> None:
    """Replica B cannot reach the instance A reaches. Only the leader (A) probes, so 20
    probe rounds change nothing; when A stops, B takes the lead and marks the instance
    NOT_SERVING once (one revision), then holds still; the lease stays."""
    schema = f"reg_{uuid.uuid4().hex[:12]}"
    dead = f"127.0.0.1:{free_port()}"
    a = await start_registry(
        PostgresStore(postgres_dsn, schema=schema), probe=PROBE, sweep_interval_s=0.2
    )
    b = await start_registry(
        PostgresStore(postgres_dsn, schema=schema),
        probe=PROBE,
        sweep_interval_s=0.2,
        probe_channel_factory=lambda _address: grpc.aio.insecure_channel(dead),
    )
    instance = await start_echo(a.address, ttl_s=30)
    try:
        assert a.registry.leading and not b.registry.leading
        await eventually(lambda: _is(a, [Health.SERVING]))
        revision, _ = await _health(a)
        rounds = a.registry.prober.rounds
        await wait_until(lambda: a.registry.prober.rounds >= rounds + 20)
        assert await _health(a) == (revision, [Health.SERVING])  # no flapping
        assert b.registry.prober.rounds == 0  # a follower never probes

        await a.stop()
        await wait_until(lambda: b.registry.leading, timeout_s=60)
        await wait_until(lambda: b.registry.prober.rounds >= 20)
        assert await _health(b) == (revision + 1, [Health.NOT_SERVING])
    finally:
        await instance.stop(0)
        await a.stop()
        await b.stop()
        await PostgresStore(postgres_dsn, schema=schema).drop()


async def _is(node: RegistryNode, health: list[Health]) -> bool:
    return (await _health(node))[1] == health


async def test_a_leader_that_loses_its_database_session_hands_over(postgres_dsn: str) -> None:
    """The leader's lock connection is terminated (pg_terminate_backend): the lock goes
    with it, a replica takes the lead within a sweep period, and health checking goes on:
    the instance, once its health service says NOT_SERVING, is marked so."""
    schema = f"reg_{uuid.uuid4().hex[:12]}"
    a = await start_registry(
        PostgresStore(postgres_dsn, schema=schema), probe=PROBE, sweep_interval_s=0.2
    )
    b = await start_registry(
        PostgresStore(postgres_dsn, schema=schema), probe=PROBE, sweep_interval_s=0.2
    )
    instance = await start_echo(a.address, ttl_s=30)
    admin = await asyncpg.connect(postgres_dsn)
    try:
        await eventually(lambda: _is(a, [Health.SERVING]))
        store_a = a.registry.store
        assert isinstance(store_a, PostgresStore) and a.registry.terms == 1
        pid = store_a._lock_conn.get_server_pid()
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        await wait_until(  # a new term: B took the lead, or A took it again
            lambda: b.registry.terms == 1 or a.registry.terms == 2, timeout_s=10
        )
        await wait_until(lambda: a.registry.leading != b.registry.leading, timeout_s=60)
        await instance.server.health.drain()  # grpc.health.v1 now answers NOT_SERVING
        leader = a if a.registry.leading else b
        await eventually(lambda: _is(leader, [Health.NOT_SERVING]), timeout_s=60)
    finally:
        await admin.close()
        await instance.stop(0)
        await a.stop()
        await b.stop()
        await PostgresStore(postgres_dsn, schema=schema).drop()


async def test_leases_follow_the_database_clock_not_a_skewed_replica_clock(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """A leading replica whose wall clock runs an hour ahead (faketime) sweeps by the
    database's clock: a 1 s lease ends on time, a 30 s lease is kept, and it reports the
    lease's remaining time by the database's clock too."""
    if shutil.which("faketime") is None:
        message = "faketime is not installed (apt-get install faketime)"
        if os.environ.get("REQUIRE_SERVICES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    schema = f"reg_{uuid.uuid4().hex[:12]}"
    process, line = await spawn(
        "tests.registry.replica",
        postgres_dsn,
        schema,
        log=tmp_path / "replica.log",
        prefix=("faketime", "-f", "+1h"),
    )
    skewed_address, role = line.split()
    assert role == "leader"
    a = await start_registry(PostgresStore(postgres_dsn, schema=schema))
    channel = connect(skewed_address)
    try:
        assert not a.registry.leading
        await a.registry.register(ECHO, "127.0.0.1:7001", ttl_s=30)
        await a.registry.register(ECHO, "127.0.0.1:7002", ttl_s=1)

        async def short_lease_swept() -> bool:
            view = await a.registry.discover(ECHO, include_unhealthy=True)
            return [i.address for i in view.instances] == ["127.0.0.1:7001"]

        await eventually(short_lease_swept, timeout_s=60)  # the skewed leader swept it
        seen = await RegistryServiceStub(channel).Discover(
            pb.DiscoverRequest(service=ECHO), timeout=60
        )
        [kept] = seen.instances
        assert kept.address == "127.0.0.1:7001" and 0 < kept.lease_remaining_s <= 30
    finally:
        await channel.close()
        assert process.stdin is not None
        process.stdin.close()
        await asyncio.wait_for(process.wait(), 60)
        # bounded: once, under load, this test never ended (a stress run hung here 30 min)
        await asyncio.wait_for(a.stop(), 120)
        await PostgresStore(postgres_dsn, schema=schema).drop()
