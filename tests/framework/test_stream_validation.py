"""Streamed requests are validated message by message on the server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest

from framework.errors import InvalidArgumentError
from framework.policies.validation import ValidationPolicy
from framework.testing import serve
from gen.echo.v1 import echo_pb2, echo_pb2_grpc


class Counting(echo_pb2_grpc.EchoServiceServicer):
    """Counts the streamed messages that reached the handler."""

    def __init__(self) -> None:
        self.seen = 0

    async def Collect(self, request_iterator: Any, context: Any) -> echo_pb2.EchoResponse:
        async for _ in request_iterator:
            self.seen += 1
        return echo_pb2.EchoResponse()

    async def Chat(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        async for request in request_iterator:
            self.seen += 1
            yield echo_pb2.EchoResponse(text=request.text)


async def requests() -> AsyncIterator[echo_pb2.EchoRequest]:
    yield echo_pb2.EchoRequest(text="fine")
    yield echo_pb2.EchoRequest(text="x" * 1001)
    yield echo_pb2.EchoRequest(text="never read")


async def test_client_streaming_stops_at_the_first_bad_message() -> None:
    """Collect sees the good message; the bad one ends the call with its violation."""
    servicer = Counting()
    async with serve(servicer, policies=[ValidationPolicy()]) as t:
        with pytest.raises(InvalidArgumentError) as caught:
            await t.stub(echo_pb2_grpc.EchoServiceStub).Collect(requests())
    assert servicer.seen == 1
    assert [(v.field, v.rule) for v in caught.value.violations] == [("text", "string.max_len")]


async def test_bidi_streaming_validates_each_message() -> None:
    """Chat answers the good message, then fails on the bad one."""
    servicer = Counting()
    got: list[str] = []
    async with serve(servicer, policies=[ValidationPolicy()]) as t:
        with pytest.raises(InvalidArgumentError):
            async for reply in t.stub(echo_pb2_grpc.EchoServiceStub).Chat(requests()):
                got.append(reply.text)
    assert got == ["fine"] and servicer.seen == 1


class Reads(echo_pb2_grpc.EchoServiceServicer):
    """Reads its request stream with `await context.read()` (grpc's reader API)."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    async def Collect(self, request_iterator: Any, context: Any) -> echo_pb2.EchoResponse:
        while (request := await context.read()) is not grpc.aio.EOF:
            self.seen.append(len(request.text))
        return echo_pb2.EchoResponse(text=f"{len(self.seen)} read")

    async def Chat(self, request_iterator: Any, context: Any) -> None:
        while (request := await context.read()) is not grpc.aio.EOF:
            self.seen.append(len(request.text))
            await context.write(echo_pb2.EchoResponse(text=request.text[:4]))


async def test_messages_read_with_context_read_are_validated_too() -> None:
    """`await context.read()` goes through the per-message checks: the 1,001-character
    message ends the call with its violation and never reaches the handler."""
    servicer = Reads()
    async with serve(servicer, policies=[ValidationPolicy()]) as t:
        stub = t.stub(echo_pb2_grpc.EchoServiceStub)
        with pytest.raises(InvalidArgumentError) as collected:
            await stub.Collect(requests())
        got = []
        with pytest.raises(InvalidArgumentError) as chatted:
            async for reply in stub.Chat(requests()):
                got.append(reply.text)
        good = await stub.Collect(iter([echo_pb2.EchoRequest(text="ok")] * 2))
    assert servicer.seen == [4, 4, 2, 2]
    assert got == ["fine"]
    for caught in (collected, chatted):
        assert [(v.field, v.rule) for v in caught.value.violations] == [("text", "string.max_len")]
    assert good.text == "4 read"
