"""Deployment strategies: canary and blue/green weights, rolling restart without failures."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from framework.client import connect
from framework.config import ServerConfig
from framework.errors import FrameworkError
from framework.registry.channel import BalancedChannel, BalancerConfig, balanced_channel
from gen.echo.v1.echo_pb2 import EchoRequest
from gen.echo.v1.echo_pb2_grpc import EchoServiceStub
from gen.registry.v1 import registry_pb2 as pb
from gen.registry.v1.registry_pb2_grpc import RegistryServiceStub
from tests.registry.fleet import (
    ECHO,
    Backend,
    EchoInstance,
    RegistryNode,
    start_echo,
    start_registry,
    wait_until,
)


@pytest.fixture
async def node(backend: Backend) -> AsyncIterator[RegistryNode]:
    """A registry on each backend (no health probing: these tests drive changes themselves)."""
    n = await start_registry(backend.make())
    yield n
    await n.stop()


async def _set_weights(node: RegistryNode, weights: dict[str, int]) -> None:
    channel = connect(node.address)
    try:
        await RegistryServiceStub(channel).SetWeights(
            pb.SetWeightsRequest(service=ECHO, version_weights=weights)
        )
    finally:
        await channel.close()


async def _send(channel: BalancedChannel, n: int, concurrency: int = 8) -> None:
    stub = EchoServiceStub(channel)
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await stub.Echo(EchoRequest(text="x"), timeout=5)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def test_canary_weight_sends_ten_percent_then_blue_green_switches(
    node: RegistryNode,
) -> None:
    """v1:90 v2:10 gives v2 10 +- 3% of 2,000 calls; v2:100 moves all, v1:100 moves back."""
    blue = [await start_echo(node.address, version="v1") for _ in range(2)]
    green = await start_echo(node.address, version="v2")
    fleet = [*blue, green]
    channel = await balanced_channel(node.address, ECHO, rng=random.Random(42))
    try:
        await _set_weights(node, {"v1": 90, "v2": 10})
        await wait_until(lambda: len(channel.endpoints) == 3 and bool(channel.pool.version_weights))
        await _send(channel, 2000)
        share = green.calls / 2000
        assert 0.07 <= share <= 0.13, share
        assert abs(blue[0].calls - blue[1].calls) <= 0.1 * 2000

        counts = [i.calls for i in fleet]
        await _set_weights(node, {"v2": 100})
        await wait_until(lambda: channel.pool.version_weights == {"v2": 100})
        await _send(channel, 200)
        assert [i.calls - c for i, c in zip(fleet, counts, strict=True)] == [0, 0, 200]

        counts = [i.calls for i in fleet]
        await _set_weights(node, {"v1": 100})
        await wait_until(lambda: channel.pool.version_weights == {"v1": 100})
        await _send(channel, 200)
        moved = [i.calls - c for i, c in zip(fleet, counts, strict=True)]
        assert moved[2] == 0 and moved[0] + moved[1] == 200
    finally:
        await channel.close()
        await asyncio.gather(*(i.stop(0) for i in fleet))


async def test_rolling_restart_under_load_fails_no_call(node: RegistryNode) -> None:
    """Each of three instances in turn deregisters, drains and is replaced; 0 calls fail with
    the default AgentConfig and no server drain delay at all, even with retries off (the
    agent's deregister_wait_s keeps the server accepting calls until clients have moved
    away; the default drain_delay_s only adds to that)."""
    fleet = [await start_echo(node.address) for _ in range(3)]
    assert fleet[0].server.config.drain_delay_s == 0 < ServerConfig().drain_delay_s
    retired: list[EchoInstance] = []
    channel = await balanced_channel(node.address, ECHO, config=BalancerConfig(max_attempts=1))
    await wait_until(lambda: len(channel.endpoints) == 3)
    stub = EchoServiceStub(channel)
    done = asyncio.Event()
    results = {"ok": 0, "failed": 0}

    async def worker() -> None:
        while not done.is_set():
            try:
                await stub.Echo(EchoRequest(text="x", delay_s=0.002), timeout=5)
                results["ok"] += 1
            except FrameworkError:  # counted: the assertion below reports them
                results["failed"] += 1

    workers = [asyncio.create_task(worker()) for _ in range(6)]
    try:
        for index in range(3):
            old = fleet[index]
            before = results["ok"]
            await wait_until(lambda before=before: results["ok"] >= before + 50)  # type: ignore[misc]
            await old.stop()  # agent deregisters at on_draining, then the server drains
            retired.append(old)
            fleet[index] = await start_echo(node.address)
            await wait_until(lambda: set(channel.endpoints) == {i.address for i in fleet})
        before = results["ok"]
        await wait_until(lambda: results["ok"] >= before + 100)
    finally:
        done.set()
        await asyncio.gather(*workers)
        await channel.close()
        await asyncio.gather(*(i.stop(0) for i in [*fleet, *retired]))
    assert results["failed"] == 0
    assert all(i.calls > 0 for i in fleet), [i.calls for i in fleet]
