"""Circuit breaker: state machine under a ManualClock, and fail-fast through real gRPC."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from framework.clock import ManualClock
from framework.errors import CircuitOpenError, InternalError, NotFoundError, UnavailableError
from framework.policies.breaker import (
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    CircuitBreakerPolicy,
)
from framework.testing import serve
from framework.testing.echo import EchoServicer
from gen.echo.v1.echo_pb2 import FailRequest
from gen.echo.v1.echo_pb2_grpc import EchoServiceStub

Transition = tuple[str, str, BreakerState, BreakerState]


def _breaker(clock: ManualClock, log: list[Transition], **kw: object) -> CircuitBreaker:
    config = BreakerConfig(
        **{"window_size": 4, "min_calls": 4, "open_wait_s": 10.0, "half_open_probes": 2, **kw}  # type: ignore[arg-type]
    )
    return CircuitBreaker(
        config, target="t", method="/m", clock=clock, on_state_change=lambda *a: log.append(a)
    )


def _call(breaker: CircuitBreaker, error: BaseException | None, remote: bool = True) -> None:
    """One call through the breaker; `error` as the client would see it from the wire."""
    if error is not None:
        error.remote = remote  # type: ignore[attr-defined]  # the client marks rebuilt errors
    probe = breaker.before()
    breaker.after(error, breaker._clock.monotonic(), probe)


def test_opens_only_after_min_calls_at_threshold() -> None:
    """Failures below min_calls keep it CLOSED; reaching the rate over the window opens it."""
    clock, log = ManualClock(), []
    breaker = _breaker(clock, log)
    for _ in range(3):
        _call(breaker, UnavailableError("down"))
    assert breaker.state is BreakerState.CLOSED
    _call(breaker, None)  # 3 of 4 failed = 0.75 >= 0.5
    assert breaker.state is BreakerState.OPEN
    assert log == [("t", "/m", BreakerState.CLOSED, BreakerState.OPEN)]


def test_sliding_window_forgets_old_failures() -> None:
    """Old failures leave the count-based window, so successes keep the circuit closed."""
    clock, log = ManualClock(), []
    breaker = _breaker(clock, log, window_size=4, min_calls=4, failure_rate_threshold=0.75)
    _call(breaker, UnavailableError("down"))
    _call(breaker, UnavailableError("down"))
    for _ in range(6):
        _call(breaker, None)
    _call(breaker, UnavailableError("down"))
    _call(breaker, UnavailableError("down"))
    assert breaker.state is BreakerState.CLOSED
    assert breaker.failure_rate == 0.5


def test_client_errors_never_count() -> None:
    """INVALID_ARGUMENT and NOT_FOUND are the caller's fault, not the target's."""
    clock, log = ManualClock(), []
    breaker = _breaker(clock, log)
    for _ in range(8):
        _call(breaker, NotFoundError("no such order"))
    assert breaker.state is BreakerState.CLOSED
    with pytest.raises(ValueError, match="failure_codes must not contain INVALID_ARGUMENT"):
        BreakerConfig(failure_codes={grpc.StatusCode.INVALID_ARGUMENT})


def test_slow_calls_count_as_failures() -> None:
    """A call slower than slow_call_s is a failure even when it succeeded."""
    clock, log = ManualClock(), []
    breaker = _breaker(clock, log, slow_call_s=1.0)
    for _ in range(4):
        probe = breaker.before()
        started = clock.monotonic()
        clock.advance(1.5)
        breaker.after(None, started, probe)
    assert breaker.state is BreakerState.OPEN


def test_half_open_bounds_probes_and_cancelled_probe_frees_its_slot() -> None:
    """HALF_OPEN admits half_open_probes calls; a cancelled probe lets another through."""
    clock, log = ManualClock(), []
    breaker = _breaker(clock, log)
    for _ in range(4):
        _call(breaker, InternalError("boom"))
    with pytest.raises(CircuitOpenError, match=r"retry in 10\.0s"):
        breaker.before()
    clock.advance(10.0)
    assert breaker.before() is True
    assert breaker.before() is True
    assert breaker.state is BreakerState.HALF_OPEN
    with pytest.raises(CircuitOpenError, match="probes are in flight"):
        breaker.before()
    breaker.after(asyncio.CancelledError(), clock.monotonic(), True)
    assert breaker.before() is True


async def test_walks_closed_open_half_open_closed_open_through_grpc() -> None:
    """CLOSED->OPEN->HALF_OPEN->CLOSED->OPEN->HALF_OPEN->OPEN; OPEN calls never reach the server."""
    clock = ManualClock()
    log: list[Transition] = []
    policy = CircuitBreakerPolicy(
        BreakerConfig(window_size=4, min_calls=4, open_wait_s=10.0, half_open_probes=2),
        clock=clock,
        on_state_change=lambda *a: log.append(a),
    )
    servicer = EchoServicer()
    async with serve(servicer, client_policies=[policy]) as t:
        stub = t.stub(EchoServiceStub)
        down = FailRequest(error="UnavailableError", message="dependency down")
        healthy = FailRequest(error="NotFoundError", message="no such thing")  # target answered

        for _ in range(4):
            with pytest.raises(UnavailableError):
                await stub.Fail(down)
        assert log[-1][2:] == (BreakerState.CLOSED, BreakerState.OPEN)
        for _ in range(5):
            with pytest.raises(CircuitOpenError):
                await stub.Fail(healthy)
        assert servicer.calls["Fail"] == 4  # fail-fast: nothing reached the server

        clock.advance(10.0)
        for _ in range(2):
            with pytest.raises(NotFoundError):
                await stub.Fail(healthy)
        assert [s[2:] for s in log[1:]] == [
            (BreakerState.OPEN, BreakerState.HALF_OPEN),
            (BreakerState.HALF_OPEN, BreakerState.CLOSED),
        ]

        for _ in range(4):
            with pytest.raises(UnavailableError):
                await stub.Fail(down)
        clock.advance(10.0)
        with pytest.raises(UnavailableError):
            await stub.Fail(down)  # the probe fails: open again
        with pytest.raises(CircuitOpenError):
            await stub.Fail(healthy)
        assert servicer.calls["Fail"] == 4 + 2 + 4 + 1
        assert [s[3] for s in log[3:]] == [
            BreakerState.OPEN,
            BreakerState.HALF_OPEN,
            BreakerState.OPEN,
        ]
        assert policy.breaker(t.target, "/echo.v1.EchoService/Fail").state is BreakerState.OPEN
        assert policy.breaker(t.target, "/echo.v1.EchoService/Echo").state is BreakerState.CLOSED


def test_a_failing_listener_does_not_change_the_outcome(caplog: pytest.LogCaptureFixture) -> None:
    """A state listener that raises is logged; the breaker still opens and rejects."""

    def broken(*args: object) -> None:
        raise RuntimeError("metrics backend down")

    clock = ManualClock()
    breaker = CircuitBreaker(
        BreakerConfig(window_size=2, min_calls=2), clock=clock, on_state_change=broken
    )
    _call(breaker, UnavailableError("down"))
    _call(breaker, UnavailableError("down"))
    assert breaker.state is BreakerState.OPEN
    assert "listener" in caplog.text
    with pytest.raises(CircuitOpenError):
        breaker.before()


def test_local_rejections_are_not_failures_of_the_target() -> None:
    """An error raised in-process before the call left (remote=False) never opens the circuit."""
    clock, log = ManualClock(), []
    breaker = _breaker(clock, log)
    for _ in range(8):
        _call(breaker, UnavailableError("rejected by a policy further in"), remote=False)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.failure_rate == 0.0
