"""The shipped pytest plugin's `grpc_serve` fixture."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from framework.testing import TestServer
from framework.testing.echo import EchoServicer
from gen.echo.v1 import echo_pb2, echo_pb2_grpc

pytest_plugins = ["framework.testing.pytest_plugin", "pytester"]


async def test_grpc_serve_starts_servers(
    grpc_serve: Callable[..., Awaitable[TestServer]],
) -> None:
    """Two servers from the factory answer, each on its own port."""
    first = await grpc_serve(EchoServicer())
    second = await grpc_serve(EchoServicer())
    assert first.port != second.port
    for t in (first, second):
        reply = await t.stub(echo_pb2_grpc.EchoServiceStub).Echo(echo_pb2.EchoRequest(text="x"))
        assert reply.text == "x"


INNER_TEST = """
import asyncio

import pytest

from framework.testing.echo import EchoServicer

pytest_plugins = ["framework.testing.pytest_plugin"]


@pytest.fixture
async def ports_closed_after():
    # Set up before grpc_serve (listed first), so torn down after it, on the same loop.
    ports = []
    yield ports
    for port in ports:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            continue
        writer.close()
        raise AssertionError(f"port {port} still listens after the test")


async def test_start_two(ports_closed_after, grpc_serve):
    for _ in range(2):
        ports_closed_after.append((await grpc_serve(EchoServicer())).port)
    assert len(set(ports_closed_after)) == 2
"""


def test_grpc_serve_stops_the_servers_after_the_test(pytester: pytest.Pytester) -> None:
    """When a test using grpc_serve ends, the servers it started are stopped (before the
    test's event loop closes): their ports refuse connections."""
    pytester.makepyfile(test_inner=INNER_TEST)
    # in a subprocess: in-process, CPython 3.11's AST validator once failed compiling the
    # inner test ("AST constructor recursion depth mismatch") while this test's stack was deep
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "-o",
        "asyncio_mode=auto",
        "-o",
        "asyncio_default_fixture_loop_scope=function",
    )
    result.assert_outcomes(passed=1, errors=0)
