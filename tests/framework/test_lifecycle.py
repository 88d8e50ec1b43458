"""Graceful shutdown: hooks, NOT_SERVING first, in-flight calls finish, new ones refused."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from framework.config import ServerConfig
from framework.errors import UnavailableError
from framework.server import Server
from framework.testing import serve
from framework.testing.echo import EchoServicer
from gen.echo.v1 import echo_pb2, echo_pb2_grpc


class Hooks:
    """Records lifecycle callbacks and the health status seen at draining time."""

    def __init__(self) -> None:
        self.events: list[str] = []

    async def on_started(self, server: Server) -> None:
        self.events.append(f"started:{server.port > 0}")

    async def on_draining(self, server: Server) -> None:
        self.events.append(f"draining:{server.health.status('')}")

    async def on_stopped(self, server: Server) -> None:
        self.events.append("stopped")


async def test_in_flight_call_completes_while_new_calls_are_refused() -> None:
    """During drain: health NOT_SERVING, the held call finishes, a new call fails UNAVAILABLE."""
    release = asyncio.Event()
    servicer = EchoServicer(release=release)
    hooks = Hooks()
    # no drain delay: new calls are refused right after the flip (with one, they are
    # still served for drain_delay_s while load balancers notice)
    # a grace period no loaded machine outlasts: the held call is released well within it
    config = ServerConfig(name="echo", grace_s=120.0, drain_delay_s=0, insecure_dev=True)
    server = Server(config, hooks=[hooks])
    server.add(servicer)
    await server.start()
    async with (
        grpc.aio.insecure_channel(server.address) as channel,
        grpc.aio.insecure_channel(server.address) as late_channel,
    ):
        stub = echo_pb2_grpc.EchoServiceStub(channel)
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="echo.v1.EchoService"), timeout=120
        )
        updates = watch.__aiter__()
        first = await updates.__anext__()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        in_flight = asyncio.ensure_future(stub.Echo(echo_pb2.EchoRequest(text="held")))
        await asyncio.wait_for(servicer.started.wait(), 60)
        stopping = asyncio.ensure_future(server.stop())
        flipped = await asyncio.wait_for(updates.__anext__(), 60)
        assert flipped.status == health_pb2.HealthCheckResponse.NOT_SERVING
        late = echo_pb2_grpc.EchoServiceStub(late_channel)
        refused: grpc.aio.AioRpcError | None = None
        for _ in range(200):  # bounded: the server stops accepting right after the flip
            try:
                await late.Echo(echo_pb2.EchoRequest(text="late"), timeout=5)
            except grpc.aio.AioRpcError as error:
                refused = error
                break
            await asyncio.sleep(0.01)
        assert refused is not None and refused.code() == grpc.StatusCode.UNAVAILABLE
        assert not in_flight.done()
        release.set()
        reply = await asyncio.wait_for(in_flight, 60)
        await asyncio.wait_for(stopping, 60)
    assert reply.text == "held"
    # health is NOT_SERVING (2) before on_draining hooks run (e.g. deregistration)
    assert hooks.events == ["started:True", "draining:2", "stopped"]


async def test_calls_past_the_grace_period_are_cancelled() -> None:
    """A call that outlives grace_s is cut off rather than holding shutdown forever."""
    release = asyncio.Event()
    servicer = EchoServicer(release=release)
    async with serve(servicer) as t:
        call = asyncio.ensure_future(
            t.stub(echo_pb2_grpc.EchoServiceStub).Echo(echo_pb2.EchoRequest(text="stuck"))
        )
        await asyncio.wait_for(servicer.started.wait(), 60)
        await t.server.stop(grace_s=0.05)
        with pytest.raises(UnavailableError):
            await asyncio.wait_for(call, 60)


def test_server_config_validates_with_field_names() -> None:
    """Bad configuration fails at construction with the field named."""
    with pytest.raises(ValueError, match="port"):
        ServerConfig(port=70000)
    with pytest.raises(ValueError, match="grace_s"):
        ServerConfig(grace_s=-1)
    config = ServerConfig.from_env("orders", {"SERVICE_PORT": "5000", "SERVICE_GRACE_S": "2.5"})
    assert (config.port, config.grace_s) == (5000, 2.5)
    with pytest.raises(ValueError, match="SERVICE_"):
        ServerConfig.from_env("orders", {"SERVICE_PORT": "abc"})


async def test_a_servicer_must_come_from_generated_code() -> None:
    """Registering something that is not a generated servicer says what to do."""
    server = Server(ServerConfig(name="x"))
    with pytest.raises(TypeError, match="register="):
        server.add(object())
