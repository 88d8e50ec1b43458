"""Rate limiting shared through Redis: replicas together admit no more than one limit."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis_asyncio

from framework.errors import RateLimitedError, UnavailableError
from framework.policies.ratelimit import Limit, RateLimitConfig, RateLimitPolicy
from framework.policies.ratelimit_redis import RedisBuckets
from framework.policy import Call
from framework.testing import serve
from framework.testing.echo import EchoServicer
from gen.echo.v1.echo_pb2 import EchoRequest
from gen.echo.v1.echo_pb2_grpc import EchoServiceStub


@pytest.fixture
async def prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix owned by one test; its keys are deleted afterwards."""
    name = f"test-ratelimit-{uuid.uuid4().hex}:"
    yield name
    client = redis_asyncio.Redis.from_url(redis_url)
    keys = [k async for k in client.scan_iter(match=f"{name}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def _same_caller(call: Call) -> str:
    return "tenant-1"


async def test_redis_bucket_admits_burst_then_tells_the_wait(redis_url: str, prefix: str) -> None:
    """The Lua script admits `burst` takes, then answers with the time until the next token."""
    buckets = RedisBuckets.from_url(redis_url, prefix=prefix)
    try:
        limit = Limit(rate_per_s=0.01, burst=3)  # one token per 100 s: no refill mid-test
        waits = [await buckets.take("k", limit) for _ in range(4)]
        assert waits[:3] == [0.0, 0.0, 0.0]
        assert 90.0 < waits[3] <= 100.0
        client = redis_asyncio.Redis.from_url(redis_url)
        ttl_ms = await client.pttl(f"{prefix}k")
        await client.aclose()
        assert 0 < ttl_ms <= 301_000  # expires once full again: memory stays bounded
    finally:
        await buckets.close()


async def test_two_replicas_share_one_limit(redis_url: str, prefix: str) -> None:
    """Two servers sharing the Redis limiter together admit at most burst + rate * elapsed."""
    limit = Limit(rate_per_s=2.0, burst=4)
    config = RateLimitConfig(default=limit)
    servicers = [EchoServicer(), EchoServicer()]
    policies = [
        RateLimitPolicy(
            config,
            # a timeout far above any load-induced delay: a timed-out take would be
            # admitted (fail open) without a token and break the bound below
            backend=RedisBuckets.from_url(redis_url, prefix=prefix, timeout_s=60.0),
            identity=_same_caller,
        )
        for _ in servicers
    ]
    async with (
        serve(servicers[0], policies=[policies[0]]) as a,
        serve(servicers[1], policies=[policies[1]]) as b,
    ):
        stubs = [a.stub(EchoServiceStub), b.stub(EchoServiceStub)]
        admitted = limited = 0
        started = time.monotonic()
        for _ in range(8):  # 48 calls, 6 at a time, spread over both replicas
            results = await asyncio.gather(
                *(stub.Echo(EchoRequest(text="x")) for stub in stubs for _ in range(3)),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, RateLimitedError):
                    limited += 1
                elif isinstance(result, BaseException):
                    raise result
                else:
                    admitted += 1
        elapsed = time.monotonic() - started
    # A token bucket admits at most burst + rate * elapsed over any window.
    assert admitted <= limit.burst + limit.rate_per_s * elapsed + 1e-9
    assert admitted >= limit.burst
    assert limited > 0
    assert servicers[0].calls["Echo"] > 0 and servicers[1].calls["Echo"] > 0
    assert sum(s.calls["Echo"] for s in servicers) == admitted


async def test_unreachable_redis_fails_open_or_closed_as_configured() -> None:
    """With Redis down, fail_open admits the call; fail_open=False answers UNAVAILABLE."""
    limit = Limit(rate_per_s=1.0, burst=1)
    down = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    lenient = RedisBuckets.from_url(down, timeout_s=0.2)
    strict = RedisBuckets.from_url(down, timeout_s=0.2, fail_open=False)
    try:
        assert await lenient.take("k", limit) == 0.0
        with pytest.raises(UnavailableError, match="does not answer"):
            await strict.take("k", limit)
    finally:
        await lenient.close()
        await strict.close()
