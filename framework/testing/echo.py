"""The echo service shipped with the test kit (protos/echo/v1/echo.proto)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from framework import errors
from gen.echo.v1 import echo_pb2, echo_pb2_grpc


def _keys(context: Any) -> list[str]:
    return sorted({k for k, _ in (context.invocation_metadata() or ())})


def _remaining(context: Any) -> float:
    remaining = context.time_remaining()
    return -1.0 if remaining is None else float(remaining)


class EchoServicer(echo_pb2_grpc.EchoServiceServicer):
    """Echoes text back; `delay_s` waits first; `Fail` raises the named framework error.

    `calls` counts calls per method, so tests can assert what reached the server.
    `release` (an asyncio.Event), when given, holds every Echo call until it is set.
    """

    def __init__(self, release: asyncio.Event | None = None) -> None:
        self.calls: dict[str, int] = {}
        self.release = release
        self.started = asyncio.Event()

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        self.started.set()

    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        self._count("Echo")
        if self.release is not None:
            await self.release.wait()
        if request.delay_s > 0:
            await asyncio.sleep(request.delay_s)
        return echo_pb2.EchoResponse(
            text=request.text,
            metadata_keys=_keys(context),
            deadline_remaining_s=_remaining(context),
        )

    async def EchoStream(
        self, request: echo_pb2.EchoRequest, context: Any
    ) -> AsyncIterator[echo_pb2.EchoResponse]:
        self._count("EchoStream")
        for i in range(request.repeat or 1):
            if request.delay_s > 0:
                await asyncio.sleep(request.delay_s)
            yield echo_pb2.EchoResponse(text=f"{request.text}#{i}")

    async def Collect(
        self, request_iterator: AsyncIterator[echo_pb2.EchoRequest], context: Any
    ) -> echo_pb2.EchoResponse:
        self._count("Collect")
        texts = [r.text async for r in request_iterator]
        return echo_pb2.EchoResponse(text=",".join(texts))

    async def Chat(
        self, request_iterator: AsyncIterator[echo_pb2.EchoRequest], context: Any
    ) -> AsyncIterator[echo_pb2.EchoResponse]:
        self._count("Chat")
        async for request in request_iterator:
            yield echo_pb2.EchoResponse(text=request.text.upper())

    async def Fail(self, request: echo_pb2.FailRequest, context: Any) -> echo_pb2.FailResponse:
        self._count("Fail")
        message = request.message or f"requested {request.error}"
        if request.error == "unexpected":
            raise RuntimeError(f"secret internal detail: {message}")
        cls = getattr(errors, request.error, None)
        if not (isinstance(cls, type) and issubclass(cls, errors.FrameworkError)):
            raise errors.InvalidArgumentError(
                f"error must name a framework error class, got {request.error!r}",
                violations=[errors.FieldViolation("error", "not a framework error class")],
            )
        raise cls(message)
