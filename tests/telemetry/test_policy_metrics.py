"""Other policies' decisions as metrics, through real gRPC: breaker state, rejections by reason."""

from __future__ import annotations

import asyncio

import pytest

from framework.errors import BulkheadFullError, CircuitOpenError, RateLimitedError, UnavailableError
from framework.policies.breaker import BreakerConfig, CircuitBreakerPolicy
from framework.policies.bulkhead import BulkheadConfig, BulkheadPolicy
from framework.policies.ratelimit import Limit, RateLimitConfig, RateLimitPolicy
from framework.telemetry.prometheus import MetricsEndpoint
from framework.telemetry.sdk import Telemetry, TelemetryConfig
from framework.testing import serve
from framework.testing.echo import EchoServicer
from gen.echo.v1 import echo_pb2, echo_pb2_grpc
from tests.telemetry.test_grpc_tracing import scrape

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def matching(
    samples: Samples, name: str, **labels: str
) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples called `name` whose labels include `labels`."""
    return {
        got: value
        for (sample, got), value in samples.items()
        if sample == name and set(labels.items()) <= set(got)
    }


async def test_breaker_opened_by_grpc_failures_shows_in_metrics(telemetry: Telemetry) -> None:
    """4 UNAVAILABLE answers open the breaker: /metrics shows state open=1, closed=0."""
    assert telemetry.metric_reader is not None
    endpoint = MetricsEndpoint(telemetry.metric_reader, port=0)
    breaker = CircuitBreakerPolicy(
        BreakerConfig(window_size=4, min_calls=4, open_wait_s=60.0),
        on_state_change=telemetry.breaker_listener(),
    )
    async with serve(EchoServicer(), policies=telemetry.policies(), hooks=[endpoint]) as t:
        stub = echo_pb2_grpc.EchoServiceStub(t.connect(policies=[*telemetry.policies(), breaker]))
        fail = echo_pb2.FailRequest(error="UnavailableError", message="down")
        for _ in range(4):
            with pytest.raises(UnavailableError):
                await stub.Fail(fail)
        with pytest.raises(CircuitOpenError):
            await stub.Fail(fail)
        samples = await asyncio.to_thread(scrape, endpoint.url)
    states = matching(samples, "breaker_state")
    by_state = {dict(labels)["state"]: value for labels, value in states.items()}
    assert by_state == {"open": 1.0, "closed": 0.0}
    names = {dict(labels)["breaker"] for labels in states}
    assert names == {f"{t.target}/echo.v1.EchoService/Fail"}
    opened = matching(
        samples,
        "rpc_client_errors_total",
        rpc_method="echo.v1.EchoService/Fail",
        error_type="CIRCUIT_OPEN",
    )
    assert list(opened.values()) == [1.0]


def test_disabled_telemetry_gives_a_listener_that_does_nothing() -> None:
    """With OTEL_SDK_DISABLED the breaker listener exists and records nothing."""
    disabled = Telemetry.build(TelemetryConfig(disabled=True))
    listener = disabled.breaker_listener()
    listener("t", "/a.B/C", "closed", "open")  # must not raise
    assert disabled.rpc_metrics is None


async def test_rate_limit_and_bulkhead_rejections_counted_by_reason(telemetry: Telemetry) -> None:
    """RATE_LIMITED and BULKHEAD_FULL rejections appear in rpc.*.errors by error.type."""
    assert telemetry.metric_reader is not None
    limits = RateLimitPolicy(
        RateLimitConfig(per_method={"echo.v1.EchoService/EchoStream": Limit(0.001, 2)})
    )
    bulkhead = BulkheadPolicy(BulkheadConfig(max_concurrency=1, max_wait_s=0.0))
    release = asyncio.Event()
    gate = EchoServicer(release=release)  # holds Echo calls until released
    endpoint = MetricsEndpoint(telemetry.metric_reader, port=0)
    policies = [*telemetry.policies(), limits, bulkhead]
    async with serve(gate, policies=policies, hooks=[endpoint]) as t:
        stub = echo_pb2_grpc.EchoServiceStub(t.connect(policies=telemetry.policies()))
        request = echo_pb2.EchoRequest(text="x")
        for _ in range(2):
            assert [r.text async for r in stub.EchoStream(request)]
        with pytest.raises(RateLimitedError):
            [r async for r in stub.EchoStream(request)]
        gate.started.clear()  # set again when the held Echo reaches the handler

        async def hold() -> echo_pb2.EchoResponse:
            response: echo_pb2.EchoResponse = await stub.Echo(echo_pb2.EchoRequest(text="hold"))
            return response

        held = asyncio.create_task(hold())
        await asyncio.wait_for(gate.started.wait(), timeout=60)
        with pytest.raises(BulkheadFullError):
            await stub.Echo(request)
        release.set()
        assert (await held).text == "hold"
        samples = await asyncio.to_thread(scrape, endpoint.url)
    for side in ("server", "client"):
        name = f"rpc_{side}_errors_total"
        limited = matching(
            samples, name, rpc_method="echo.v1.EchoService/EchoStream", error_type="RATE_LIMITED"
        )
        full = matching(
            samples, name, rpc_method="echo.v1.EchoService/Echo", error_type="BULKHEAD_FULL"
        )
        assert list(limited.values()) == [1.0], (side, limited)
        assert list(full.values()) == [1.0], (side, full)
        codes = {dict(labels)["rpc_response_status_code"] for labels in [*limited, *full]}
        assert codes == {"RESOURCE_EXHAUSTED"}
