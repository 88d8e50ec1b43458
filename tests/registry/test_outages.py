"""The registry itself stopped for less and for more than a lease TTL: nothing is lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from framework.clock import ManualClock
from framework.errors import FrameworkError
from framework.registry.channel import BalancedChannel, balanced_channel
from framework.registry.discovery import DiscoveryConfig
from gen.echo.v1.echo_pb2 import EchoRequest
from gen.echo.v1.echo_pb2_grpc import EchoServiceStub
from tests.registry.fleet import (
    ECHO,
    Backend,
    EchoInstance,
    RegistryNode,
    eventually,
    start_echo,
    start_registry,
    wait_until,
)


@dataclass
class Load:
    """Echo calls in a loop through the balanced client, and every view it received."""

    channel: BalancedChannel
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    view_sizes: list[int] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def worker(self) -> None:
        stub = EchoServiceStub(self.channel)
        for _ in range(20000):  # bounded; normally stopped by `done` long before
            if self.done.is_set():
                return
            try:
                await stub.Echo(EchoRequest(text="x", delay_s=0.002), timeout=5)
                self.ok += 1
            except FrameworkError as error:  # counted: the assertions below show them
                self.failures.append(repr(error))


@pytest.fixture
async def load(backend: Backend) -> AsyncIterator[tuple[Backend, list[Load]]]:
    """Filled by each test with its load; stops it at the end."""
    loads: list[Load] = []
    yield backend, loads
    for running in loads:
        running.done.set()
        await running.channel.close()


async def _start_load(
    node: RegistryNode, loads: list[Load]
) -> tuple[Load, list[asyncio.Task[None]]]:
    channel = await balanced_channel(
        node.address, ECHO, discovery_config=DiscoveryConfig(reconnect_max_s=0.2)
    )
    running = Load(channel)
    loads.append(running)
    channel.discovery.subscribe(lambda view: running.view_sizes.append(len(view.instances)))
    await wait_until(lambda: len(channel.endpoints) == 2)
    return running, [asyncio.create_task(running.worker()) for _ in range(4)]


async def _leases(node: RegistryNode) -> dict[str, str]:
    view = await node.registry.discover(ECHO, include_unhealthy=True)
    return {i.address: i.lease_id for i in view.instances}


async def test_outage_shorter_than_the_ttl_loses_no_lease(
    load: tuple[Backend, list[Load]],
) -> None:
    """Registry down 1.5 s, TTL 6 s (real clocks; the database's on PostgreSQL): after the
    restart every instance is still there under the same lease, its agent renews that
    lease, the client never saw an instance leave and no call failed.  (With a 2 s TTL, two
    suites and two CPU burners on 2 cores once kept an agent from reaching the restarted
    registry within the TTL: its lease expired and it registered again, as it should.)"""
    backend, loads = load
    node = await start_registry(backend.make())
    port = node.server.port
    fleet: list[EchoInstance] = [await start_echo(node.address, ttl_s=6) for _ in range(2)]
    running, workers = await _start_load(node, loads)
    try:
        before = await _leases(node)
        await wait_until(lambda: running.ok >= 50)
        await node.stop()
        await asyncio.sleep(1.5)  # the outage itself (shorter than the 6 s TTL)
        node = await start_registry(backend.make(), port=port)
        assert await _leases(node) == before  # nothing swept at the restart
        extended = {
            lease: (await node.registry.store.get(lease)).expires_at  # type: ignore[union-attr]
            for lease in before.values()
        }

        async def renewed_after_restart() -> bool:
            stored = [await node.registry.store.get(lease) for lease in before.values()]
            return all(s is not None and s.expires_at > extended[s.lease_id] for s in stored)

        await eventually(renewed_after_restart, timeout_s=60)  # the agents renewed
        assert [a.agent.lease_id for a in fleet if a.agent] == [before[a.address] for a in fleet]
        calls = running.ok
        await wait_until(lambda: running.ok >= calls + 50)
        sizes = list(running.view_sizes)  # before the teardown removes the instances
    finally:
        running.done.set()
        await asyncio.gather(*workers)
        await asyncio.gather(*(i.stop(0) for i in fleet))
        await node.stop()
    assert running.failures == []
    assert min(sizes) == 2


async def test_outage_longer_than_the_ttl_extends_every_lease_at_restart(
    load: tuple[Backend, list[Load]],
) -> None:
    """Registry down for 10 s of its (manual) clock with 3 s leases: at the restart every
    lease is extended to a full TTL before any sweep, so no instance is removed, clients
    never see NO_INSTANCE, and the agents go on renewing the same leases."""
    backend, loads = load
    clock = ManualClock()
    node = await start_registry(backend.make(), clock=clock)
    port = node.server.port
    fleet = [await start_echo(node.address, ttl_s=3) for _ in range(2)]
    running, workers = await _start_load(node, loads)
    try:
        before = await _leases(node)
        await wait_until(lambda: running.ok >= 50)
        await node.stop()
        clock.advance(10)  # more than three TTLs pass while the registry is down
        node = await start_registry(backend.make(), clock=clock, port=port)
        assert await _leases(node) == before
        view = await node.registry.discover(ECHO)
        now = clock.now().timestamp()
        assert [i.expires_at - now for i in view.instances] == [3.0, 3.0]  # a full TTL
        clock.advance(1)
        await eventually(  # the agents' next heartbeats renew the same leases
            lambda: _renewed_since(node, before, now + 3.0), timeout_s=10
        )
        calls = running.ok
        await wait_until(lambda: running.ok >= calls + 50)
        sizes = list(running.view_sizes)  # before the teardown removes the instances
    finally:
        running.done.set()
        await asyncio.gather(*workers)
        await asyncio.gather(*(i.stop(0) for i in fleet))
        await node.stop()
    assert running.failures == []
    assert min(sizes) == 2


async def _renewed_since(node: RegistryNode, leases: dict[str, str], expiry: float) -> bool:
    stored = [await node.registry.store.get(lease) for lease in leases.values()]
    return all(s is not None and s.expires_at > expiry for s in stored)
