"""Self-registration, health-driven eligibility and every call arity through the balancer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from framework.client import connect
from framework.clock import ManualClock
from framework.config import ServerConfig
from framework.errors import FrameworkError
from framework.registry.agent import AgentConfig, RegistrationAgent
from framework.registry.channel import balanced_channel
from framework.registry.health_probe import ProbeConfig
from framework.registry.model import Health
from framework.registry.sqlite import SqliteStore
from framework.server import Server
from framework.testing.echo import EchoServicer
from gen.echo.v1.echo_pb2 import EchoRequest
from gen.echo.v1.echo_pb2_grpc import EchoServiceStub
from tests.registry.fleet import (
    ECHO,
    RegistryNode,
    eventually,
    start_echo,
    start_registry,
    wait_until,
)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[RegistryNode]:
    """A registry with a manual lease clock and health probing every 50 ms."""
    n = await start_registry(
        SqliteStore(tmp_path / "r.sqlite"),
        clock=ManualClock(),
        probe=ProbeConfig(interval_s=0.05, timeout_s=5.0, unhealthy_after=1),
    )
    yield n
    await n.stop()


async def _instances(node: RegistryNode) -> list[str]:
    view = await node.registry.discover(ECHO, include_unhealthy=True)
    return [i.address for i in view.instances]


async def test_agent_registers_on_start_and_deregisters_before_draining(
    node: RegistryNode,
) -> None:
    """The hook registers the bound address; at shutdown it is gone before the drain ends."""
    instance = await start_echo(node.address, version="v7")
    view = await node.registry.discover(ECHO)
    assert [(i.address, i.version) for i in view.instances] == [(instance.address, "v7")]
    seen_during_drain: list[list[str]] = []

    class Probe:
        async def on_draining(self, server: Server) -> None:
            seen_during_drain.append(await _instances(node))

    instance.server.add_hook(Probe())  # runs after the agent's on_draining
    await instance.stop()
    assert seen_during_drain == [[]]


async def test_agent_registers_again_after_its_lease_was_lost(node: RegistryNode) -> None:
    """When the lease expired (registry-side), the next heartbeat registers the instance again."""
    agent_clock = ManualClock()
    servicer = EchoServicer()
    server = Server(ServerConfig(name="echo", grace_s=0, reflection=False, insecure_dev=True))
    server.add(servicer)
    agent = RegistrationAgent(node.address, ECHO, AgentConfig(ttl_s=3), clock=agent_clock)
    server.add_hook(agent)
    await server.start()
    try:
        first = agent.lease_id
        registry_clock = node.registry.clock
        assert isinstance(registry_clock, ManualClock)
        registry_clock.advance(4)
        await node.registry.expire_leases()
        assert await _instances(node) == []
        agent_clock.advance(1)  # heartbeat: NOT_FOUND, so register again
        await wait_until(lambda: bool(agent.lease_id) and agent.lease_id != first)
        assert await _instances(node) == [server.address]
    finally:
        await server.stop()


async def test_instance_failing_its_health_check_is_not_handed_out(
    node: RegistryNode,
) -> None:
    """Checked SERVING first; once its health service says NOT_SERVING it leaves Discover."""
    instance = await start_echo(node.address)
    try:
        await eventually(lambda: _health_is(node, instance.address, Health.SERVING))
        health = instance.server.health
        await health.drain()  # the standard health service now answers NOT_SERVING
        await eventually(lambda: _health_is(node, instance.address, Health.NOT_SERVING))
        assert not (await node.registry.discover(ECHO)).instances
    finally:
        await instance.stop(0)


async def _health_is(node: RegistryNode, address: str, health: Health) -> bool:
    view = await node.registry.discover(ECHO, include_unhealthy=True)
    return [i.health for i in view.instances if i.address == address] == [health]


async def test_every_call_arity_goes_through_the_balanced_channel(node: RegistryNode) -> None:
    """Unary, server-streaming, client-streaming and bidi calls all work via the stub."""
    instance = await start_echo(node.address)
    channel = await balanced_channel(node.address, ECHO)
    try:
        stub = EchoServiceStub(channel)
        assert (await stub.Echo(EchoRequest(text="a"))).text == "a"
        replies = [r.text async for r in stub.EchoStream(EchoRequest(text="s", repeat=3))]
        assert replies == ["s#0", "s#1", "s#2"]

        async def requests() -> AsyncIterator[EchoRequest]:
            for text in ("x", "y"):
                yield EchoRequest(text=text)

        assert (await stub.Collect(requests())).text == "x,y"
        assert [r.text async for r in stub.Chat(requests())] == ["X", "Y"]
    finally:
        await channel.close()
        await instance.stop(0)


async def test_agent_keeps_the_server_accepting_until_clients_had_time_to_move(
    node: RegistryNode,
) -> None:
    """At drain the agent deregisters, then for deregister_wait_s the server still serves
    calls (health NOT_SERVING) before it stops accepting; the stop then completes."""
    instance = await start_echo(node.address, deregister_wait_s=1.0)
    channel = connect(instance.address)
    try:
        stopping = asyncio.create_task(instance.stop())
        await eventually(lambda: _gone(node, instance.address))
        reply = await EchoServiceStub(channel).Echo(EchoRequest(text="late"), timeout=5)
        assert reply.text == "late" and not stopping.done()
        await asyncio.wait_for(stopping, timeout=60)
    finally:
        await channel.close()
        await instance.stop(0)


async def _gone(node: RegistryNode, address: str) -> bool:
    return address not in await _instances(node)


async def test_the_drain_is_held_while_calls_still_arrive_after_deregistering(
    node: RegistryNode,
) -> None:
    """A client that has not moved away (here one that never watches the registry) keeps
    sending calls after the deregistration: every one is served, the drain waits, and
    once the calls stop for deregister_wait_s the stop completes."""
    instance = await start_echo(node.address, deregister_wait_s=2.0, deregister_wait_max_s=120)
    channel = connect(instance.address)
    stub = EchoServiceStub(channel)
    try:
        stopping = asyncio.create_task(instance.stop())
        await eventually(lambda: _gone(node, instance.address))
        for index in range(30):  # each call starts well within the 2 s quiet window
            reply = await stub.Echo(EchoRequest(text=f"late-{index}"), timeout=30)
            assert reply.text == f"late-{index}"
        assert not stopping.done()
        await asyncio.wait_for(stopping, timeout=60)  # the calls stopped: the drain goes on
    finally:
        await channel.close()
        await instance.stop(0)


async def test_the_drain_hold_is_bounded_by_deregister_wait_max(
    node: RegistryNode, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that never stops calling holds the drain for deregister_wait_max_s at most,
    and the agent says why the drain went on."""
    instance = await start_echo(node.address, deregister_wait_s=0.5, deregister_wait_max_s=1.0)
    channel = connect(instance.address)
    stub = EchoServiceStub(channel)
    stopping = asyncio.create_task(instance.stop())

    async def keep_calling() -> None:
        while not stopping.done():
            with contextlib.suppress(FrameworkError):  # refused once the drain went on
                await stub.Echo(EchoRequest(text="x"), timeout=5)

    caller = asyncio.create_task(keep_calling())
    try:
        await asyncio.wait_for(stopping, timeout=60)
        assert "calls still arrive" in caplog.text
    finally:
        await caller
        await channel.close()
        await instance.stop(0)


def test_agent_config_rejects_a_bad_deregister_wait() -> None:
    """A negative deregister_wait_s, or one above deregister_wait_max_s, is refused with a
    message naming the fields."""
    with pytest.raises(ValueError, match="deregister_wait_s"):
        AgentConfig(deregister_wait_s=-1)
    with pytest.raises(ValueError, match="deregister_wait_max_s"):
        AgentConfig(deregister_wait_s=6, deregister_wait_max_s=5)
