"""Default deadlines from the contract, and deadlines carried across hops."""

from __future__ import annotations

from typing import Any

import grpc.aio
import pytest

from framework.config import ClientConfig
from framework.errors import DeadlineExceededError
from framework.policies.deadline import DeadlinePolicy
from framework.policy import Call, Method, Side, reset_current_call, set_current_call
from framework.testing import serve
from framework.testing.echo import EchoServicer
from gen.echo.v1 import echo_pb2, echo_pb2_grpc


class Relay(echo_pb2_grpc.EchoServiceServicer):
    """Echo that forwards to a downstream Echo through a framework client."""

    def __init__(self) -> None:
        self.stub: echo_pb2_grpc.EchoServiceStub | None = None
        self.seen_remaining: float = -1.0

    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        assert self.stub is not None
        self.seen_remaining = float(context.time_remaining())
        downstream = await self.stub.Echo(request)
        return echo_pb2.EchoResponse(
            text=f"relay:{downstream.text}",
            deadline_remaining_s=downstream.deadline_remaining_s,
        )


async def test_the_method_option_sets_the_default_deadline() -> None:
    """Echo declares timeout_s 10: a call without a timeout gets at most 10 s."""
    async with serve(EchoServicer()) as t:
        reply = await t.stub(echo_pb2_grpc.EchoServiceStub).Echo(echo_pb2.EchoRequest(text="x"))
    # at most 10 s, as grpc sends it: rounded up to 3 significant digits, so 10.0xx s goes
    # out as 10.1 s (seen under load); more than 5 s, so it is the contract's deadline, not
    # a shorter one (unless the call itself took 5 s)
    assert 5.0 < reply.deadline_remaining_s <= 10.1


async def test_an_explicit_timeout_wins_over_the_default() -> None:
    """The caller's own timeout is kept when it is shorter."""
    async with serve(EchoServicer()) as t:
        reply = await t.stub(echo_pb2_grpc.EchoServiceStub).Echo(
            echo_pb2.EchoRequest(text="x"), timeout=5.0
        )
    assert 0 < reply.deadline_remaining_s <= 5.05  # grpc-timeout rounds up slightly


async def test_a_deadline_set_two_hops_up_is_visible_two_hops_down() -> None:
    """client -(5 s)-> A -> B -> C: C sees less than 5 s left, not its 10 s default."""
    relay_a, relay_b = Relay(), Relay()
    async with (
        serve(EchoServicer()) as c,
        serve(relay_b) as b,
        serve(relay_a) as a,
    ):
        relay_b.stub = echo_pb2_grpc.EchoServiceStub(c.connect())
        relay_a.stub = echo_pb2_grpc.EchoServiceStub(b.connect())
        reply = await a.stub(echo_pb2_grpc.EchoServiceStub).Echo(
            echo_pb2.EchoRequest(text="x"), timeout=5.0
        )
    assert reply.text == "relay:relay:x"
    # grpc-timeout is re-encoded at each hop (rounded up to its units): allow 50 ms of slack;
    # without propagation C would see its own 10 s default
    slack = 0.05
    assert 0 < relay_a.seen_remaining <= 5.0 + slack
    assert 0 < relay_b.seen_remaining <= relay_a.seen_remaining + slack
    assert 0 < reply.deadline_remaining_s <= relay_b.seen_remaining + slack


def test_a_call_made_after_the_inbound_deadline_passed_is_not_sent() -> None:
    """Downstream calls fail fast with DEADLINE_EXCEEDED once the caller's time is up."""
    echo = Method.resolve("/echo.v1.EchoService/Echo")
    enter = DeadlinePolicy().bind(echo)
    assert enter is not None
    inbound = Call(echo, Side.CLIENT, timeout=0.0)  # stands in for an expired inbound call
    token = set_current_call(inbound)
    try:
        with pytest.raises(DeadlineExceededError, match="already passed"):
            enter(Call(echo, Side.CLIENT))
    finally:
        reset_current_call(token)
    outbound = Call(echo, Side.CLIENT)
    enter(outbound)
    assert outbound.timeout == 10.0


async def test_client_default_applies_to_methods_without_an_option() -> None:
    """Collect has no timeout_s option: the ClientConfig default bounds it."""
    async with serve(EchoServicer(), client_config=ClientConfig(default_timeout_s=3.0)) as t:

        async def one() -> Any:
            yield echo_pb2.EchoRequest(text="a")

        reply = await t.stub(echo_pb2_grpc.EchoServiceStub).Collect(one())
    assert reply.text == "a"
    with pytest.raises(ValueError, match="default_timeout_s"):
        ClientConfig(default_timeout_s=0)


async def test_raw_channels_are_untouched_by_the_framework() -> None:
    """Without the framework client no default deadline is added."""
    async with serve(EchoServicer()) as t, grpc.aio.insecure_channel(t.target) as channel:
        reply = await echo_pb2_grpc.EchoServiceStub(channel).Echo(echo_pb2.EchoRequest())
    assert reply.deadline_remaining_s == -1.0
