"""A busy server to scrape: every kind of call, errors, a rate limit, a breaker that opens.

`busy_scrape(naming)` starts a framework server with tracing, metrics, a rate limit
and the `/metrics` endpoint, drives a bounded mix of calls through a client with
tracing, metrics and a circuit breaker (unary, both streaming shapes, typed errors,
rate-limited calls, calls refused by the open breaker), scrapes while calls are in
flight and once more after, and returns the last scrape's text.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
from collections.abc import AsyncIterator

import grpc

from framework.errors import FrameworkError
from framework.policies.breaker import BreakerConfig, CircuitBreakerPolicy
from framework.policies.ratelimit import Limit, RateLimitConfig, RateLimitPolicy
from framework.telemetry.prometheus import MetricsEndpoint
from framework.telemetry.sdk import Telemetry, TelemetryConfig
from framework.testing import serve
from framework.testing.echo import EchoServicer
from gen.echo.v1 import echo_pb2, echo_pb2_grpc

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def fetch(url: str, accept: str | None = None) -> tuple[str, str]:
    """(content type, body) of one scrape."""
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.headers.get("Content-Type", ""), response.read().decode()


async def busy_scrape(naming: str, *, accept: str | None = None, calls: int = 120) -> str:
    """The `/metrics` text of a server that has served a mix of `calls` calls."""
    telemetry = Telemetry.build(
        TelemetryConfig(service_name="busy", traces_exporter="memory", metrics_naming=naming)
    )
    assert telemetry.metric_reader is not None
    endpoint = MetricsEndpoint(telemetry.metric_reader, port=0)
    limits = RateLimitPolicy(
        RateLimitConfig(per_method={"echo.v1.EchoService/Collect": Limit(0.001, 3)})
    )
    breaker = CircuitBreakerPolicy(
        BreakerConfig(window_size=4, min_calls=4, open_wait_s=60.0),
        on_state_change=telemetry.breaker_listener(),
    )
    try:
        async with serve(
            EchoServicer(), policies=[*telemetry.policies(), limits], hooks=[endpoint]
        ) as t:
            stub = echo_pb2_grpc.EchoServiceStub(
                t.connect(policies=[*telemetry.policies(), breaker])
            )
            scrapes = [asyncio.create_task(_load(stub, calls))]
            scrapes += [asyncio.create_task(asyncio.to_thread(fetch, endpoint.url, accept))]
            await asyncio.gather(*scrapes)  # one scrape while calls are in flight
            _, text = await asyncio.to_thread(fetch, endpoint.url, accept)
    finally:
        telemetry.shutdown()
    return text


async def _load(stub: echo_pb2_grpc.EchoServiceStub, calls: int) -> None:
    """A bounded mix: unary OK, typed errors, streams both ways, rate limits, open breaker."""

    async def requests() -> AsyncIterator[echo_pb2.EchoRequest]:
        for text in ("a", "b"):
            yield echo_pb2.EchoRequest(text=text)

    async def one(i: int) -> None:
        kind = i % 6
        with contextlib.suppress(FrameworkError, grpc.RpcError):
            if kind in (0, 1):
                await stub.Echo(echo_pb2.EchoRequest(text=str(i)))
            elif kind == 2:
                await stub.Fail(echo_pb2.FailRequest(error="NotFoundError"))
            elif kind == 3:
                [r async for r in stub.EchoStream(echo_pb2.EchoRequest(text="s", repeat=2))]
            elif kind == 4:
                await stub.Collect(requests())  # rate-limited after the first three
            else:
                await stub.Fail(echo_pb2.FailRequest(error="UnavailableError"))  # opens the breaker

    gate = asyncio.Semaphore(16)

    async def bounded(i: int) -> None:
        async with gate:
            await one(i)

    await asyncio.gather(*(bounded(i) for i in range(calls)))
