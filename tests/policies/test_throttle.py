"""Client adaptive throttling: engages while the backend refuses, releases once it accepts."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import grpc
import pytest

from framework.clock import ManualClock
from framework.errors import FrameworkError, OverloadedError, ThrottledError
from framework.policies.faults import FaultInjectionPolicy, FaultRule
from framework.policies.shedding import LoadSheddingPolicy, SheddingConfig
from framework.policies.throttle import AdaptiveThrottle, AdaptiveThrottlePolicy, ThrottleConfig
from framework.testing import serve
from framework.testing.echo import EchoServicer
from gen.echo.v1.echo_pb2 import EchoRequest
from gen.echo.v1.echo_pb2_grpc import EchoServiceStub


async def _until(predicate: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.002)


def test_probability_follows_the_sre_formula() -> None:
    """The refusal probability is max(0, (requests - K*accepts) / (requests + 1))."""
    clock = ManualClock()
    throttle = AdaptiveThrottle(ThrottleConfig(k=2), clock=clock, rng=lambda: 1.0)
    for _ in range(10):
        throttle.after(True)
    assert throttle.probability == 0.0
    for _ in range(30):
        throttle.after(False)
    # 40 requests, 10 accepts: (40 - 20) / 41
    assert throttle.probability == pytest.approx(20 / 41)


def test_engages_when_refused_and_releases_when_the_window_passes() -> None:
    """A backend refusing everything gets ever fewer calls; once it accepts again and the
    refusals have left the window, every call goes through."""
    clock = ManualClock()
    rng = random.Random(20)
    config = ThrottleConfig(window_s=10, buckets=10)
    throttle = AdaptiveThrottle(config, clock=clock, rng=rng.random)
    sent = refused_locally = 0
    for _ in range(1000):
        try:
            throttle.before()
        except ThrottledError:
            refused_locally += 1
            continue
        sent += 1
        throttle.after(False)  # the backend refuses
        clock.advance(0.005)
    assert refused_locally > 0.9 * 1000
    assert throttle.throttled == refused_locally
    clock.advance(10.0)  # the refusals leave the window
    assert throttle.probability == 0.0
    for _ in range(100):
        throttle.before()  # never raises: nothing refused in the window
        throttle.after(True)
    assert throttle.probability == 0.0


def test_recovers_through_accepted_calls_within_the_window() -> None:
    """While throttled some calls still go out; once they succeed the probability falls to 0
    even before the refusals leave the window."""
    clock = ManualClock()
    rng = random.Random(7)
    throttle = AdaptiveThrottle(ThrottleConfig(window_s=60), clock=clock, rng=rng.random)
    for _ in range(50):
        throttle.after(False)
    assert throttle.probability > 0.9
    let_through = attempts = 0
    while throttle.probability > 0 and attempts < 10_000:
        attempts += 1
        try:
            throttle.before()
        except ThrottledError:
            continue
        let_through += 1
        throttle.after(True)  # the backend has recovered
    # each success pays back one excess request, each local refusal adds one: the
    # probability p falls as 1 - p grows in proportion to the requests, ~2,500 here
    assert throttle.probability == 0.0
    assert attempts < 5_000 and let_through > 1_000


async def test_throttle_engages_against_a_shedding_server_and_releases() -> None:
    """Through real gRPC: while the server sheds, the client refuses most calls itself
    (THROTTLED, never sent); once the server has capacity again, all calls go through."""
    release = asyncio.Event()
    servicer = EchoServicer(release=release)
    shedding = LoadSheddingPolicy(SheddingConfig(initial_limit=2, min_limit=1))
    clock = ManualClock()
    rng = random.Random(3)
    throttle = AdaptiveThrottlePolicy(ThrottleConfig(window_s=10), clock=clock, rng=rng.random)
    async with serve(servicer, policies=[shedding], client_policies=[throttle]) as t:
        stub = t.stub(EchoServiceStub)
        held = [asyncio.ensure_future(stub.Echo(EchoRequest(text=str(i)))) for i in range(2)]
        await _until(lambda: servicer.calls.get("Echo") == 2)
        outcomes: dict[str, int] = {}
        for i in range(60):
            try:
                await stub.Echo(EchoRequest(text=f"x{i}"))
                outcomes["ok"] = outcomes.get("ok", 0) + 1
            except FrameworkError as error:
                outcomes[error.reason] = outcomes.get(error.reason, 0) + 1
                assert isinstance(error, OverloadedError | ThrottledError)
                assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert outcomes.get("ok", 0) == 0
        assert outcomes["THROTTLED"] > outcomes["OVERLOADED"]
        # the server refused exactly the calls that were sent
        assert sum(shedding.shed.values()) == outcomes["OVERLOADED"]
        assert servicer.calls["Echo"] == 2
        release.set()
        await asyncio.gather(*held)
        clock.advance(10.0)
        state = throttle.throttle(t.target)
        assert state.probability == 0.0
        replies = [await stub.Echo(EchoRequest(text=f"y{i}")) for i in range(20)]
        assert len(replies) == 20 and servicer.calls["Echo"] == 22
        assert state.probability == 0.0


async def test_local_and_cancelled_outcomes_are_not_counted() -> None:
    """A call cancelled by its caller, or refused by an inner policy, leaves the counts alone."""
    release = asyncio.Event()
    servicer = EchoServicer(release=release)
    clock = ManualClock()
    faults = FaultInjectionPolicy()
    throttle = AdaptiveThrottlePolicy(clock=clock, rng=lambda: 0.0)
    async with serve(servicer, client_policies=[throttle]) as t:
        stub = t.stub(EchoServiceStub)
        pending = asyncio.ensure_future(stub.Echo(EchoRequest(text="c")))
        await _until(lambda: servicer.calls.get("Echo") == 1)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        state = throttle.throttle(t.target)
        assert (state.requests, state.accepts) == (0, 0)
        release.set()
        assert (await stub.Echo(EchoRequest(text="ok"))).text == "ok"
        assert (state.requests, state.accepts) == (1, 1)
    # a server that refuses with UNAVAILABLE counts as a refusal
    faults.set_rules([FaultRule(name="down", abort_code=grpc.StatusCode.UNAVAILABLE)])
    async with serve(EchoServicer(), policies=[faults], client_policies=[throttle]) as t:
        stub = t.stub(EchoServiceStub)
        with pytest.raises(FrameworkError):
            await stub.Echo(EchoRequest(text="x"))
        state = throttle.throttle(t.target)
        assert (state.requests, state.accepts) == (1, 0)
        with pytest.raises(ThrottledError):  # rng 0: refused whenever requests exceed 2x accepts
            await stub.Echo(EchoRequest(text="x"))


def test_config_is_validated() -> None:
    """K below 1 or OK as a rejection code are refused with the field named."""
    with pytest.raises(ValueError, match="k must be"):
        ThrottleConfig(k=0.5)
    with pytest.raises(ValueError, match="rejection_codes"):
        ThrottleConfig(rejection_codes={grpc.StatusCode.OK})
