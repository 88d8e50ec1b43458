"""Rate limiting in memory: token bucket maths, bounded memory, and RESOURCE_EXHAUSTED over gRPC."""

from __future__ import annotations

import grpc
import jwt
import pytest

from framework.auth.bearer import BearerToken
from framework.auth.keyset import KeySet, StaticKeys, VerificationKey
from framework.auth.policy import AuthPolicy, JwtConfig, JwtVerifier
from framework.clock import ManualClock
from framework.errors import RETRY_AFTER_KEY, RateLimitedError
from framework.policies.ratelimit import Limit, MemoryBuckets, RateLimitConfig, RateLimitPolicy
from framework.policy import Arity, Call, Method
from framework.testing import serve
from framework.testing.echo import EchoServicer
from gen.echo.v1.echo_pb2 import EchoRequest, FailRequest
from gen.echo.v1.echo_pb2_grpc import EchoServiceStub
from gen.framework.v1 import options_pb2

ECHO = "/echo.v1.EchoService/Echo"


def test_bucket_admits_burst_then_refills_at_rate() -> None:
    """A full bucket admits `burst` calls, then one per 1/rate seconds, with the wait told."""
    clock = ManualClock()
    buckets = MemoryBuckets(clock=clock)
    limit = Limit(rate_per_s=2.0, burst=3)
    assert [buckets.take("k", limit) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("k", limit) == pytest.approx(0.5)
    clock.advance(0.5)
    assert buckets.take("k", limit) == 0.0
    clock.advance(100.0)  # never more than burst
    assert [buckets.take("k", limit) for _ in range(4)][-1] > 0


def test_memory_is_bounded_and_idle_buckets_are_evicted() -> None:
    """Buckets never exceed max_keys, and ones idle until full are forgotten as calls go by."""
    clock = ManualClock()
    buckets = MemoryBuckets(max_keys=3, clock=clock)
    limit = Limit(rate_per_s=1.0, burst=1)
    for i in range(10):
        buckets.take(f"k{i}", limit)
        assert len(buckets) <= 3
    assert buckets.forced_evictions == 7  # evicted while not yet full: counted and logged
    clock.advance(1.0)  # every bucket is full again: keeping them is pointless
    buckets.take("fresh", limit)
    buckets.take("fresh", limit)
    assert len(buckets) == 1


def test_limit_comes_from_contract_then_pattern_then_default() -> None:
    """The method option wins over config patterns, which win over the default."""
    config = RateLimitConfig(
        default=Limit(100.0, 100), per_method={"echo.v1.EchoService/Fail": Limit(5.0, 1)}
    )
    option = options_pb2.MethodPolicy(rate_limit=options_pb2.RateLimit(rate_per_s=7, burst=2))
    contract = Method("/x.v1.S/M", "x.v1.S", "M", Arity.UNARY_UNARY, policy=option)
    assert config.limit_for(contract) == Limit(7.0, 2)
    assert config.limit_for(Method.resolve("/echo.v1.EchoService/Fail")) == Limit(5.0, 1)
    assert config.limit_for(Method.resolve(ECHO)) == Limit(100.0, 100)
    assert RateLimitConfig().limit_for(Method.resolve(ECHO)) is None
    assert RateLimitPolicy().bind(Method.resolve(ECHO)) is None  # unlimited: no per-call cost
    with pytest.raises(ValueError, match="rate_per_s must be > 0"):
        Limit(0.0, 1)


async def test_over_limit_is_resource_exhausted_with_retry_after() -> None:
    """The call past the burst gets RESOURCE_EXHAUSTED, a retry-after entry and RetryInfo."""
    clock = ManualClock()
    policy = RateLimitPolicy(
        RateLimitConfig(per_method={"*/Echo": Limit(rate_per_s=4.0, burst=2)}), clock=clock
    )
    servicer = EchoServicer()
    async with serve(servicer, policies=[policy]) as t:
        stub = t.stub(EchoServiceStub)
        await stub.Echo(EchoRequest(text="1"))
        await stub.Echo(EchoRequest(text="2"))
        with pytest.raises(RateLimitedError) as caught:
            await stub.Echo(EchoRequest(text="3"))
        error = caught.value
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.reason == "RATE_LIMITED"
        assert error.retry_after_s == pytest.approx(0.25)  # rebuilt from google.rpc.RetryInfo
        rpc_error = error.__cause__
        assert isinstance(rpc_error, grpc.aio.AioRpcError)
        assert (RETRY_AFTER_KEY, "0.250") in tuple(rpc_error.trailing_metadata() or ())
        assert servicer.calls["Echo"] == 2
        # Other methods are not limited, and time refills the bucket.
        with pytest.raises(Exception, match="requested"):
            await stub.Fail(FailRequest(error="NotFoundError"))
        clock.advance(0.25)
        assert (await stub.Echo(EchoRequest(text="4"))).text == "4"


async def test_buckets_are_per_identity() -> None:
    """Each caller identity (here a metadata hook) has its own bucket."""

    def tenant(call: Call) -> str:
        value = call.header("x-tenant")
        return str(value) if value else "anonymous"

    clock = ManualClock()
    policy = RateLimitPolicy(RateLimitConfig(default=Limit(1.0, 1)), identity=tenant, clock=clock)
    async with serve(EchoServicer(), policies=[policy]) as t:
        stub = t.stub(EchoServiceStub)
        await stub.Echo(EchoRequest(), metadata=(("x-tenant", "a"),))
        await stub.Echo(EchoRequest(), metadata=(("x-tenant", "b"),))
        with pytest.raises(RateLimitedError):
            await stub.Echo(EchoRequest(), metadata=(("x-tenant", "a"),))


async def test_default_identity_is_the_verified_subject() -> None:
    """Behind AuthPolicy, callers from one host get a bucket per token subject."""
    secret = b"ratelimit-test-secret-ratelimit-test!!"
    keys = KeySet(StaticKeys([VerificationKey.hmac("k1", secret)]))
    auth = AuthPolicy(JwtVerifier(keys, JwtConfig(issuer="test", audience="svc")))

    def token(subject: str) -> str:
        claims = {"sub": subject, "iss": "test", "aud": "svc", "scope": "echo:read", "exp": 2**31}
        return jwt.encode(claims, secret, algorithm="HS256", headers={"kid": "k1"})

    limiter = RateLimitPolicy(RateLimitConfig(default=Limit(1.0, 1)), clock=ManualClock())
    async with serve(EchoServicer(), policies=[auth, limiter]) as t:
        alice = EchoServiceStub(t.connect(policies=[BearerToken(token("alice"))]))
        bob = EchoServiceStub(t.connect(policies=[BearerToken(token("bob"))]))
        await alice.Echo(EchoRequest())
        await bob.Echo(EchoRequest())  # same host, other subject: own bucket
        with pytest.raises(RateLimitedError):
            await alice.Echo(EchoRequest())
