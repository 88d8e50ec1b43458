"""Fault injection: off by default, deterministic percentages, header match, delay, admin RPC."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

import grpc
import jwt
import pytest

from framework.auth.bearer import BearerToken
from framework.auth.keyset import KeySet, StaticKeys, VerificationKey
from framework.auth.policy import AuthPolicy, JwtConfig, JwtVerifier
from framework.clock import ManualClock
from framework.errors import (
    InvalidArgumentError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
)
from framework.policies.faults import FaultInjectionPolicy, FaultInjectionServicer, FaultRule
from framework.policy import Method
from framework.testing import serve
from framework.testing.echo import EchoServicer
from gen.echo.v1.echo_pb2 import EchoRequest, FailRequest
from gen.echo.v1.echo_pb2_grpc import EchoServiceStub
from gen.framework.v1 import faults_pb2
from gen.framework.v1.faults_pb2_grpc import FaultInjectionServiceStub


def _draws(*values: float) -> itertools.cycle[float]:
    return itertools.cycle(values)


async def test_off_by_default() -> None:
    """A policy with no rules lets every call through untouched."""
    servicer = EchoServicer()
    async with serve(servicer, policies=[FaultInjectionPolicy()]) as t:
        stub = t.stub(EchoServiceStub)
        for i in range(5):
            assert (await stub.Echo(EchoRequest(text=str(i)))).text == str(i)
    assert servicer.calls["Echo"] == 5


async def test_aborts_the_chosen_share_of_matching_calls() -> None:
    """percent=50 with draws .1 .6 .3 .9 aborts calls 1 and 3 with the chosen status."""
    draws = _draws(0.1, 0.6, 0.3, 0.9)
    rule = FaultRule(
        "flaky-echo", method="*/Echo", percent=50.0, abort_code=grpc.StatusCode.UNAVAILABLE
    )
    policy = FaultInjectionPolicy([rule], random_source=lambda: next(draws))
    servicer = EchoServicer()
    async with serve(servicer, policies=[policy]) as t:
        stub = t.stub(EchoServiceStub)
        outcomes = []
        for _ in range(4):
            try:
                await stub.Echo(EchoRequest(text="x"))
                outcomes.append("ok")
            except UnavailableError as error:
                assert error.reason == "FAULT_INJECTED"
                assert error.metadata == {"rule": "flaky-echo"}
                outcomes.append("aborted")
        assert outcomes == ["aborted", "ok", "aborted", "ok"]
        with pytest.raises(InvalidArgumentError):  # other methods are not matched
            await stub.Fail(FailRequest(error="InvalidArgumentError"))
    assert servicer.calls["Echo"] == 2


async def test_header_selects_the_calls() -> None:
    """A rule with a header applies only to calls that carry it with the given value."""
    rule = FaultRule(
        "chaos-header",
        header="x-chaos",
        header_value="on",
        abort_code=grpc.StatusCode.RESOURCE_EXHAUSTED,
        abort_message="injected overload",
    )
    async with serve(EchoServicer(), policies=[FaultInjectionPolicy([rule])]) as t:
        stub = t.stub(EchoServiceStub)
        assert (await stub.Echo(EchoRequest(text="a"))).text == "a"
        assert (await stub.Echo(EchoRequest(text="b"), metadata=(("x-chaos", "off"),))).text == "b"
        with pytest.raises(ResourceExhaustedError, match="injected overload"):
            await stub.Echo(EchoRequest(), metadata=(("x-chaos", "on"),))


class SleepLog(ManualClock):
    """A manual clock that records each requested sleep and says when one has begun."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeps: list[float] = []
        self.sleeping = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.sleeping.set()
        await super().sleep(seconds)


async def test_delay_is_injected_before_the_handler() -> None:
    """A delay rule holds the call for delay_s of the policy's clock; the handler runs after."""
    clock = SleepLog()
    rule = FaultRule("slow", method="echo.v1.EchoService/Echo", delay_s=0.1)
    servicer = EchoServicer()
    async with serve(servicer, policies=[FaultInjectionPolicy([rule], clock=clock)]) as t:
        stub = t.stub(EchoServiceStub)
        call = asyncio.ensure_future(stub.Echo(EchoRequest(text="late"), timeout=120.0))
        await asyncio.wait_for(clock.sleeping.wait(), timeout=60.0)
        assert clock.sleeps == [0.1]
        assert servicer.calls == {}  # held: the handler has not run
        clock.advance(0.1)
        reply = await call
    assert reply.text == "late"
    assert servicer.calls == {"Echo": 1}


async def test_delay_never_outlasts_the_deadline() -> None:
    """A delay longer than the call's remaining time is cut to that time (never past it)."""
    clock = SleepLog()
    rule = FaultRule("slow", method="echo.v1.EchoService/Echo", delay_s=600.0)
    async with serve(EchoServicer(), policies=[FaultInjectionPolicy([rule], clock=clock)]) as t:
        stub = t.stub(EchoServiceStub)
        call = asyncio.ensure_future(stub.Echo(EchoRequest(text="cut"), timeout=120.0))
        await asyncio.wait_for(clock.sleeping.wait(), timeout=60.0)
        (slept,) = clock.sleeps
        # the server sees the deadline grpc sent: `grpc-timeout` is rounded up on the wire
        # (to whole seconds at this size), so up to 1 s past what the client asked for
        assert 0 < slept <= 121.0
        clock.advance(slept)
        assert (await call).text == "cut"


async def test_admin_rpc_switches_faults_at_runtime() -> None:
    """SetFaults turns a fault on, ListFaults shows it, ClearFaults ends it; admin is exempt."""
    policy = FaultInjectionPolicy()
    async with serve(EchoServicer(), FaultInjectionServicer(policy), policies=[policy]) as t:
        stub = t.stub(EchoServiceStub)
        admin = t.stub(FaultInjectionServiceStub)
        everything = faults_pb2.FaultRule(name="all-down", percent=100, abort_code=14)
        active = await admin.SetFaults(faults_pb2.SetFaultsRequest(rules=[everything]))
        assert [r.name for r in active.rules] == ["all-down"]
        with pytest.raises(UnavailableError):
            await stub.Echo(EchoRequest())
        listed = await admin.ListFaults(faults_pb2.ListFaultsRequest())
        assert listed.rules[0].abort_code == 14
        cleared = await admin.ClearFaults(faults_pb2.ClearFaultsRequest())
        assert list(cleared.rules) == []
        assert (await stub.Echo(EchoRequest(text="back"))).text == "back"
        with pytest.raises(InvalidArgumentError, match="percent must be between 0 and 100"):
            bad = faults_pb2.FaultRule(name="bad", percent=150, abort_code=14)
            await admin.SetFaults(faults_pb2.SetFaultsRequest(rules=[bad]))


def test_admin_methods_require_the_admin_scope_in_the_contract() -> None:
    """Every FaultInjectionService method declares scope "operator" for the auth policy."""
    for name in ("SetFaults", "ClearFaults", "ListFaults"):
        method = Method.resolve(f"/framework.v1.FaultInjectionService/{name}")
        assert list(method.policy.scopes) == ["operator"]


def test_rules_are_validated() -> None:
    """A rule that would do nothing, or abort with OK, is refused with the field named."""
    with pytest.raises(ValueError, match="does nothing"):
        FaultRule("noop")
    with pytest.raises(ValueError, match="abort_code must be an error code"):
        FaultRule("ok", abort_code=grpc.StatusCode.OK)
    with pytest.raises(ValueError, match="abort_code must be a gRPC status code"):
        FaultRule.from_proto(faults_pb2.FaultRule(name="x", abort_code=99))


def _hs256_auth() -> tuple[AuthPolicy, Callable[[str], str]]:
    secret = b"faults-test-secret-faults-test-secret!!"
    keys = KeySet(StaticKeys([VerificationKey.hmac("k1", secret)]))
    policy = AuthPolicy(JwtVerifier(keys, JwtConfig(issuer="test", audience="svc")))

    def token(scope: str) -> str:
        claims = {"sub": "ops", "iss": "test", "aud": "svc", "scope": scope, "exp": 2**31}
        return jwt.encode(claims, secret, algorithm="HS256", headers={"kid": "k1"})

    return policy, token


async def test_admin_rpc_refuses_callers_without_the_operator_scope() -> None:
    """Through AuthPolicy, SetFaults needs scope "operator": other tokens get PERMISSION_DENIED."""
    auth, token = _hs256_auth()
    faults = FaultInjectionPolicy()
    async with serve(EchoServicer(), FaultInjectionServicer(faults), policies=[auth, faults]) as t:
        reader = t.connect(policies=[BearerToken(token("echo:read"))])
        admin = t.connect(policies=[BearerToken(token("operator echo:read"))])
        rule = faults_pb2.FaultRule(name="down", abort_code=14)
        with pytest.raises(PermissionDeniedError):
            await FaultInjectionServiceStub(reader).SetFaults(
                faults_pb2.SetFaultsRequest(rules=[rule])
            )
        assert faults.rules == []
        await FaultInjectionServiceStub(admin).SetFaults(faults_pb2.SetFaultsRequest(rules=[rule]))
        with pytest.raises(UnavailableError):
            await EchoServiceStub(reader).Echo(EchoRequest())
