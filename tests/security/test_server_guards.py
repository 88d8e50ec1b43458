"""What every framework server refuses: scoped methods without authentication, scope
bypasses, admin RPCs for non-operators, operator detail for anonymous callers."""

from __future__ import annotations

import logging
import math

import grpc
import pytest

from framework.auth.policy import AuthPolicy, BearerToken
from framework.config import ServerConfig
from framework.errors import (
    InvalidArgumentError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from framework.health import Check
from framework.policies.faults import FaultInjectionPolicy, FaultInjectionServicer
from framework.policy import only
from framework.server import Server
from framework.testing import serve
from framework.testing.echo import EchoServicer
from gen.echo.v1.echo_pb2 import EchoRequest
from gen.echo.v1.echo_pb2_grpc import EchoServiceStub
from gen.framework.v1 import faults_pb2
from gen.framework.v1 import health_pb2 as report_pb2
from gen.framework.v1 import health_pb2_grpc as report_pb2_grpc
from gen.framework.v1.faults_pb2_grpc import FaultInjectionServiceStub
from tests.security.kit import Issuer

SECURE = ServerConfig(name="secure", host="127.0.0.1", port=0, grace_s=0)
STANDARD = ("grpc.health.v1.Health", "framework.v1.HealthReportService")


@pytest.fixture
def issuer() -> Issuer:
    """The identity provider the servers trust."""
    return Issuer()


async def test_server_refuses_a_scoped_servicer_without_an_auth_policy() -> None:
    """Adding a servicer whose contract declares scopes to a server that verifies nobody fails."""
    server = Server(SECURE)
    with pytest.raises(RuntimeError, match=r"refusing to serve echo\.v1\.EchoService/Echo"):
        server.add(EchoServicer())
    assert server.services == STANDARD


async def test_server_refuses_the_fault_admin_without_an_auth_policy(issuer: Issuer) -> None:
    """The fault injection admin service (operator scope) cannot be added unauthenticated,
    nor behind an AuthPolicy limited to other services."""
    faults = FaultInjectionPolicy()
    for policies in ([faults], [only(AuthPolicy(issuer.verifier()), "echo.v1.*"), faults]):
        server = Server(SECURE, policies=policies)
        with pytest.raises(RuntimeError, match="FaultInjectionService/SetFaults"):
            server.add(FaultInjectionServicer(faults))
        assert server.services == STANDARD
    guarded = Server(SECURE, policies=[AuthPolicy(issuer.verifier()), faults])
    guarded.add(FaultInjectionServicer(faults))
    assert guarded.services == (*STANDARD, "framework.v1.FaultInjectionService")


async def test_insecure_dev_serves_unauthenticated_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """insecure_dev (SERVICE_INSECURE_DEV=1) serves the scoped method, with a WARNING naming it."""
    config = ServerConfig.from_env(
        "dev", {"SERVICE_INSECURE_DEV": "1", "SERVICE_HOST": "127.0.0.1"}
    )
    assert config.insecure_dev
    caplog.set_level(logging.WARNING, logger="framework.server")
    async with serve(EchoServicer(), config=config) as t:
        reply = await t.stub(EchoServiceStub).Echo(EchoRequest(text="hi"))
    assert reply.text == "hi"
    [warning] = [r for r in caplog.records if "INSECURE DEVELOPMENT MODE" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert "echo.v1.EchoService/Echo" in warning.getMessage()


@pytest.mark.parametrize(
    "policy_kwargs",
    [{"required_by_default": False}, {"public_methods": ["*/Echo"]}],
    ids=["required_by_default_false", "public_methods"],
)
async def test_declared_scopes_always_imply_authentication(
    issuer: Issuer, policy_kwargs: dict[str, object]
) -> None:
    """A scoped method stays guarded even when the policy's defaults call it public."""
    servicer = EchoServicer()
    auth = AuthPolicy(issuer.verifier(), **policy_kwargs)  # type: ignore[arg-type]
    async with serve(servicer, policies=[auth], config=SECURE) as t:
        with pytest.raises(UnauthenticatedError):
            await t.stub(EchoServiceStub).Echo(EchoRequest(text="x"))
        no_scope = t.connect(policies=[BearerToken(issuer.token("eve", ["other"]))])
        with pytest.raises(PermissionDeniedError) as caught:
            await EchoServiceStub(no_scope).Echo(EchoRequest(text="x"))
        assert caught.value.reason == "SCOPE_MISSING"
        assert servicer.calls.get("Echo", 0) == 0
        reader = t.connect(policies=[BearerToken(issuer.token("ann", ["echo:read"]))])
        assert (await EchoServiceStub(reader).Echo(EchoRequest(text="ok"))).text == "ok"


async def test_fault_admin_needs_the_operator_scope(issuer: Issuer) -> None:
    """A valid token without "operator" cannot switch faults on; the rules stay empty."""
    faults = FaultInjectionPolicy()
    policies = [AuthPolicy(issuer.verifier()), faults]
    async with serve(EchoServicer(), FaultInjectionServicer(faults), policies=policies) as t:
        rule = faults_pb2.FaultRule(name="down", abort_code=14)
        for caller in (
            t.channel,
            t.connect(policies=[BearerToken(issuer.token("ann", ["admin"]))]),
        ):
            with pytest.raises((UnauthenticatedError, PermissionDeniedError)):
                await FaultInjectionServiceStub(caller).SetFaults(
                    faults_pb2.SetFaultsRequest(rules=[rule])
                )
        assert faults.rules == []
        operator = t.connect(policies=[BearerToken(issuer.token("ops", ["operator"]))])
        await FaultInjectionServiceStub(operator).SetFaults(
            faults_pb2.SetFaultsRequest(rules=[rule])
        )
        assert [r.name for r in faults.rules] == ["down"]


@pytest.mark.parametrize("delay", [math.nan, math.inf, -math.inf, 1e300, -1.0])
async def test_fault_admin_rejects_non_finite_delays(issuer: Issuer, delay: float) -> None:
    """SetFaults with a NaN/infinite/huge delay is INVALID_ARGUMENT and installs nothing."""
    faults = FaultInjectionPolicy()
    policies = [AuthPolicy(issuer.verifier()), faults]
    async with serve(EchoServicer(), FaultInjectionServicer(faults), policies=policies) as t:
        operator = t.connect(policies=[BearerToken(issuer.token("ops", ["operator"]))])
        rule = faults_pb2.FaultRule(name="slow", delay_s=delay)
        with pytest.raises(InvalidArgumentError) as caught:
            await FaultInjectionServiceStub(operator).SetFaults(
                faults_pb2.SetFaultsRequest(rules=[rule])
            )
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "delay_s" in caught.value.message
        assert faults.rules == []


async def test_health_report_detail_only_for_operators(issuer: Issuer) -> None:
    """Anonymous and non-operator callers get statuses only; the check error stays hidden."""

    async def database() -> None:
        raise ConnectionError('password authentication failed for user "shop_owner"')

    check = Check("postgres", database)
    async with serve(
        EchoServicer(),
        policies=[AuthPolicy(issuer.verifier())],
        health_checks=[check],
        config=SECURE,
    ) as t:
        request = report_pb2.GetHealthReportRequest()
        reader = t.connect(policies=[BearerToken(issuer.token("ann", ["echo:read"]))])
        operator = t.connect(policies=[BearerToken(issuer.token("ops", ["operator"]))])
        for caller in (t.channel, reader):
            report = await report_pb2_grpc.HealthReportServiceStub(caller).GetHealthReport(request)
            assert report.checks_withheld and not report.checks
            assert "shop_owner" not in str(report)
            assert {s.status for s in report.services} == {"NOT_SERVING"}
        full = await report_pb2_grpc.HealthReportServiceStub(operator).GetHealthReport(request)
        assert not full.checks_withheld
        assert "shop_owner" in full.checks[0].last_error
