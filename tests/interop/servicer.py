"""The interop suite's test service, written here from the behaviour the interop
descriptions give each server feature (EmptyCall, UnaryCall, StreamingInputCall,
StreamingOutputCall, FullDuplexCall, Echo Status, Echo Metadata, interval_us).

The same handlers are registered on a plain `grpc.aio` server and on the
framework's `Server`, so every case can be compared across the two.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from tests.interop import messages as m

ECHO_INITIAL = "x-grpc-test-echo-initial"
ECHO_TRAILING = "x-grpc-test-echo-trailing-bin"


async def _echo_metadata(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Echo Metadata: the initial key back as initial metadata, the -bin key as trailing."""
    received = dict(context.invocation_metadata() or ())
    if ECHO_INITIAL in received:
        await context.send_initial_metadata(((ECHO_INITIAL, received[ECHO_INITIAL]),))
    if ECHO_TRAILING in received:
        context.set_trailing_metadata(((ECHO_TRAILING, received[ECHO_TRAILING]),))


async def _echo_status(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Echo Status: close the call with the code and message the request carries.

    The code is passed as the integer the request carries: grpc accepts it.
    """
    if request.HasField("response_status") and request.response_status.code != 0:
        status = request.response_status
        await context.abort(status.code, status.message)


class TestService:
    """The server features of the interop descriptions."""

    __test__ = False

    async def EmptyCall(self, request: Any, context: Any) -> Any:
        return m.Empty()

    async def UnaryCall(self, request: Any, context: Any) -> Any:
        await _echo_metadata(context)
        await _echo_status(request, context)
        return m.SimpleResponse(payload=m.zeros(request.response_size))

    async def StreamingInputCall(self, requests: AsyncIterator[Any], context: Any) -> Any:
        total = 0
        async for request in requests:
            total += len(request.payload.body)
        return m.StreamingInputCallResponse(aggregated_payload_size=total)

    async def StreamingOutputCall(self, request: Any, context: Any) -> AsyncIterator[Any]:
        await _echo_status(request, context)
        for parameters in request.response_parameters:
            if parameters.interval_us:
                await asyncio.sleep(parameters.interval_us / 1e6)
            yield m.StreamingOutputCallResponse(payload=m.zeros(parameters.size))

    async def FullDuplexCall(
        self, requests: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        await _echo_metadata(context)
        async for request in requests:
            await _echo_status(request, context)
            for parameters in request.response_parameters:
                if parameters.interval_us:
                    await asyncio.sleep(parameters.interval_us / 1e6)
                yield m.StreamingOutputCallResponse(payload=m.zeros(parameters.size))


def handlers(service: TestService) -> dict[str, grpc.RpcMethodHandler]:
    """Method handlers for every implemented method (UnimplementedCall has none)."""
    out: dict[str, grpc.RpcMethodHandler] = {}
    for name, (request, response, streams_in, streams_out, _) in m.METHODS.items():
        implementation = getattr(service, name, None)
        if implementation is None:
            continue
        kind = f"{'stream' if streams_in else 'unary'}_{'stream' if streams_out else 'unary'}"
        make = getattr(grpc, f"{kind}_rpc_method_handler")
        out[name] = make(
            implementation,
            request_deserializer=m.message_class(request).FromString,
            response_serializer=m.message_class(response).SerializeToString,
        )
    return out


def register(service: TestService, server: Any) -> None:
    """Registered handlers for the service, and (as grpc's own interop server does) one
    more method of the same service through a generic handler."""
    registered = handlers(service)
    generic = {"EmptyCall": registered.pop("EmptyCall")}
    server.add_registered_method_handlers(m.SERVICE, registered)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(m.SERVICE, generic),))
