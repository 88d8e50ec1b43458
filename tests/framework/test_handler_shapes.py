"""Every way grpc lets a servicer stream responses goes through the chain intact."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from framework.errors import DeadlineExceededError, NotFoundError
from framework.testing import serve
from framework.testing.echo import EchoServicer
from gen.echo.v1 import echo_pb2, echo_pb2_grpc
from tests.framework.recording import RecordingPolicy


class SyncGenerator(echo_pb2_grpc.EchoServiceServicer):
    def EchoStream(self, request: echo_pb2.EchoRequest, context: Any) -> Iterator[Any]:
        for i in range(request.repeat):
            yield echo_pb2.EchoResponse(text=f"sync{i}")


class ReturnsList(echo_pb2_grpc.EchoServiceServicer):
    async def EchoStream(self, request: echo_pb2.EchoRequest, context: Any) -> list[Any]:
        return [echo_pb2.EchoResponse(text=f"list{i}") for i in range(request.repeat)]


class Writes(echo_pb2_grpc.EchoServiceServicer):
    async def EchoStream(self, request: echo_pb2.EchoRequest, context: Any) -> None:
        for i in range(request.repeat):
            await context.write(echo_pb2.EchoResponse(text=f"write{i}"))


@pytest.mark.parametrize(
    ("servicer", "prefix"),
    [(SyncGenerator(), "sync"), (ReturnsList(), "list"), (Writes(), "write")],
    ids=["sync-generator", "returned-list", "context-write"],
)
async def test_streaming_handler_shapes_send_every_message(servicer: Any, prefix: str) -> None:
    """Sync generators, returned iterables and context.write() all reach the client."""
    log: list[str] = []
    async with serve(servicer, policies=[RecordingPolicy("s", log)]) as t:
        stub = t.stub(echo_pb2_grpc.EchoServiceStub)
        texts = [r.text async for r in stub.EchoStream(echo_pb2.EchoRequest(repeat=3))]
    assert texts == [f"{prefix}0", f"{prefix}1", f"{prefix}2"]
    assert log == ["enter:s", "exit:s:OK"]


class Aborts(echo_pb2_grpc.EchoServiceServicer):
    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> Any:
        await context.abort(grpc.StatusCode.NOT_FOUND, "no echo here")


async def test_context_abort_keeps_its_code_for_the_caller_and_the_observers() -> None:
    """A handler's own context.abort(NOT_FOUND) is seen as NOT_FOUND everywhere."""
    log: list[str] = []
    async with serve(Aborts(), policies=[RecordingPolicy("s", log)]) as t:
        with pytest.raises(NotFoundError, match="no echo here"):
            await t.stub(echo_pb2_grpc.EchoServiceStub).Echo(echo_pb2.EchoRequest())
    assert log == ["enter:s", "exit:s:NOT_FOUND"]


async def test_a_passed_deadline_is_observed_as_deadline_exceeded() -> None:
    """Server observers see DEADLINE_EXCEEDED, not CANCELLED, when the deadline ran out."""
    log: list[str] = []
    async with serve(EchoServicer(), policies=[RecordingPolicy("s", log)]) as t:
        with pytest.raises(DeadlineExceededError):
            # 2 s: long enough for the call to reach the handler on a loaded machine (a call
            # that arrives expired never enters the chain), far below the handler's 60 s
            await t.stub(echo_pb2_grpc.EchoServiceStub).Echo(
                echo_pb2.EchoRequest(delay_s=60), timeout=2.0
            )
        for _ in range(6000):  # bounded: the server side finishes after the client gave up
            if len(log) == 2:
                break
            await asyncio.sleep(0.01)
    assert log == ["enter:s", "exit:s:DEADLINE_EXCEEDED"]
