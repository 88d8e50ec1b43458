"""Client-side discovery and per-request balancing against real in-process servers."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from framework.client import connect
from framework.clock import ManualClock
from framework.errors import FrameworkError, UnavailableError
from framework.registry.balancer import LeastOutstanding, OutlierConfig, WeightedRandom
from framework.registry.channel import BalancedChannel, BalancerConfig, balanced_channel
from framework.registry.discovery import DiscoveryConfig
from framework.registry.health_probe import ProbeConfig
from framework.registry.sqlite import SqliteStore
from gen.echo.v1.echo_pb2 import EchoRequest, FailRequest
from gen.echo.v1.echo_pb2_grpc import EchoServiceStub
from gen.registry.v1 import registry_pb2 as pb
from gen.registry.v1.registry_pb2_grpc import RegistryServiceStub
from tests.registry.fleet import (
    ECHO,
    EchoInstance,
    RegistryNode,
    start_echo,
    start_registry,
    wait_until,
)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[RegistryNode]:
    """A registry on a SQLite file, checking instance health every 50 ms (3 failures: out)."""
    n = await start_registry(
        SqliteStore(tmp_path / "r.sqlite"),
        probe=ProbeConfig(interval_s=0.05, timeout_s=5.0, unhealthy_after=3),
    )
    yield n
    await n.stop()


@pytest.fixture
async def fleet(node: RegistryNode) -> AsyncIterator[list[EchoInstance]]:
    """Three self-registered echo instances (v1)."""
    instances = [await start_echo(node.address) for _ in range(3)]
    yield instances
    for instance in instances:
        await instance.stop(grace_s=0)


async def _client(node: RegistryNode, count: int, **kwargs: object) -> BalancedChannel:
    channel = await balanced_channel(node.address, ECHO, **kwargs)  # type: ignore[arg-type]
    await wait_until(lambda: len(channel.endpoints) == count)
    return channel


async def _calls(channel: BalancedChannel, n: int, concurrency: int = 1) -> int:
    """Make `n` Echo calls; return how many failed."""
    stub = EchoServiceStub(channel)
    failed = 0
    remaining = n

    async def worker() -> None:
        nonlocal failed, remaining
        while remaining > 0:
            remaining -= 1
            try:
                await stub.Echo(EchoRequest(text="x"), timeout=5)
            except UnavailableError:
                failed += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return failed


async def test_round_robin_shares_traffic_evenly(
    node: RegistryNode, fleet: list[EchoInstance]
) -> None:
    """Three instances each get a third of 300 calls, within +-10%."""
    channel = await _client(node, 3)
    try:
        assert await _calls(channel, 300, concurrency=4) == 0
    finally:
        await channel.close()
    assert all(90 <= i.calls <= 110 for i in fleet), [i.calls for i in fleet]


@pytest.mark.parametrize("balancer", [LeastOutstanding(), WeightedRandom()])
async def test_other_balancers_use_every_instance(
    node: RegistryNode, fleet: list[EchoInstance], balancer: object
) -> None:
    """Power-of-two-choices and weighted random spread calls over all instances."""
    channel = await _client(node, 3, balancer=balancer, rng=random.Random(7))
    try:
        assert await _calls(channel, 300, concurrency=4) == 0
    finally:
        await channel.close()
    assert all(50 <= i.calls <= 150 for i in fleet), [i.calls for i in fleet]


async def test_instance_weight_sets_its_share(node: RegistryNode) -> None:
    """With the weighted balancer, weights 300:100 give about 75%:25% of calls."""
    heavy = await start_echo(node.address, weight=300)
    light = await start_echo(node.address, weight=100)
    channel = await _client(node, 2, balancer=WeightedRandom(), rng=random.Random(3))
    try:
        assert await _calls(channel, 1000, concurrency=4) == 0
    finally:
        await channel.close()
        await heavy.stop(0)
        await light.stop(0)
    assert 220 <= light.calls <= 280, light.calls


async def test_killed_instance_is_dropped_and_no_call_fails(
    node: RegistryNode, fleet: list[EchoInstance]
) -> None:
    """A server killed without deregistering fails its health check and is dropped; retries
    on other instances mean no call fails meanwhile."""
    channel = await _client(node, 3)
    victim = fleet[0]
    assert victim.agent is not None
    victim.agent.lease_id = ""  # killed: no deregistration when it stops
    load = asyncio.create_task(_calls(channel, 600, concurrency=4))
    await wait_until(lambda: sum(i.calls for i in fleet) >= 100)
    await victim.stop(grace_s=0)
    try:
        await wait_until(lambda: victim.address not in channel.endpoints)
        assert await load == 0
        before = victim.calls
        assert await _calls(channel, 60) == 0
        assert victim.calls == before
    finally:
        await channel.close()


async def test_expired_lease_removes_a_silent_instance(tmp_path: Path) -> None:
    """Without health checks, an instance that stops renewing leaves when its lease ends."""
    clock = ManualClock()
    node = await start_registry(SqliteStore(tmp_path / "r.sqlite"), clock=clock)
    stub_channel = connect(node.address)
    registry = RegistryServiceStub(stub_channel)
    silent = await start_echo(None)
    live = await start_echo(node.address, ttl_s=600)
    await registry.Register(pb.RegisterRequest(service=ECHO, address=silent.address, ttl_s=5))
    channel = await _client(node, 2)
    try:
        clock.advance(6)  # the sweeper wakes; `live` renews on its own (real) clock
        await wait_until(lambda: list(channel.endpoints) == [live.address])
        assert await _calls(channel, 20) == 0
        assert silent.calls == 0 and live.calls == 20
    finally:
        await channel.close()
        await stub_channel.close()
        await silent.stop(0)
        await live.stop(0)
        await node.stop()


async def test_clients_keep_calling_when_the_registry_is_down(
    node: RegistryNode, fleet: list[EchoInstance]
) -> None:
    """With the registry stopped, the last view keeps serving every known instance."""
    channel = await _client(node, 3)
    try:
        await node.stop()
        await wait_until(lambda: not channel.discovery.connected)
        assert await _calls(channel, 90) == 0
        assert all(i.calls == 30 for i in fleet)
    finally:
        await channel.close()


async def test_outlier_is_ejected_after_consecutive_failures(tmp_path: Path) -> None:
    """An instance failing UNAVAILABLE repeatedly is skipped for the ejection period."""
    node = await start_registry(SqliteStore(tmp_path / "r.sqlite"))  # no health probing
    good = await start_echo(node.address)
    registry_channel = connect(node.address)
    await RegistryServiceStub(registry_channel).Register(
        pb.RegisterRequest(service=ECHO, address="127.0.0.1:1")  # nothing listens there
    )
    config = BalancerConfig(outlier=OutlierConfig(consecutive_failures=2, ejection_s=60))
    channel = await _client(node, 2, config=config)
    try:
        assert await _calls(channel, 40) == 0
        dead = channel.endpoints["127.0.0.1:1"]
        assert dead.ejected_until > channel.clock.monotonic()
        assert good.calls == 40
    finally:
        await channel.close()
        await registry_channel.close()
        await good.stop(0)
        await node.stop()


async def test_client_follows_a_restarted_registry_and_keeps_its_instances(
    tmp_path: Path,
) -> None:
    """Registry restarted on the same file and port: no registration lost, the client's
    watch resumes and sees instances registered after the restart."""
    path = tmp_path / "r.sqlite"
    node = await start_registry(SqliteStore(path))
    port = node.server.port
    first = await start_echo(node.address)
    channel = await _client(node, 1, discovery_config=DiscoveryConfig(reconnect_max_s=0.2))
    second = None
    try:
        await node.stop()
        await wait_until(lambda: not channel.discovery.connected)
        assert await _calls(channel, 10) == 0  # the last view keeps serving
        node = await start_registry(SqliteStore(path), port=port)
        assert [i.address for i in (await node.registry.discover(ECHO)).instances] == [
            first.address
        ]
        second = await start_echo(node.address)
        await wait_until(lambda: len(channel.endpoints) == 2, timeout_s=10)
        assert channel.discovery.connected
    finally:
        await channel.close()
        await first.stop(0)
        if second is not None:
            await second.stop(0)
        await node.stop()


async def test_only_idempotent_methods_are_retried_on_another_instance(tmp_path: Path) -> None:
    """Echo (idempotent) survives a dead instance; Fail (not idempotent) is never retried."""
    node = await start_registry(SqliteStore(tmp_path / "r.sqlite"))
    live = await start_echo(node.address)
    registry_channel = connect(node.address)
    await RegistryServiceStub(registry_channel).Register(
        pb.RegisterRequest(service=ECHO, address="127.0.0.1:1")  # nothing listens there
    )
    config = BalancerConfig(outlier=OutlierConfig(consecutive_failures=100))
    channel = await _client(node, 2, config=config)
    try:
        assert await _calls(channel, 10) == 0
        stub = EchoServiceStub(channel)
        outcomes = []
        for _ in range(4):
            with pytest.raises(FrameworkError) as caught:
                await stub.Fail(FailRequest(error="ConflictError"))
            outcomes.append(type(caught.value).__name__)
        assert sorted(outcomes) == ["ConflictError"] * 2 + ["UnavailableError"] * 2
        assert live.servicer.calls["Fail"] == 2
    finally:
        await channel.close()
        await registry_channel.close()
        await live.stop(0)
        await node.stop()
