"""Client-side discovery and per-request balancing against real in-process servers."""

from __future__ import annotations

import asyncio
import random
from asyncio.subprocess import Process
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from framework.client import connect
from framework.clock import ManualClock
from framework.errors import FROM_DEPENDENCY_KEY, FrameworkError, UnavailableError
from framework.policies.error_mapping import DEPENDENCY_FAILED
from framework.registry.balancer import LeastOutstanding, RoundRobin, WeightedRandom
from framework.registry.channel import BalancedChannel, BalancerConfig, balanced_channel
from framework.registry.discovery import DiscoveryConfig
from framework.registry.health_probe import ProbeConfig
from framework.registry.outlier import OutlierConfig
from framework.registry.sqlite import SqliteStore
from framework.testing.echo import EchoServicer
from gen.echo.v1.echo_pb2 import EchoRequest, EchoResponse, FailRequest, FailResponse
from gen.echo.v1.echo_pb2_grpc import EchoServiceStub
from gen.registry.v1 import registry_pb2 as pb
from gen.registry.v1.registry_pb2_grpc import RegistryServiceStub
from tests.registry.fleet import (
    ECHO,
    Attempts,
    Backend,
    EchoInstance,
    RegistryNode,
    eventually,
    spawn,
    sqlite_only,
    start_echo,
    start_registry,
    wait_until,
)


@pytest.fixture
async def node(backend: Backend) -> AsyncIterator[RegistryNode]:
    """A registry on each backend, checking instance health every 50 ms (3 failures: out)."""
    n = await start_registry(
        backend.make(),
        probe=ProbeConfig(interval_s=0.05, timeout_s=5.0, unhealthy_after=3),
    )
    yield n
    await n.stop()


@pytest.fixture
async def fleet(node: RegistryNode) -> AsyncIterator[list[EchoInstance]]:
    """Three self-registered echo instances (v1)."""
    instances = [await start_echo(node.address) for _ in range(3)]
    yield instances
    await asyncio.gather(*(i.stop(grace_s=0) for i in instances))


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
    channel = await _client(node, 3, balancer=RoundRobin())
    try:
        assert await _calls(channel, 300, concurrency=4) == 0
    finally:
        await channel.close()
    assert all(90 <= i.calls <= 110 for i in fleet), [i.calls for i in fleet]


@sqlite_only
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


@sqlite_only
async def test_instance_weight_sets_its_share(node: RegistryNode) -> None:
    """With the weighted balancer, weights 300:100 give about 75%:25% of calls."""
    heavy = await start_echo(node.address, weight=300)
    light = await start_echo(node.address, weight=100)
    channel = await _client(node, 2, balancer=WeightedRandom(), rng=random.Random(3))
    try:
        assert await _calls(channel, 1000, concurrency=4) == 0
    finally:
        await channel.close()
        await asyncio.gather(heavy.stop(0), light.stop(0))
    assert 220 <= light.calls <= 280, light.calls


async def _spawn_killable(registry: str, ttl_s: float, log: Path) -> tuple[Process, str]:
    """An echo instance in its own process, registered with `registry`; returns its address."""
    return await spawn("tests.registry.killable", registry, str(ttl_s), log=log)


async def test_killed_instance_is_dropped_and_no_call_fails(
    node: RegistryNode, tmp_path: Path
) -> None:
    """An instance SIGKILLed under load (no deregistration, no GOAWAY) fails its health check
    and its lease expires; Echo calls are retried elsewhere, none fails, and it gets no more
    traffic once dropped."""
    survivors = [await start_echo(node.address) for _ in range(2)]
    process, victim = await _spawn_killable(node.address, 1.0, tmp_path / "killable.log")
    attempts = Attempts()
    channel = await _client(node, 3, policies=[attempts])
    stub = EchoServiceStub(channel)
    done = asyncio.Event()
    ok, failures = 0, []

    def served_here() -> int:
        return sum(i.calls for i in survivors)

    async def worker() -> None:
        nonlocal ok
        for _ in range(5000):  # bounded; normally stopped by `done` long before
            if done.is_set():
                return
            try:
                await stub.Echo(EchoRequest(text="x"), timeout=5)
                ok += 1
            except FrameworkError as error:  # counted: the assertion below shows them
                failures.append(repr(error))

    workers = [asyncio.create_task(worker()) for _ in range(4)]
    try:
        await wait_until(lambda: ok >= 150 and attempts.targets[victim] >= 20)  # its share
        killed_at, tried_before = ok, attempts.targets[victim]
        process.kill()  # SIGKILL: no deregistration, no GOAWAY, no NOT_SERVING
        await process.wait()
        await wait_until(lambda: victim not in channel.endpoints)  # health check failed
        assert attempts.targets[victim] > tried_before  # calls did hit the dead instance
        await wait_until(lambda: ok >= killed_at + 150)  # load went on meanwhile
        done.set()
        await asyncio.gather(*workers)
        assert failures == []
        # the lease ends too: gone from the registry altogether (TTL 1 s, sweep every 1 s)
        await eventually(lambda: _registered(node, victim), timeout_s=60)
        before, tried = served_here(), attempts.targets[victim]
        assert await _calls(channel, 60, concurrency=4) == 0
        assert served_here() - before == 60
        assert attempts.targets[victim] == tried  # no attempt goes to the victim any more
    finally:
        done.set()
        await asyncio.gather(*workers, return_exceptions=True)
        if process.returncode is None:
            process.kill()
            await process.wait()
        await channel.close()
        await asyncio.gather(*(i.stop(grace_s=0) for i in survivors))


async def _registered(node: RegistryNode, address: str) -> bool:
    """True once `address` is no longer registered at all (healthy or not)."""
    view = await node.registry.discover(ECHO, include_unhealthy=True)
    return address not in {i.address for i in view.instances}


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
        await asyncio.gather(silent.stop(0), live.stop(0))
        await node.stop()


async def test_clients_keep_calling_when_the_registry_is_down(
    node: RegistryNode, fleet: list[EchoInstance]
) -> None:
    """With the registry stopped, the last view keeps serving every known instance."""
    channel = await _client(node, 3, balancer=RoundRobin())
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
        assert dead.outlier.ejected
        assert good.calls == 40
    finally:
        await channel.close()
        await registry_channel.close()
        await good.stop(0)
        await node.stop()


class _Forwarding(EchoServicer):
    """Echo that first calls its own dependency through `channel`."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        super().__init__()
        self.dependency = EchoServiceStub(channel)

    async def Echo(self, request: EchoRequest, context: Any) -> EchoResponse:
        self._count("Echo")
        return await self.dependency.Echo(request, timeout=5)  # type: ignore[no-any-return]

    async def Fail(self, request: FailRequest, context: Any) -> FailResponse:
        self._count("Fail")
        return await self.dependency.Fail(request, timeout=5)  # type: ignore[no-any-return]


async def test_a_dependency_failure_passed_on_does_not_eject_the_instance(
    tmp_path: Path,
) -> None:
    """Both instances answer UNAVAILABLE because their own dependency is down (nothing
    listens on its port): the caller gets the failure, marked as passed on and without
    grpc's text (which names the dependency's address), and neither
    instance is ejected, since each answered. Before, two failures in a row ejected one
    (the most `max_ejection_percent` allows), halving the fleet for a fault not its own.
    An instance's own failure still ejects it (test_outlier_is_ejected_...)."""
    node = await start_registry(SqliteStore(tmp_path / "r.sqlite"))  # no health probing
    dependency = connect("127.0.0.1:1")  # the dependency is down
    fronts = [await start_echo(node.address, servicer=_Forwarding(dependency)) for _ in range(2)]
    config = BalancerConfig(outlier=OutlierConfig(consecutive_failures=2, ejection_s=60))
    channel = await _client(node, 2, config=config, balancer=RoundRobin())
    try:
        stub = EchoServiceStub(channel)
        for _ in range(10):
            with pytest.raises(UnavailableError) as caught:
                await stub.Echo(EchoRequest(text="x"), timeout=5)
            assert caught.value.metadata.get(FROM_DEPENDENCY_KEY) == "true", caught.value
            # grpc's own text names the dependency's address: not passed to the caller
            assert caught.value.message == DEPENDENCY_FAILED[grpc.StatusCode.UNAVAILABLE]
        assert [e.outlier.ejected for e in channel.endpoints.values()] == [False, False]
        assert all(front.calls >= 5 for front in fronts), [f.calls for f in fronts]
    finally:
        await channel.close()
        await dependency.close()
        await asyncio.gather(*(front.stop(0) for front in fronts))
        await node.stop()


async def test_a_dependency_refusal_passed_on_keeps_its_message(tmp_path: Path) -> None:
    """A dependency that answers UNAVAILABLE itself (a framework error with its own
    message): the caller gets that message and reason, marked as passed on, and the
    instance that passed it on stays in the pool."""
    node = await start_registry(SqliteStore(tmp_path / "r.sqlite"))
    dependency = await start_echo(None)  # a real server whose Fail raises what it is told
    dependency_channel = connect(dependency.address)
    front = await start_echo(node.address, servicer=_Forwarding(dependency_channel))
    config = BalancerConfig(outlier=OutlierConfig(consecutive_failures=2, ejection_s=60))
    channel = await _client(node, 1, config=config)
    try:
        stub = EchoServiceStub(channel)
        for _ in range(4):
            with pytest.raises(UnavailableError) as caught:
                await stub.Fail(
                    FailRequest(error="UnavailableError", message="the ledger is down; retry")
                )
            assert caught.value.message == "the ledger is down; retry"
            assert caught.value.metadata.get(FROM_DEPENDENCY_KEY) == "true"
        assert not channel.endpoints[front.address].outlier.ejected
        assert dependency.servicer.calls["Fail"] == 4
    finally:
        await channel.close()
        await dependency_channel.close()
        await asyncio.gather(front.stop(0), dependency.stop(0))
        await node.stop()


async def test_client_follows_a_restarted_registry_and_keeps_its_instances(
    backend: Backend,
) -> None:
    """Registry restarted on the same state and port: no registration lost, the client's
    watch resumes and sees instances registered after the restart."""
    node = await start_registry(backend.make())
    port = node.server.port
    first = await start_echo(node.address)
    channel = await _client(node, 1, discovery_config=DiscoveryConfig(reconnect_max_s=0.2))
    second = None
    try:
        await node.stop()
        await wait_until(lambda: not channel.discovery.connected)
        assert await _calls(channel, 10) == 0  # the last view keeps serving
        node = await start_registry(backend.make(), port=port)
        assert [i.address for i in (await node.registry.discover(ECHO)).instances] == [
            first.address
        ]
        second = await start_echo(node.address)
        await wait_until(lambda: len(channel.endpoints) == 2, timeout_s=60)
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
    channel = await _client(node, 2, config=config, balancer=RoundRobin())
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
