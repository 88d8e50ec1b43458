"""The balanced client under instance faults: a slow instance, a fleet that fails."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from framework.config import ServerConfig
from framework.errors import FrameworkError
from framework.policies.faults import FaultInjectionPolicy, FaultRule
from framework.policy import BasePolicy, Call, Exit, Side
from framework.registry.balancer import RoundRobin
from framework.registry.budget import RetryBudget
from framework.registry.channel import BalancedChannel, BalancerConfig, balanced_channel
from framework.registry.outlier import OutlierConfig
from framework.registry.sqlite import SqliteStore
from framework.server import Server
from framework.testing.echo import EchoServicer
from gen.echo.v1.echo_pb2 import EchoRequest
from gen.echo.v1.echo_pb2_grpc import EchoServiceStub
from tests.registry.fleet import (
    ECHO,
    Attempts,
    EchoInstance,
    RegistryNode,
    spawn,
    start_echo,
    start_registry,
    stop_process,
    wait_until,
)


class FailuresByInstance(BasePolicy):
    """Client policy counting attempts in flight and failed ones per instance (each
    instance channel runs it)."""

    sides = frozenset({Side.CLIENT})

    def __init__(self) -> None:
        self.failed: Counter[str] = Counter()
        self.in_flight: Counter[str] = Counter()

    def enter(self, call: Call) -> Exit | None:
        target = call.target
        self.in_flight[target] += 1

        def exit(error: BaseException | None) -> None:
            self.in_flight[target] -= 1
            if error is not None:
                self.failed[target] += 1

        return exit


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[RegistryNode]:
    """A registry without active health checks: only the client's own detection acts."""
    n = await start_registry(SqliteStore(tmp_path / "r.sqlite"))
    yield n
    await n.stop()


async def test_slow_instance_is_ejected_and_returns_after_successful_probes(
    node: RegistryNode, tmp_path: Path
) -> None:
    """An instance whose handler blocks its event loop times out a few calls, is ejected
    (DEADLINE_EXCEEDED counts), gets no attempt while out, keeps its channel, and once
    fast again returns after its health probes pass; calls then flow to it again and
    none of them fails. (Failures are counted per instance: on a loaded machine a call
    to a healthy instance may also outlast its 1 s deadline, which is not what this
    test is about.)"""
    good = [await start_echo(node.address) for _ in range(2)]
    process, slow = await spawn(
        "tests.registry.slow", node.address, "2.0", log=tmp_path / "slow.log"
    )
    attempts = Attempts()
    failures = FailuresByInstance()
    outlier = OutlierConfig(
        consecutive_failures=3,
        ejection_s=2.0,
        return_after_probes=2,
        probe_interval_s=0.05,
        probe_timeout_s=0.5,
    )
    channel = await balanced_channel(
        node.address,
        ECHO,
        policies=[attempts, failures],
        config=BalancerConfig(outlier=outlier),
    )
    await wait_until(lambda: len(channel.endpoints) == 3)
    stub = EchoServiceStub(channel)
    codes: Counter[str] = Counter()
    done = asyncio.Event()

    async def worker() -> None:
        for _ in range(5000):  # bounded; normally stopped by `done` long before
            if done.is_set():
                return
            try:
                await stub.Echo(EchoRequest(text="x"), timeout=1.0)
                codes["OK"] += 1
            except FrameworkError as error:  # counted: the assertions below show them
                codes[error.code().name] += 1

    workers = [asyncio.create_task(worker()) for _ in range(4)]
    assert process.stdin is not None and process.stdout is not None
    try:
        endpoint = channel.endpoints[slow]
        original_channel = endpoint.channel
        await wait_until(lambda: endpoint.outlier.ejected, timeout_s=60)
        failed_by_then, tried = failures.failed[slow], attempts.targets[slow]
        # before the ejection: at most the failures in a row plus the calls in flight
        assert 3 <= failed_by_then <= 3 + len(workers)
        assert set(codes) <= {"OK", "DEADLINE_EXCEEDED"}
        process.stdin.write(b"fast\n")
        await process.stdin.drain()
        assert await process.stdout.readline() == b"ok\n"
        assert attempts.targets[slow] == tried  # nothing sent to it while it was out
        # the attempts in flight when it was ejected end (time out) in their own time
        await wait_until(lambda: failures.in_flight[slow] == 0, timeout_s=60)
        failed_while_slow = failures.failed[slow]
        assert failed_while_slow <= 3 + len(workers)
        await wait_until(lambda: not endpoint.outlier.ejected, timeout_s=60)
        await wait_until(lambda: attempts.targets[slow] >= tried + 20, timeout_s=60)
        assert endpoint.channel is original_channel  # kept open while it was out
        assert failures.failed[slow] == failed_while_slow  # nothing failed there since
    finally:
        done.set()
        await asyncio.gather(*workers, return_exceptions=True)
        await channel.close()
        await stop_process(process)
        await asyncio.gather(*(i.stop(0) for i in good))


async def _failing_instance(registry: str) -> tuple[EchoInstance, FaultInjectionPolicy]:
    """An echo instance whose Echo answers UNAVAILABLE (fault injection; health stays up)."""
    from framework.registry.agent import AgentConfig, RegistrationAgent

    faults = FaultInjectionPolicy(
        [FaultRule("down", method="*/Echo", abort_code=grpc.StatusCode.UNAVAILABLE)]
    )
    servicer = EchoServicer()
    server = Server(
        ServerConfig(name="echo", grace_s=0, reflection=False, insecure_dev=True),
        policies=[faults],
    )
    server.add(servicer)
    agent = RegistrationAgent(registry, ECHO, AgentConfig())
    server.add_hook(agent)
    await server.start()
    return EchoInstance(server, servicer, agent), faults


async def _fail_all(channel: BalancedChannel, calls: int) -> int:
    """Make `calls` Echo calls, 4 at a time; return how many failed UNAVAILABLE."""
    stub = EchoServiceStub(channel)
    failed = 0
    remaining = calls

    async def worker() -> None:
        nonlocal failed, remaining
        while remaining > 0:
            remaining -= 1
            try:
                await stub.Echo(EchoRequest(text="x"), timeout=5)
            except FrameworkError as error:
                assert error.code() is grpc.StatusCode.UNAVAILABLE, error
                failed += 1

    await asyncio.gather(*(worker() for _ in range(4)))
    return failed


async def test_retry_budget_bounds_amplification_when_every_instance_fails(
    node: RegistryNode,
) -> None:
    """Every instance answering UNAVAILABLE: without a budget each call makes 3 attempts
    (3.00x); with the default budget retries stop once half the tokens are spent, so
    attempts stay within calls + max_tokens/2. When the fleet recovers, calls succeed,
    the bucket refills and a failure is retried on another instance again."""
    fleet = [await _failing_instance(node.address) for _ in range(3)]
    no_budget_attempts, budget_attempts = Attempts(), Attempts()
    outlier = OutlierConfig(consecutive_failures=1000)  # isolate the budget from ejection
    unbudgeted = await balanced_channel(
        node.address,
        ECHO,
        policies=[no_budget_attempts],
        config=BalancerConfig(retry_budget=None, outlier=outlier),
    )
    budget = RetryBudget()
    budgeted = await balanced_channel(
        node.address,
        ECHO,
        policies=[budget_attempts],
        config=BalancerConfig(retry_budget=budget, outlier=outlier),
        balancer=RoundRobin(),  # every third first attempt lands on a failing instance
    )
    try:
        await wait_until(lambda: len(unbudgeted.endpoints) == len(budgeted.endpoints) == 3)
        assert await _fail_all(unbudgeted, 100) == 100
        assert sum(no_budget_attempts.targets.values()) == 300  # the 3.00x of issue #13
        assert await _fail_all(budgeted, 200) == 200
        tokens = budgeted.retry_tokens
        assert tokens is not None and tokens.throttled > 0
        assert 200 < sum(budget_attempts.targets.values()) <= 200 + budget.max_tokens / 2

        for _, faults in fleet:  # the fleet recovers
            faults.clear()
        assert await _fail_all(budgeted, 200) == 0
        assert tokens.tokens == budget.max_tokens
        fleet[0][1].set_rules(  # one instance fails again: its calls are retried elsewhere
            [FaultRule("down", method="*/Echo", abort_code=grpc.StatusCode.UNAVAILABLE)]
        )
        retries_before = tokens.retries
        assert await _fail_all(budgeted, 8) == 0  # at most 8 failures: within the budget
        assert tokens.retries > retries_before
    finally:
        await unbudgeted.close()
        await budgeted.close()
        await asyncio.gather(*(i.stop(0) for i, _ in fleet))
