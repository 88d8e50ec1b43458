"""The shipped pytest plugin's `grpc_serve` fixture."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from framework.testing import TestServer
from framework.testing.echo import EchoServicer
from gen.echo.v1 import echo_pb2, echo_pb2_grpc

pytest_plugins = ["framework.testing.pytest_plugin"]


async def test_grpc_serve_starts_servers_and_stops_them_after_the_test(
    grpc_serve: Callable[..., Awaitable[TestServer]],
) -> None:
    """Two servers from the factory answer; teardown is the fixture's job."""
    first = await grpc_serve(EchoServicer())
    second = await grpc_serve(EchoServicer())
    assert first.port != second.port
    for t in (first, second):
        reply = await t.stub(echo_pb2_grpc.EchoServiceStub).Echo(echo_pb2.EchoRequest(text="x"))
        assert reply.text == "x"
