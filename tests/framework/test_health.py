"""Standard grpc.health.v1 health, dependency checks, the report RPC and reflection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from framework.health import Check, HealthMonitor, LoadCheck
from framework.testing import serve
from framework.testing.echo import EchoServicer
from gen.framework.v1 import health_pb2 as report_pb2
from gen.framework.v1 import health_pb2_grpc as report_pb2_grpc
from tests.framework.test_cli import AUTH, _operator_token

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
ECHO = "echo.v1.EchoService"


class Dependency:
    """A fake dependency whose health the test switches; the probe is real code."""

    def __init__(self) -> None:
        self.up = True

    async def ping(self) -> None:
        if not self.up:
            raise ConnectionError("database refused the connection")


async def next_status(stream: AsyncIterator[health_pb2.HealthCheckResponse], want: int) -> int:
    """Read Watch updates until `want` arrives (bounded by the caller's timeout)."""
    async for update in stream:
        if update.status == want:
            return update.status
    raise AssertionError("watch ended before the status arrived")


async def test_every_service_is_serving_once_started() -> None:
    """A standard health client gets SERVING for the process and each service."""
    async with serve(EchoServicer()) as t, grpc.aio.insecure_channel(t.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", ECHO):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == SERVING


async def test_a_failing_required_check_turns_services_not_serving_until_it_recovers() -> None:
    """Watch sees SERVING -> NOT_SERVING -> SERVING as the dependency fails and recovers."""
    db = Dependency()
    check = Check("postgres", db.ping, interval_s=0.02, timeout_s=1.0)
    async with (
        serve(EchoServicer(), policies=[AUTH], health_checks=[check]) as t,
        grpc.aio.insecure_channel(t.target) as channel,
    ):
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=ECHO), timeout=10
        )
        updates = watch.__aiter__()
        assert await asyncio.wait_for(next_status(updates, SERVING), 5) == SERVING
        db.up = False
        assert await asyncio.wait_for(next_status(updates, NOT_SERVING), 5) == NOT_SERVING
        checked = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=ECHO)
        )
        assert checked.status == NOT_SERVING
        report = await report_pb2_grpc.HealthReportServiceStub(channel).GetHealthReport(
            report_pb2.GetHealthReportRequest(),
            metadata=(("authorization", f"Bearer {_operator_token()}"),),  # checks: operators
        )
        db.up = True
        assert await asyncio.wait_for(next_status(updates, SERVING), 5) == SERVING
        watch.cancel()
    (item,) = report.checks
    assert item.name == "postgres" and item.required and not item.healthy
    assert "refused the connection" in item.last_error
    assert item.consecutive_failures >= 1 and item.latency_ms >= 0
    assert item.checked_at.seconds > 0
    statuses = {s.service: s.status for s in report.services}
    assert statuses[ECHO] == "NOT_SERVING"


async def test_advisory_checks_and_checks_for_other_services_do_not_gate() -> None:
    """Only required checks gate, and only the services they name."""
    db = Dependency()
    db.up = False
    monitor = HealthMonitor(
        [
            Check("cache", db.ping, required=False),
            Check("ledger", db.ping, services=("payment.v1.PaymentService",)),
        ]
    )
    await monitor.start([ECHO, "payment.v1.PaymentService"])
    try:
        assert monitor.status(ECHO) == SERVING
        assert monitor.status("payment.v1.PaymentService") == NOT_SERVING
        db.up = True
        await monitor.check_now()
        assert monitor.status("payment.v1.PaymentService") == SERVING
    finally:
        await monitor.close()


async def test_a_hanging_check_counts_as_failing_after_its_timeout() -> None:
    """A probe that never answers fails after timeout_s and says so."""

    async def hang() -> None:
        await asyncio.Event().wait()

    monitor = HealthMonitor([Check("slow", hang, timeout_s=0.05)])
    await monitor.start([ECHO])
    try:
        assert monitor.status(ECHO) == NOT_SERVING
        assert "timed out" in monitor.report().checks[0].last_error
    finally:
        await monitor.close()


async def test_reflection_lists_the_services() -> None:
    """Server reflection answers with every registered service."""
    async with serve(EchoServicer()) as t, grpc.aio.insecure_channel(t.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        responses = [r async for r in stub.ServerReflectionInfo(ask())]
    names = {s.name for s in responses[0].list_services_response.service}
    assert {ECHO, "grpc.health.v1.Health", "framework.v1.HealthReportService"} <= names
    assert "grpc.reflection.v1alpha.ServerReflection" in names


async def test_load_check_fails_above_its_threshold() -> None:
    """LoadCheck reads the real load average; an impossible threshold fails with the value."""
    failing = HealthMonitor([LoadCheck(max_load_per_cpu=-1.0, required=True)])
    await failing.start([ECHO])
    try:
        assert failing.status(ECHO) == NOT_SERVING
        assert "per CPU exceeds" in failing.report().checks[0].last_error
    finally:
        await failing.close()
    passing = HealthMonitor([LoadCheck(max_load_per_cpu=1e9, required=True)])
    await passing.start([ECHO])
    try:
        assert passing.status(ECHO) == SERVING
    finally:
        await passing.close()


async def test_unknown_services_are_not_found() -> None:
    """Check for a service this server does not run answers NOT_FOUND."""
    async with serve(EchoServicer()) as t, grpc.aio.insecure_channel(t.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="nope.v1.Missing")
            )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
