"""One method table behind one generic handler: every way of adding methods, one chain."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from framework.config import ServerConfig
from framework.server import Server
from framework.testing import serve
from framework.testing.echo import EchoServicer
from gen.echo.v1 import echo_pb2, echo_pb2_grpc
from tests.framework.recording import RecordingPolicy


def _config() -> ServerConfig:
    return ServerConfig(name="table", host="127.0.0.1", port=0, grace_s=1.0, insecure_dev=True)


async def _echo_health_and_reflection(server: Server) -> tuple[str, int, list[str]]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        reply = await echo_pb2_grpc.EchoServiceStub(channel).Echo(
            echo_pb2.EchoRequest(text="hi"), timeout=10
        )
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="echo.v1.EchoService"), timeout=10
        )
        stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        listed = [s.name async for r in stream for s in r.list_services_response.service]
    return reply.text, health.status, listed


def test_a_server_built_outside_the_event_loop_starts_and_serves() -> None:
    """A Server constructed before any loop runs starts on the loop that runs it."""
    server = Server(_config())
    server.add(EchoServicer())

    async def run() -> tuple[str, int, list[str]]:
        await server.start()
        try:
            return await _echo_health_and_reflection(server)
        finally:
            await server.stop(grace_s=0)

    text, status, listed = asyncio.run(run())
    assert text == "hi"
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert "echo.v1.EchoService" in listed and "grpc.health.v1.Health" in listed


async def test_health_and_reflection_are_served_from_the_table() -> None:
    """Health, reflection and the servicer's methods all answer through one lookup."""
    async with serve(EchoServicer()) as t:
        text, status, listed = await _echo_health_and_reflection(t.server)
    assert (text, status) == ("hi", health_pb2.HealthCheckResponse.SERVING)
    assert "grpc.reflection.v1alpha.ServerReflection" in listed


async def _extra(request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
    return echo_pb2.EchoResponse(text=f"extra:{request.text}")


class _OneMethod(grpc.GenericRpcHandler):
    """A hand-written generic handler (not grpc's dictionary one) serving one name."""

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if details.method != "/custom.v1.Custom/Shout":
            return None
        return grpc.unary_unary_rpc_method_handler(
            _extra,
            request_deserializer=echo_pb2.EchoRequest.FromString,
            response_serializer=echo_pb2.EchoResponse.SerializeToString,
        )


async def test_generic_handlers_for_a_registered_service_are_served_through_the_chain() -> None:
    """A generic handler adding a method to an added service (grpc's interop server does
    this) and a hand-written generic handler are both served, with the chain."""
    log: list[str] = []
    server = Server(_config(), policies=[RecordingPolicy("s", log)])
    server.add(EchoServicer())
    extra = grpc.method_handlers_generic_handler(
        "echo.v1.EchoService",
        {
            "Extra": grpc.unary_unary_rpc_method_handler(
                _extra,
                request_deserializer=echo_pb2.EchoRequest.FromString,
                response_serializer=echo_pb2.EchoResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((extra, _OneMethod()))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            replies = []
            for name in ("/echo.v1.EchoService/Extra", "/custom.v1.Custom/Shout"):
                call = channel.unary_unary(
                    name,
                    request_serializer=echo_pb2.EchoRequest.SerializeToString,
                    response_deserializer=echo_pb2.EchoResponse.FromString,
                )
                replies.append((await call(echo_pb2.EchoRequest(text=name[-5:]), timeout=10)).text)
            unknown = channel.unary_unary("/custom.v1.Custom/Nope")
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await unknown(b"", timeout=10)
    finally:
        await server.stop(grace_s=0)
    assert replies == ["extra:Extra", "extra:Shout"]
    assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert log == ["enter:s", "exit:s:OK"] * 2


async def test_generated_registration_works_on_the_server_itself() -> None:
    """Code written for grpc.aio (`add_..._to_server(servicer, server)`) works unchanged."""
    log: list[str] = []
    server = Server(_config(), policies=[RecordingPolicy("s", log)])
    echo_pb2_grpc.add_EchoServiceServicer_to_server(EchoServicer(), server)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            reply = await echo_pb2_grpc.EchoServiceStub(channel).Echo(
                echo_pb2.EchoRequest(text="generated"), timeout=10
            )
    finally:
        await server.stop(grace_s=0)
    assert reply.text == "generated"
    assert server.services[-1] == "echo.v1.EchoService"
    assert log == ["enter:s", "exit:s:OK"]
