"""What the server records is what the caller saw: aborts, set_code, cancellations,
deadlines and dependency failures, through real gRPC."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import pytest

from framework.errors import InternalError, NotFoundError, UnauthenticatedError
from framework.policies.accesslog import AccessLogPolicy, AccessLogWriter
from framework.policies.bulkhead import BulkheadConfig, BulkheadPolicy
from framework.testing import serve
from gen.echo.v1 import echo_pb2, echo_pb2_grpc
from tests.framework.recording import RecordingPolicy


async def _until(condition: Callable[[], bool], attempts: int = 6000) -> None:
    """Poll (bounded) for what the server does after the client has its answer."""
    for _ in range(attempts):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met")


@dataclass(frozen=True)
class _Status:
    """What `context.abort_with_status` takes (grpc.Status's fields)."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str], ...] = ()


class Aborts(echo_pb2_grpc.EchoServiceServicer):
    """Aborts in every form grpc accepts, from every handler shape."""

    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> Any:
        if request.text == "int":
            await context.abort(5, "int code")  # grpc accepts the code's integer value
        if request.text == "status":
            await context.abort_with_status(_Status(grpc.StatusCode.NOT_FOUND, "with status"))
        await context.abort(grpc.StatusCode.NOT_FOUND, "enum code")

    async def EchoStream(self, request: echo_pb2.EchoRequest, context: Any) -> AsyncIterator[Any]:
        yield echo_pb2.EchoResponse(text="first")
        await context.abort(5, "stream int code")

    def Fail(self, request: echo_pb2.FailRequest, context: Any) -> Any:
        context.abort(grpc.StatusCode.NOT_FOUND, "sync abort")  # a sync handler's context


async def test_every_abort_form_is_sent_once_and_seen_by_every_exit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """context.abort with an int code, a StatusCode, abort_with_status, from a stream and
    from a sync handler: the caller gets NOT_FOUND, every exit runs once with NOT_FOUND,
    the bulkhead slot is released, the access log has the line, grpc logs no error."""
    caplog.set_level(logging.DEBUG)
    log: list[str] = []
    bulkhead = BulkheadPolicy(BulkheadConfig(max_concurrency=1))
    stream = io.StringIO()
    writer = AccessLogWriter(stream, flush_interval_s=60)
    policies = [AccessLogPolicy(writer), RecordingPolicy("s", log), bulkhead]
    async with serve(Aborts(), policies=policies) as t:
        stub = echo_pb2_grpc.EchoServiceStub(grpc.aio.insecure_channel(t.target))
        codes = []
        for text in ("int", "enum", "status"):
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await stub.Echo(echo_pb2.EchoRequest(text=text), timeout=10)
            codes.append((unary.value.code(), unary.value.details()))
        received = []
        with pytest.raises(grpc.aio.AioRpcError) as streamed:
            async for reply in stub.EchoStream(echo_pb2.EchoRequest(), timeout=10):
                received.append(reply.text)
        with pytest.raises(grpc.aio.AioRpcError) as sync:
            await stub.Fail(echo_pb2.FailRequest(), timeout=10)
        await _until(lambda: len(log) == 10)
        in_flight = [b.in_flight for b in bulkhead._by_method.values()]
    writer.flush()
    assert codes == [
        (grpc.StatusCode.NOT_FOUND, "int code"),
        (grpc.StatusCode.NOT_FOUND, "enum code"),
        (grpc.StatusCode.NOT_FOUND, "with status"),
    ]
    assert received == ["first"]
    assert (streamed.value.code(), streamed.value.details()) == (
        grpc.StatusCode.NOT_FOUND,
        "stream int code",
    )
    assert (sync.value.code(), sync.value.details()) == (grpc.StatusCode.NOT_FOUND, "sync abort")
    assert log == ["enter:s", "exit:s:NOT_FOUND"] * 5
    assert set(in_flight) == {0}
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(r["method"], r["code"]) for r in lines] == [("Echo", "NOT_FOUND")] * 3 + [
        ("EchoStream", "NOT_FOUND"),
        ("Fail", "NOT_FOUND"),
    ]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    assert not any("Abort already called" in (r.exc_text or r.getMessage()) for r in caplog.records)


class Outcomes(echo_pb2_grpc.EchoServiceServicer):
    """set_code + return, a dependency's refusal, a stream held open."""

    def __init__(self) -> None:
        self.streaming = asyncio.Event()

    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> Any:
        context.set_code(grpc.StatusCode.NOT_FOUND)
        context.set_details(f"no {request.text}")
        return echo_pb2.EchoResponse()

    async def Fail(self, request: echo_pb2.FailRequest, context: Any) -> Any:
        refused = UnauthenticatedError("the dependency refused our token")
        refused.remote = True  # as the client rebuilds a dependency's answer
        raise refused

    async def EchoStream(self, request: echo_pb2.EchoRequest, context: Any) -> AsyncIterator[Any]:
        yield echo_pb2.EchoResponse(text="first")
        self.streaming.set()
        await asyncio.Event().wait()  # until the caller goes away
        yield echo_pb2.EchoResponse(text="never")


async def test_observers_see_the_status_the_caller_sees() -> None:
    """set_code(NOT_FOUND) + return is NOT_FOUND everywhere; a dependency's UNAUTHENTICATED
    becomes INTERNAL for the caller and for every exit."""
    log: list[str] = []
    async with serve(Outcomes(), policies=[RecordingPolicy("s", log)]) as t:
        stub = t.stub(echo_pb2_grpc.EchoServiceStub)
        with pytest.raises(NotFoundError, match="no thing"):
            await stub.Echo(echo_pb2.EchoRequest(text="thing"))
        with pytest.raises(InternalError) as internal:
            await stub.Fail(echo_pb2.FailRequest())
    assert "token" not in internal.value.message
    assert log == ["enter:s", "exit:s:NOT_FOUND", "enter:s", "exit:s:INTERNAL"]


async def test_a_stream_cancelled_after_its_first_response_is_recorded_cancelled() -> None:
    """The caller cancels after reading one response, the server stream held open: the
    exits see CANCELLED, once.  (A request stream the client cancels reads as a normal
    end in grpc.aio; see docs/grpc-compatibility.md.)"""
    log: list[str] = []
    servicer = Outcomes()
    async with serve(servicer, policies=[RecordingPolicy("s", log)]) as t:
        stub = echo_pb2_grpc.EchoServiceStub(grpc.aio.insecure_channel(t.target))
        for round_ in range(3):
            servicer.streaming.clear()
            held = stub.EchoStream(echo_pb2.EchoRequest(), timeout=30)
            assert (await held.read()).text == "first"
            await asyncio.wait_for(servicer.streaming.wait(), 60)
            held.cancel()
            await _until(lambda n=round_: len(log) == 2 + 2 * n)
        await _until(lambda: t.server.in_flight == 0)
    assert log == ["enter:s", "exit:s:CANCELLED"] * 3


async def test_calls_past_their_deadline_are_recorded_deadline_exceeded() -> None:
    """However late the client's cancellation arrives, a call that ran out of time is
    DEADLINE_EXCEEDED for the observers, as for the caller (unary and streams)."""
    log: list[str] = []
    servicer = Outcomes()
    async with serve(servicer, policies=[RecordingPolicy("s", log)]) as t:
        stub = echo_pb2_grpc.EchoServiceStub(grpc.aio.insecure_channel(t.target))
        for round_ in range(5):
            stream = stub.EchoStream(echo_pb2.EchoRequest(), timeout=0.2)
            with pytest.raises(grpc.aio.AioRpcError) as late:
                async for _ in stream:
                    pass
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await _until(lambda n=round_: len(log) == 2 + 2 * n)
    assert log == ["enter:s", "exit:s:DEADLINE_EXCEEDED"] * 5
