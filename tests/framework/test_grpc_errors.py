"""The client's typed errors are also what grpc.aio raises (issue #22 item 1).

Code written for grpc.aio catches `grpc.RpcError` / `grpc.aio.AioRpcError` and
reads `code()`, `details()`, `trailing_metadata()`; through `connect()` the same
handlers must work, and `except ConflictError` too, for unary calls and for
streamed responses read with `read()` or `async for`.
"""

from __future__ import annotations

import pickle
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import pytest

from framework import errors
from framework.policy import BasePolicy, Call, Exit
from framework.testing import TestServer, serve
from framework.testing.echo import EchoServicer
from gen.echo.v1 import echo_pb2, echo_pb2_grpc


async def _both(
    t: TestServer, run: Callable[[echo_pb2_grpc.EchoServiceStub], Awaitable[Any]]
) -> tuple[grpc.aio.AioRpcError, grpc.aio.AioRpcError]:
    """The error `run` raises through the framework's client, then through plain grpc.aio."""
    caught: list[grpc.aio.AioRpcError] = []
    async with grpc.aio.insecure_channel(t.target) as plain:
        for channel in (t.channel, plain):
            try:
                await run(echo_pb2_grpc.EchoServiceStub(channel))
            except grpc.aio.AioRpcError as error:  # what grpc-style code writes
                caught.append(error)
            else:
                raise AssertionError("the call should have failed")
    return caught[0], caught[1]


def _same_as_grpc(ours: grpc.aio.AioRpcError, theirs: grpc.aio.AioRpcError) -> None:
    assert ours.code() is theirs.code()
    assert ours.details() == theirs.details()
    assert list(ours.trailing_metadata()) == list(theirs.trailing_metadata())
    assert list(ours.initial_metadata()) == list(theirs.initial_metadata())
    assert ours.debug_error_string()


async def test_a_unary_failure_is_both_the_typed_error_and_grpcs() -> None:
    """`except ConflictError` and `except AioRpcError` both catch it, with grpc's accessors."""
    async with serve(EchoServicer()) as t:

        async def fail(stub: echo_pb2_grpc.EchoServiceStub) -> Any:
            return await stub.Fail(echo_pb2.FailRequest(error="ConflictError", message="stale"))

        ours, theirs = await _both(t, fail)
    assert isinstance(ours, errors.ConflictError) and isinstance(ours, grpc.RpcError)
    assert ours.remote and ours.reason == "CONFLICT" and ours.message == "stale"
    assert ours.code() is grpc.StatusCode.ABORTED
    assert isinstance(ours.__cause__, grpc.aio.AioRpcError)
    _same_as_grpc(ours, theirs)


async def test_a_deadline_on_a_stream_read_is_caught_as_grpcs_error() -> None:
    """`read()` past the deadline raises DeadlineExceededError, caught as AioRpcError."""
    async with serve(EchoServicer()) as t:

        async def read(stub: echo_pb2_grpc.EchoServiceStub) -> Any:
            call = stub.EchoStream(echo_pb2.EchoRequest(text="x", delay_s=30), timeout=0.2)
            return await call.read()

        ours, theirs = await _both(t, read)
    assert isinstance(ours, errors.DeadlineExceededError)
    assert ours.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    _same_as_grpc(ours, theirs)


class _Abort(echo_pb2_grpc.EchoServiceServicer):
    """Ends a stream with a status set through grpc's own API (no framework details)."""

    async def EchoStream(self, request: Any, context: Any) -> AsyncIterator[Any]:
        yield echo_pb2.EchoResponse(text="first")
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not in that state: \t\u00e9")


async def test_a_stream_iterated_with_async_for_fails_as_grpcs_error() -> None:
    """A grpc-aborted stream, iterated, raises a typed error that is grpc's error too."""
    async with serve(_Abort()) as t:

        async def iterate(stub: echo_pb2_grpc.EchoServiceStub) -> Any:
            return [r.text async for r in stub.EchoStream(echo_pb2.EchoRequest())]

        ours, theirs = await _both(t, iterate)
    assert isinstance(ours, errors.FailedPreconditionError)
    _same_as_grpc(ours, theirs)


class _Refuse(BasePolicy):
    def enter(self, call: Call) -> Exit | None:
        raise errors.BulkheadFullError("no slot free", retry_after_s=0.5)


async def test_a_client_side_rejection_reads_like_a_server_status() -> None:
    """A client policy's rejection is an AioRpcError whose trailers carry the details."""
    async with serve(EchoServicer(), client_policies=[_Refuse()]) as t:
        with pytest.raises(grpc.RpcError) as caught:
            await t.stub(echo_pb2_grpc.EchoServiceStub).Echo(echo_pb2.EchoRequest())
    error = caught.value
    assert isinstance(error, errors.BulkheadFullError) and not error.remote
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == "no slot free"
    trailing = dict(error.trailing_metadata())
    back = errors.from_status(error.code(), error.details(), list(trailing.items()))
    assert type(back) is errors.BulkheadFullError and back.retry_after_s == 0.5
    assert list(error.initial_metadata()) == []


def test_typed_errors_keep_their_message_and_survive_pickling() -> None:
    """str() is the message, and a pickled error comes back with its code and reason."""
    error = errors.NotFoundError("order 7 not found", reason="ORDER_NOT_FOUND")
    assert str(error) == "order 7 not found"
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is errors.NotFoundError and back.reason == "ORDER_NOT_FOUND"
    assert back.code() is grpc.StatusCode.NOT_FOUND and back.details() == "order 7 not found"


def test_a_subclass_may_still_declare_its_code_as_a_class_attribute() -> None:
    """`code = grpc.StatusCode.X` in a subclass sets its status; code() stays a method."""

    class TeapotError(errors.FrameworkError):
        code = grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[assignment]
        default_reason = "TEAPOT_TEST"

    assert TeapotError.status_code is grpc.StatusCode.FAILED_PRECONDITION
    assert TeapotError("short and stout").code() is grpc.StatusCode.FAILED_PRECONDITION
