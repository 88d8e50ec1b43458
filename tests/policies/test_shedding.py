"""Adaptive load shedding: refuse what the server cannot serve at its best latency."""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from framework.clock import ManualClock
from framework.errors import DETAILS_KEY, DeadlineExceededError, OverloadedError
from framework.policies.shedding import (
    CRITICALITY_KEY,
    Criticality,
    GradientLimit,
    LoadSheddingPolicy,
    SheddingConfig,
)
from framework.policy import Call, Exit, Method, Side
from framework.testing import serve
from framework.testing.echo import EchoServicer
from gen.echo.v1.echo_pb2 import EchoRequest
from gen.echo.v1.echo_pb2_grpc import EchoServiceStub

ECHO = Method.resolve("/echo.v1.EchoService/Echo")


async def _until(predicate: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.002)


def _call(criticality: str | None = None) -> Call:
    metadata = ((CRITICALITY_KEY, criticality),) if criticality else ()
    return Call(ECHO, Side.SERVER, metadata=metadata)


# ------------------------------------------------------------ a simulated server


@dataclass
class _Outcome:
    admitted: int = 0
    refused: int = 0
    latencies: list[float] = field(default_factory=list)
    peak_in_flight: int = 0
    refused_by: dict[str | None, int] = field(default_factory=dict)

    def p99(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[int(0.99 * (len(ordered) - 1))]


def _simulate(
    policy: LoadSheddingPolicy,
    clock: ManualClock,
    *,
    slots: int,
    service_s: float,
    rate_per_s: float,
    duration_s: float,
    criticality: Callable[[int], str | None] = lambda i: None,
) -> _Outcome:
    """A server with `slots` workers of `service_s` each (FIFO queue in front), offered
    `rate_per_s` evenly spaced calls through the policy; time is the manual clock."""
    enter = policy.bind(ECHO)
    assert enter is not None
    outcome = _Outcome()
    events: list[tuple[float, int, str, Exit | None]] = []
    seq = 0
    start = clock.monotonic()
    for i in range(round(duration_s * rate_per_s)):
        events.append((start + i / rate_per_s, seq, "arrive", None))
        seq += 1
    names = {seq: criticality(seq) for seq in range(seq)}
    heapq.heapify(events)
    busy = 0
    queue: list[tuple[float, Exit | None]] = []
    while events:
        at, index, kind, exit_ = heapq.heappop(events)
        clock.advance(max(0.0, at - clock.monotonic()))
        if kind == "arrive":
            name = names[index]
            try:
                exit_ = enter(_call(name))
            except OverloadedError:
                outcome.refused += 1
                outcome.refused_by[name] = outcome.refused_by.get(name, 0) + 1
                continue
            outcome.admitted += 1
            outcome.peak_in_flight = max(outcome.peak_in_flight, policy.in_flight)
            queue.append((at, exit_))
        else:
            busy -= 1
            assert exit_ is not None
            exit_(None)
        while queue and busy < slots:
            arrived, waiting_exit = queue.pop(0)
            busy += 1
            done = clock.monotonic() + service_s
            outcome.latencies.append(done - arrived)
            heapq.heappush(events, (done, seq, "done", waiting_exit))
            seq += 1
    return outcome


def test_below_capacity_everything_is_admitted() -> None:
    """At half the capacity of a simulated server, no call is ever refused."""
    clock = ManualClock()
    policy = LoadSheddingPolicy(clock=clock)
    # 4 workers of 10 ms: 400 calls/s
    outcome = _simulate(policy, clock, slots=4, service_s=0.01, rate_per_s=200, duration_s=20)
    assert outcome.refused == 0
    assert outcome.admitted == 4000
    assert policy.limit >= 20  # never shrank: the load limited every window


def test_overload_is_refused_and_latency_stays_near_the_best() -> None:
    """At 3x capacity the server still completes about its capacity, refuses the rest, and
    the calls it admits wait a few service times, not an ever-growing queue."""
    clock = ManualClock()
    policy = LoadSheddingPolicy(clock=clock)
    outcome = _simulate(policy, clock, slots=4, service_s=0.01, rate_per_s=1200, duration_s=20)
    capacity = 400 * 20
    assert outcome.refused > 0
    assert outcome.admitted >= 0.95 * capacity  # the workers stayed busy
    assert outcome.p99() <= 0.05  # at most ~5 service times, from 10 ms at best
    assert policy.limit < 20
    # it measured its best latency with the queue drained, though it never saw it unqueued
    assert policy.limiter.probes == 1
    assert policy.limiter.baseline_s == pytest.approx(0.01)
    # Without the policy the same run queues every call: the last waits ~13 s.
    unshed = _simulate(
        LoadSheddingPolicy(SheddingConfig(initial_limit=100_000, max_limit=100_000), clock=clock),
        clock,
        slots=4,
        service_s=0.01,
        rate_per_s=1200,
        duration_s=20,
    )
    assert unshed.refused == 0 and unshed.p99() > 10


def test_limit_recovers_once_the_overload_ends() -> None:
    """After an overload, calls at capacity are admitted again without refusals."""
    clock = ManualClock()
    policy = LoadSheddingPolicy(clock=clock)
    _simulate(policy, clock, slots=4, service_s=0.01, rate_per_s=1200, duration_s=10)
    after = _simulate(policy, clock, slots=4, service_s=0.01, rate_per_s=300, duration_s=10)
    # the first windows may still refuse while the limit grows back; the rest admit all
    assert after.refused < 0.05 * 3000
    tail = _simulate(policy, clock, slots=4, service_s=0.01, rate_per_s=300, duration_s=5)
    assert tail.refused == 0


def test_criticality_sheds_sheddable_then_default_then_critical() -> None:
    """With the limit at 10, sheddable calls are refused from 5 in flight, default ones
    from 9, critical ones only at 10."""
    clock = ManualClock()
    policy = LoadSheddingPolicy(SheddingConfig(initial_limit=10), clock=clock)
    enter = policy.bind(ECHO)
    assert enter is not None
    held: list[Exit | None] = []

    def admitted(criticality: str) -> bool:
        try:
            held.append(enter(_call(criticality)))
        except OverloadedError as error:
            assert error.metadata["criticality"] == criticality
            return False
        return True

    order = []
    for _ in range(12):
        for name in ("sheddable", "default", "critical"):
            if admitted(name):
                break
        else:
            break
        order.append((policy.in_flight, name))
    assert [n for _, n in order] == ["sheddable"] * 5 + ["default"] * 4 + ["critical"]
    assert policy.shed[Criticality.SHEDDABLE] == 5 + 1
    assert policy.shed[Criticality.DEFAULT] == 1 + 1
    assert policy.shed[Criticality.CRITICAL] == 1
    for exit_ in held:
        assert exit_ is not None
        exit_(None)
    assert policy.in_flight == 0 and admitted("sheddable")


def test_overload_with_mixed_criticality_refuses_the_least_critical() -> None:
    """At 3x capacity, critical calls (half the capacity) are all but never refused,
    default ones (the other half, and some) are refused less than sheddable ones."""
    clock = ManualClock()
    policy = LoadSheddingPolicy(clock=clock)
    kinds = ("sheddable", "sheddable", "sheddable", "default", "default", "critical")
    outcome = _simulate(
        policy,
        clock,
        slots=4,
        service_s=0.01,
        rate_per_s=1200,
        duration_s=20,
        criticality=lambda i: kinds[i % 6],
    )
    by = outcome.refused_by
    offered = {k: 1200 * 20 * kinds.count(k) // 6 for k in kinds}
    rates = {k: by.get(k, 0) / offered[k] for k in offered}
    assert rates["sheddable"] > rates["default"] > rates["critical"]
    assert rates["sheddable"] > 0.9
    assert rates["critical"] < 0.01
    assert outcome.admitted >= 0.95 * 400 * 20


def test_window_where_load_was_low_never_shrinks_the_limit() -> None:
    """Slow calls while fewer than half the limit are in flight leave the limit alone."""
    limit = GradientLimit(SheddingConfig(initial_limit=20, min_window_samples=1, window_s=1))
    now = 0.0
    for i in range(100):
        assert limit.admit(Criticality.DEFAULT)
        now += 1.0
        limit.release()
        limit.sample(0.01 if i < 50 else 5.0, now)  # latency x500, one call at a time
    assert limit.limit == 20
    assert limit.baseline_s == pytest.approx(0.01)


async def test_refused_over_grpc_with_resource_exhausted_and_retry_info() -> None:
    """Through a real server: calls beyond the limit get RESOURCE_EXHAUSTED OVERLOADED
    with RetryInfo at once, the handler never sees them, and a freed slot admits again."""
    release = asyncio.Event()
    servicer = EchoServicer(release=release)
    policy = LoadSheddingPolicy(SheddingConfig(initial_limit=3, min_limit=1))
    async with serve(servicer, policies=[policy]) as t:
        stub = t.stub(EchoServiceStub)
        held = [asyncio.ensure_future(stub.Echo(EchoRequest(text=str(i)))) for i in range(3)]
        await _until(lambda: servicer.calls.get("Echo") == 3)
        raw = EchoServiceStub(grpc.aio.insecure_channel(t.target))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await raw.Echo(EchoRequest(text="over"), timeout=5)
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        details = dict(caught.value.trailing_metadata() or ())[DETAILS_KEY]
        status = status_pb2.Status.FromString(details)
        infos = {d.type_url.rsplit(".", 1)[-1]: d for d in status.details}
        retry = error_details_pb2.RetryInfo()
        infos["RetryInfo"].Unpack(retry)
        assert retry.retry_delay.ToNanoseconds() == 50_000_000
        with pytest.raises(OverloadedError) as typed:
            await stub.Echo(EchoRequest(text="over"))
        assert typed.value.reason == "OVERLOADED" and typed.value.retry_after_s == 0.05
        assert servicer.calls["Echo"] == 3
        release.set()
        assert [r.text for r in await asyncio.gather(*held)] == ["0", "1", "2"]
        assert (await stub.Echo(EchoRequest(text="again"))).text == "again"
        assert policy.in_flight == 0


async def test_deadline_too_short_is_refused_before_any_work() -> None:
    """Once the best latency is known (5 s), a call with 2.5 s left is refused with
    DEADLINE_EXCEEDED DEADLINE_TOO_SHORT and never reaches the handler."""
    servicer = EchoServicer()
    policy = LoadSheddingPolicy(SheddingConfig(min_window_samples=1, window_s=0.001))
    policy.limiter.sample(5.0, 0.0)
    policy.limiter.sample(5.0, 1.0)
    assert policy.limiter.baseline_s == pytest.approx(5.0)
    async with serve(servicer, policies=[policy]) as t:
        raw = EchoServiceStub(grpc.aio.insecure_channel(t.target))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await raw.Echo(EchoRequest(text="late"), timeout=2.5)
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert "DEADLINE_TOO_SHORT" in str(dict(caught.value.trailing_metadata() or ()))
        assert servicer.calls.get("Echo") is None
        assert policy.too_late == 1
        with pytest.raises(DeadlineExceededError):
            await t.stub(EchoServiceStub).Echo(EchoRequest(text="late"), timeout=2.5)
        assert (await raw.Echo(EchoRequest(text="ok"), timeout=30)).text == "ok"


async def test_health_and_streams_are_never_shed() -> None:
    """At a limit of 1 with it taken, health checks and streaming calls still go through."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    release = asyncio.Event()
    servicer = EchoServicer(release=release)
    policy = LoadSheddingPolicy(SheddingConfig(initial_limit=1, min_limit=1))
    async with serve(servicer, policies=[policy]) as t:
        held = asyncio.ensure_future(t.stub(EchoServiceStub).Echo(EchoRequest(text="held")))
        await _until(lambda: policy.in_flight == 1)
        health = health_pb2_grpc.HealthStub(t.channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stream = t.stub(EchoServiceStub).EchoStream(EchoRequest(text="s", repeat=2))
        assert [m.text async for m in stream] == ["s#0", "s#1"]
        release.set()
        assert (await held).text == "held"


def test_config_is_validated() -> None:
    """Impossible settings are refused with the field named."""
    with pytest.raises(ValueError, match="sheddable_share"):
        SheddingConfig(sheddable_share=0.95, default_share=0.9)
    with pytest.raises(ValueError, match="min_limit"):
        SheddingConfig(min_limit=30, initial_limit=20)
    with pytest.raises(ValueError, match="tolerance"):
        SheddingConfig(tolerance=0.5)
