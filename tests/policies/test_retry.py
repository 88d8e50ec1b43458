"""Retries compiled to gRPC service config: idempotent methods only, within budget and deadline."""

from __future__ import annotations

import json
import time
from typing import Any

import grpc
import pytest

from framework.clock import ManualClock
from framework.errors import DeadlineExceededError, UnavailableError
from framework.policies.ratelimit import Limit, RateLimitConfig, RateLimitPolicy
from framework.policies.retry import RetryConfig, RetryPolicy, service_config
from framework.policy import BasePolicy, Call, Exit, Side
from framework.testing import serve
from framework.testing.echo import EchoServicer
from gen.echo.v1 import echo_pb2
from gen.echo.v1.echo_pb2_grpc import EchoServiceStub

ECHO_SERVICE = "echo.v1.EchoService"


class FlakyEcho(EchoServicer):
    """Echo and Fail answer UNAVAILABLE for the first `failures` attempts of each call."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.attempts: list[int] = []  # grpc-previous-rpc-attempts seen per attempt

    def _attempt(self, context: Any) -> int:
        previous = dict(context.invocation_metadata() or ()).get("grpc-previous-rpc-attempts")
        attempt = int(previous or 0)
        self.attempts.append(attempt)
        return attempt

    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        if self._attempt(context) < self.failures:
            raise UnavailableError("warming up")
        return echo_pb2.EchoResponse(text=request.text)

    async def Fail(self, request: echo_pb2.FailRequest, context: Any) -> echo_pb2.FailResponse:
        if self._attempt(context) < self.failures:
            raise UnavailableError("warming up")
        return echo_pb2.FailResponse()


def _retry(**kw: Any) -> RetryPolicy:
    base: dict[str, Any] = {
        "services": [ECHO_SERVICE],
        "max_attempts": 4,
        "initial_backoff_s": 0.01,
        "max_backoff_s": 0.02,
    }
    return RetryPolicy(RetryConfig(**{**base, **kw}))


def test_service_config_lists_only_idempotent_methods() -> None:
    """Only methods whose contract says idempotent get a retryPolicy; throttling is the budget."""
    config = service_config(RetryConfig(services=[ECHO_SERVICE], retry_resource_exhausted=True))
    (method_config,) = config["methodConfig"]  # type: ignore[misc]
    assert sorted(n["method"] for n in method_config["name"]) == ["Echo", "EchoStream"]
    policy = method_config["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]
    assert config["retryThrottling"] == {"maxTokens": 10, "tokenRatio": 0.1}
    options = dict(_retry().channel_options())
    assert json.loads(str(options["grpc.service_config"]))["methodConfig"]
    with pytest.raises(ValueError, match="max_attempts must be between 2 and 5"):
        RetryConfig(services=[ECHO_SERVICE], max_attempts=6)
    with pytest.raises(ValueError, match="not in the descriptor pool"):
        service_config(RetryConfig(services=["nope.v1.Missing"]))


async def test_idempotent_method_is_retried_by_the_core() -> None:
    """Echo (idempotent) succeeds on its third attempt; the server saw attempts 0, 1, 2."""
    servicer = FlakyEcho(failures=2)
    async with serve(servicer, client_policies=[_retry()]) as t:
        reply = await t.stub(EchoServiceStub).Echo(echo_pb2.EchoRequest(text="hi"))
    assert reply.text == "hi"
    assert servicer.attempts == [0, 1, 2]


async def test_non_idempotent_method_runs_once() -> None:
    """Fail (not idempotent) is never retried, even on UNAVAILABLE."""
    servicer = FlakyEcho(failures=2)
    async with serve(servicer, client_policies=[_retry()]) as t:
        with pytest.raises(UnavailableError):
            await t.stub(EchoServiceStub).Fail(echo_pb2.FailRequest())
    assert servicer.attempts == [0]


async def test_non_retryable_code_is_not_retried() -> None:
    """A status outside retryableStatusCodes (here INTERNAL) is returned at once."""

    class Broken(FlakyEcho):
        async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
            self._attempt(context)
            raise RuntimeError("bug")

    servicer = Broken(failures=0)
    async with serve(servicer, client_policies=[_retry()]) as t:
        with pytest.raises(grpc.RpcError) as caught:
            await t.stub(EchoServiceStub).Echo(echo_pb2.EchoRequest())
    assert caught.value.code() is grpc.StatusCode.INTERNAL
    assert servicer.attempts == [0]


async def test_retries_stop_when_the_budget_is_spent() -> None:
    """With a budget of 4 tokens, 10 failing calls make 11 attempts, not 40."""
    servicer = FlakyEcho(failures=1000)
    async with serve(servicer, client_policies=[_retry(budget_tokens=4)]) as t:
        stub = t.stub(EchoServiceStub)
        for _ in range(10):
            with pytest.raises(UnavailableError):
                await stub.Echo(echo_pb2.EchoRequest())
    # Tokens start at 4; a retry needs more than 2 left; each failed attempt costs 1.
    assert len(servicer.attempts) == 11
    assert servicer.attempts.count(1) == 1


async def test_retries_never_run_past_the_deadline() -> None:
    """Backoffs far longer than the caller's timeout: the call ends DEADLINE_EXCEEDED at its
    deadline instead of waiting them out."""
    servicer = FlakyEcho(failures=1000)
    policy = _retry(
        max_attempts=5, initial_backoff_s=300.0, max_backoff_s=300.0, backoff_multiplier=1.0
    )
    async with serve(servicer, client_policies=[policy]) as t:
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            await t.stub(EchoServiceStub).Echo(echo_pb2.EchoRequest(), timeout=0.25)
        elapsed = time.monotonic() - started
    # Each jittered backoff is uniform in [0, 300 s]: waiting them out takes minutes, and
    # four of them fitting in 0.25 s (all five attempts made, UNAVAILABLE) has a chance of
    # about 1e-12. Both bounds hold on any machine: the deadline cannot pass early, and
    # 60 s is far below the backoffs' ~600 s.
    assert 0.25 <= elapsed < 60.0
    assert 1 <= len(servicer.attempts) < 5


class AttemptLog(BasePolicy):
    """Server policy recording each attempt's grpc-previous-rpc-attempts value and when it
    arrived; a retry (attempt >= 1) first moves the rate limiter's clock a second on."""

    sides = frozenset({Side.SERVER})

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.attempts: list[int] = []
        self.arrived: list[float] = []

    def enter(self, call: Call) -> Exit | None:
        attempt = int(call.header("grpc-previous-rpc-attempts") or 0)
        self.attempts.append(attempt)
        self.arrived.append(time.monotonic())
        if attempt:
            self.clock.advance(1.0)  # the bucket has a token again
        return None


async def test_rate_limited_retry_waits_for_the_server_pushback() -> None:
    """With RESOURCE_EXHAUSTED retryable, the core waits the retry-after pushback, then succeeds."""
    clock = ManualClock()  # the bucket refills only when the test says so
    log = AttemptLog(clock)
    limiter = RateLimitPolicy(RateLimitConfig(default=Limit(rate_per_s=3.0, burst=1)), clock=clock)
    servicer = EchoServicer()
    policy = _retry(retry_resource_exhausted=True)
    async with serve(servicer, policies=[log, limiter], client_policies=[policy]) as t:
        stub = t.stub(EchoServiceStub)
        await stub.Echo(echo_pb2.EchoRequest(text="first"))
        reply = await stub.Echo(echo_pb2.EchoRequest(text="second"))
    assert reply.text == "second"
    assert log.attempts == [0, 0, 1]  # the second call was limited once, then retried
    # retry_after_s is exactly 1/3 s (the clock stood still): grpc-retry-pushback-ms 333,
    # not the 10 ms backoff. The gap is measured on the server, so client load cannot
    # shorten it; the core never retries before the pushback has passed.
    assert log.arrived[2] - log.arrived[1] >= 0.3
    assert servicer.calls["Echo"] == 2
