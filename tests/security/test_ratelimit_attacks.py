"""The shared (Redis) rate limiter under a flood: a saturated pool never admits calls, and
limits marked fail_closed refuse when the store is down."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio as redis_asyncio

from framework.errors import ResourceExhaustedError, UnavailableError
from framework.policies.ratelimit import Limit, RateLimitConfig, RateLimitPolicy
from framework.policies.ratelimit_redis import RedisBuckets
from framework.policy import Call, Method
from framework.testing import serve
from framework.testing.echo import EchoServicer
from gen.echo.v1.echo_pb2 import EchoRequest
from gen.echo.v1.echo_pb2_grpc import EchoServiceStub
from gen.framework.v1 import options_pb2

BURST = 10
SLOW = Limit(rate_per_s=0.01, burst=BURST)  # no refill during the test


@pytest.fixture
async def prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix owned by one test; its keys are deleted afterwards."""
    name = f"test-sec-ratelimit-{uuid.uuid4().hex}:"
    yield name
    client = redis_asyncio.Redis.from_url(redis_url)
    keys = [k async for k in client.scan_iter(match=f"{name}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def _one_caller(call: Call) -> str:
    return "mallory"


@pytest.mark.redis
async def test_flood_through_a_small_pool_admits_only_the_burst(
    redis_url: str, prefix: str
) -> None:
    """200 concurrent calls against a burst of 10 through a 4-connection pool: exactly 10
    reach the handler; every other call is RESOURCE_EXHAUSTED RATE_LIMITED."""
    # Timeouts far above any load-induced delay: with from_url's 0.25 s a slow reply on a
    # loaded machine is "Redis down" (admitted by fail_open) and a slow turn is
    # RATE_LIMIT_BUSY, so the counts would depend on the machine. The busy path has its
    # own tests below.
    client = redis_asyncio.Redis.from_url(
        redis_url, max_connections=4, socket_timeout=60.0, socket_connect_timeout=60.0
    )
    buckets = RedisBuckets(client, prefix=prefix, queue_timeout_s=60.0)
    policy = RateLimitPolicy(RateLimitConfig(default=SLOW), backend=buckets, identity=_one_caller)
    servicer = EchoServicer()
    async with serve(servicer, policies=[policy]) as t:
        stub = t.stub(EchoServiceStub)
        results = await asyncio.gather(
            *(stub.Echo(EchoRequest(text="x")) for _ in range(200)), return_exceptions=True
        )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(e, ResourceExhaustedError) for e in errors), errors[:3]
    assert all(e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED for e in errors)  # type: ignore[attr-defined]
    assert {e.reason for e in errors} == {"RATE_LIMITED"}  # type: ignore[attr-defined]
    assert len(results) - len(errors) == servicer.calls.get("Echo", 0) == BURST


@pytest.mark.redis
async def test_exhausted_pool_is_refused_not_admitted(redis_url: str, prefix: str) -> None:
    """With every pool connection held elsewhere, a take is RATE_LIMIT_BUSY (it used to be
    treated as "Redis down" and admitted by fail_open)."""
    client = redis_asyncio.Redis.from_url(redis_url, max_connections=2, socket_timeout=0.5)
    buckets = RedisBuckets(client, prefix=prefix, fail_open=True, queue_timeout_s=0.05)
    buckets._turns = None  # as with a pool shared with other code: only the pool's own limit
    held = [await client.connection_pool.get_connection() for _ in range(2)]
    try:
        with pytest.raises(ResourceExhaustedError) as caught:
            await buckets.take("k", SLOW)
        assert caught.value.reason == "RATE_LIMIT_BUSY"
    finally:
        for connection in held:
            await client.connection_pool.release(connection)
        await buckets.close()


@pytest.mark.redis
async def test_waiting_for_a_turn_is_bounded(redis_url: str, prefix: str) -> None:
    """While the only connection is busy, a second take waits queue_timeout_s, then is refused."""
    buckets = RedisBuckets.from_url(redis_url, prefix=prefix, max_connections=1, timeout_s=0.05)
    turns = buckets._turns
    assert turns is not None
    await turns.acquire()  # another take holds the only turn
    try:
        with pytest.raises(ResourceExhaustedError, match="saturated"):
            await buckets.take("k", SLOW)
    finally:
        turns.release()
    assert await buckets.take("k", SLOW) == 0.0  # free again: served normally
    await buckets.close()


async def test_fail_closed_limit_refuses_when_the_store_is_down() -> None:
    """Redis unreachable: a fail_closed limit answers UNAVAILABLE and the handler never runs;
    an ordinary limit on the same fail-open store admits."""
    down = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    guarded = Limit(rate_per_s=1.0, burst=1, fail_closed=True)
    config = RateLimitConfig(per_method={"*/Echo": guarded}, default=Limit(1.0, 1))
    policy = RateLimitPolicy(
        config, backend=RedisBuckets.from_url(down, timeout_s=0.2), identity=_one_caller
    )
    servicer = EchoServicer()
    async with serve(servicer, policies=[policy]) as t:
        stub = t.stub(EchoServiceStub)
        with pytest.raises(UnavailableError) as caught:
            await stub.Echo(EchoRequest(text="x"))
        assert caught.value.reason == "RATE_LIMIT_STORE_UNAVAILABLE"
        stream = stub.EchoStream(EchoRequest(text="y"))  # default limit: fail-open
        assert [r.text async for r in stream] == ["y#0"]
    assert "Echo" not in servicer.calls
    assert servicer.calls["EchoStream"] == 1


def test_contract_option_marks_a_limit_fail_closed() -> None:
    """rate_limit.fail_closed in the contract reaches the Limit the policy binds."""
    method = Method.resolve("/echo.v1.EchoService/Echo")
    option = options_pb2.MethodPolicy(
        rate_limit=options_pb2.RateLimit(rate_per_s=5, burst=5, fail_closed=True)
    )
    limit = RateLimitConfig().limit_for(dataclasses.replace(method, policy=option))
    assert limit == Limit(5.0, 5, fail_closed=True)
