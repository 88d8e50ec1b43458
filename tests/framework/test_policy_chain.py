"""The policy chain through real gRPC: order, selection, options, rejections."""

from __future__ import annotations

import asyncio
import logging

import pytest

from framework.errors import PermissionDeniedError
from framework.policy import BasePolicy, Call, Chain, Exit, Method, Side, only, skip
from framework.testing import serve
from framework.testing.echo import EchoServicer
from gen.echo.v1 import echo_pb2, echo_pb2_grpc
from tests.framework.recording import RecordingPolicy


async def test_enters_run_in_declared_order_and_exits_in_reverse_on_both_sides() -> None:
    """First listed is outermost on the server and on the client."""
    log: list[str] = []
    server = [RecordingPolicy("s1", log), RecordingPolicy("s2", log)]
    client = [RecordingPolicy("c1", log), RecordingPolicy("c2", log)]
    async with serve(EchoServicer(), policies=server, client_policies=client) as t:
        await t.stub(echo_pb2_grpc.EchoServiceStub).Echo(echo_pb2.EchoRequest(text="x"))
    assert log == [
        "enter:c1",
        "enter:c2",
        "enter:s1",
        "enter:s2",
        "exit:s2:OK",
        "exit:s1:OK",
        "exit:c2:OK",
        "exit:c1:OK",
    ]


async def test_policies_wrap_every_arity() -> None:
    """Streaming handlers are wrapped too: exits run when the stream ends."""
    log: list[str] = []
    async with serve(EchoServicer(), policies=[RecordingPolicy("s", log)]) as t:
        stub = t.stub(echo_pb2_grpc.EchoServiceStub)
        replies = [r async for r in stub.EchoStream(echo_pb2.EchoRequest(text="a", repeat=2))]

        async def requests() -> object:
            for text in ("a", "b"):
                yield echo_pb2.EchoRequest(text=text)

        collected = await stub.Collect(requests())
        chatted = [r.text async for r in stub.Chat(requests())]
    assert [r.text for r in replies] == ["a#0", "a#1"]
    assert collected.text == "a,b"
    assert chatted == ["A", "B"]
    assert log == ["enter:s", "exit:s:OK"] * 3


async def test_options_from_the_proto_reach_the_policy() -> None:
    """The method's contract options are on call.method, on both sides."""
    seen_server: list[Call] = []
    seen_client: list[Call] = []
    async with serve(
        EchoServicer(),
        policies=[RecordingPolicy("s", [], seen_server)],
        client_policies=[RecordingPolicy("c", [], seen_client)],
    ) as t:
        await t.stub(echo_pb2_grpc.EchoServiceStub).Echo(echo_pb2.EchoRequest(text="x"))
    for call in (seen_server[0], seen_client[0]):
        assert call.method.full_name == "/echo.v1.EchoService/Echo"
        assert list(call.method.policy.scopes) == ["echo:read"]
        assert call.method.policy.idempotent is True
        assert call.method.policy.timeout_s == 10
        assert call.method.service_policy.bounded_context == "testing"
    assert seen_server[0].request == echo_pb2.EchoRequest(text="x")
    assert seen_server[0].side is Side.SERVER and seen_client[0].side is Side.CLIENT


async def test_only_and_skip_select_methods_once_per_method() -> None:
    """only(...) and skip(...) decide per method at bind time."""
    log: list[str] = []
    policies = [
        only(RecordingPolicy("only-echo", log), "echo.v1.EchoService/Echo"),
        skip(RecordingPolicy("skip-echo", log), "*/Echo"),
    ]
    async with serve(EchoServicer(), policies=policies) as t:
        stub = t.stub(echo_pb2_grpc.EchoServiceStub)
        await stub.Echo(echo_pb2.EchoRequest(text="x"))
        log.append("--")
        [r async for r in stub.EchoStream(echo_pb2.EchoRequest(text="y"))]
    assert log == [
        "enter:only-echo",
        "exit:only-echo:OK",
        "--",
        "enter:skip-echo",
        "exit:skip-echo:OK",
    ]


class DenyPolicy(BasePolicy):
    """Rejects every call it applies to."""

    def enter(self, call: Call) -> Exit | None:
        raise PermissionDeniedError(f"{call.method.name} is closed for the test")


async def test_a_rejecting_enter_stops_the_call_and_outer_exits_see_the_error() -> None:
    """The handler never runs; the client gets the typed error; outer exits observe it."""
    log: list[str] = []
    servicer = EchoServicer()
    async with serve(
        servicer, policies=[RecordingPolicy("outer", log), DenyPolicy(), RecordingPolicy("x", log)]
    ) as t:
        with pytest.raises(PermissionDeniedError, match="Echo is closed"):
            await t.stub(echo_pb2_grpc.EchoServiceStub).Echo(echo_pb2.EchoRequest(text="x"))
    assert servicer.calls == {}
    assert log == ["enter:outer", "exit:outer:PERMISSION_DENIED"]


async def test_a_rejecting_client_policy_never_reaches_the_network() -> None:
    """A client-side rejection raises locally; the server counts no call."""
    servicer = EchoServicer()
    async with serve(servicer, client_policies=[DenyPolicy()]) as t:
        with pytest.raises(PermissionDeniedError):
            await t.stub(echo_pb2_grpc.EchoServiceStub).Echo(echo_pb2.EchoRequest(text="x"))
    assert servicer.calls == {}


class AsyncGatePolicy:
    """An async policy: its enter awaits before letting the call in."""

    def __init__(self) -> None:
        self.entered = 0

    def bind(self, method: Method) -> object:
        async def enter(call: Call) -> Exit | None:
            await asyncio.sleep(0)
            self.entered += 1
            return None

        return enter


async def test_async_policies_run_on_the_aio_adapters() -> None:
    """Async enters are awaited on server and client."""
    server_gate, client_gate = AsyncGatePolicy(), AsyncGatePolicy()
    async with serve(
        EchoServicer(),
        policies=[server_gate],
        client_policies=[client_gate],  # type: ignore[list-item]
    ) as t:
        reply = await t.stub(echo_pb2_grpc.EchoServiceStub).Echo(echo_pb2.EchoRequest(text="x"))
    assert reply.text == "x"
    assert (server_gate.entered, client_gate.entered) == (1, 1)


def test_a_sync_adapter_refuses_async_policies_when_the_chain_is_bound() -> None:
    """A synchronous adapter says so at build time, not on the first call."""
    chain = Chain([AsyncGatePolicy()], Side.SERVER, allow_async=False)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="async policy"):
        chain.bind(Method.resolve("/echo.v1.EchoService/Echo"))


def test_a_policy_on_the_wrong_side_is_refused() -> None:
    """A server-only policy cannot be put in a client chain."""
    from framework.policies.error_mapping import ErrorMappingPolicy

    with pytest.raises(TypeError, match="client side"):
        Chain([ErrorMappingPolicy()], Side.CLIENT)


class BrokenExitPolicy(BasePolicy):
    """An observer with a bug."""

    def enter(self, call: Call) -> Exit:
        def exit_(error: BaseException | None) -> None:
            raise RuntimeError("observer bug")

        return exit_


async def test_a_failing_exit_is_logged_and_does_not_change_the_outcome(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A broken exit cannot turn a success into a failure."""
    caplog.set_level(logging.ERROR, logger="framework.policy")
    async with serve(EchoServicer(), policies=[BrokenExitPolicy()]) as t:
        reply = await t.stub(echo_pb2_grpc.EchoServiceStub).Echo(echo_pb2.EchoRequest(text="ok"))
    assert reply.text == "ok"
    assert any("observer bug" in (r.exc_text or "") for r in caplog.records)


def test_method_resolution_reads_arity_and_rejects_bad_names() -> None:
    """Methods are described from the descriptor pool; malformed names are refused."""
    method = Method.resolve(b"/echo.v1.EchoService/Chat")
    assert method.arity.request_streaming and method.arity.response_streaming
    foreign = Method.resolve("/other.v1.Unknown/Do")
    assert foreign.descriptor is None and foreign.policy.timeout_s == 0
    with pytest.raises(ValueError, match=r"/pkg\.Service/Method"):
        Method.resolve("nonsense")


async def test_the_readmes_skip_pattern_leaves_health_out() -> None:
    """`skip(policy, "grpc.health.v1.*")` (the README's example) skips health calls only."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    log: list[str] = []
    async with serve(
        EchoServicer(), policies=[skip(RecordingPolicy("s", log), "grpc.health.v1.*")]
    ) as t:
        await health_pb2_grpc.HealthStub(t.channel).Check(health_pb2.HealthCheckRequest())
        await t.stub(echo_pb2_grpc.EchoServiceStub).Echo(echo_pb2.EchoRequest(text="x"))
    assert log == ["enter:s", "exit:s:OK"]
    assert Method.resolve("/grpc.health.v1.Health/Check").matches("grpc.health.v1.*")
