"""Client adapter edges: exits run once on every path, cancellation reaches the server."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from framework import errors
from framework.policy import BasePolicy, Call, Exit
from framework.testing import serve
from framework.testing.echo import EchoServicer
from gen.echo.v1 import echo_pb2, echo_pb2_grpc
from tests.framework.recording import RecordingPolicy


class Slots(BasePolicy):
    """Counts calls in flight the way a bulkhead would."""

    def __init__(self) -> None:
        self.in_flight = 0

    def enter(self, call: Call) -> Exit:
        self.in_flight += 1

        def exit_(error: BaseException | None) -> None:
            self.in_flight -= 1

        return exit_


async def test_cancel_runs_the_exits_once() -> None:
    """call.cancel() frees what the enters took, exactly once."""
    slots, log = Slots(), []
    release = asyncio.Event()
    servicer = EchoServicer(release=release)
    async with serve(servicer, client_policies=[slots, RecordingPolicy("c", log)]) as t:
        call = t.stub(echo_pb2_grpc.EchoServiceStub).Echo(echo_pb2.EchoRequest(text="x"))
        await asyncio.wait_for(servicer.started.wait(), 60)
        assert slots.in_flight == 1
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        release.set()
    assert slots.in_flight == 0
    assert log == ["enter:c", "exit:c:CANCELLED"]


async def test_leaving_a_response_stream_early_cancels_it_and_runs_the_exits() -> None:
    """Breaking out of `async for` ends the RPC on the server and frees the slot."""
    slots = Slots()
    log: list[str] = []
    async with serve(
        EchoServicer(), policies=[RecordingPolicy("s", log)], client_policies=[slots]
    ) as t:
        stream = t.stub(echo_pb2_grpc.EchoServiceStub).EchoStream(
            echo_pb2.EchoRequest(text="x", repeat=1000, delay_s=0.001)
        )
        responses = stream.__aiter__()
        first = await responses.__anext__()
        await responses.aclose()
        assert slots.in_flight == 0
        for _ in range(500):  # bounded: the server notices the cancellation
            if len(log) == 2:
                break
            await asyncio.sleep(0.01)
    assert first.text == "x#0"
    assert log == ["enter:s", "exit:s:CANCELLED"]


async def test_exits_run_when_the_channel_is_already_closed() -> None:
    """A call on a closed channel fails, and the enters' exits still run."""
    slots = Slots()
    async with serve(EchoServicer()) as t:
        channel = t.connect(policies=[slots])
        await channel.close()
        with pytest.raises(Exception, match=r"(?i)closed"):
            await echo_pb2_grpc.EchoServiceStub(channel).Echo(echo_pb2.EchoRequest())
    assert slots.in_flight == 0


def test_corrupt_status_details_map_by_code() -> None:
    """Garbage in grpc-status-details-bin does not break error mapping."""
    error = errors.from_status(
        grpc.StatusCode.NOT_FOUND, "gone", ((errors.DETAILS_KEY, b"\xff\x00garbage"),)
    )
    assert type(error) is errors.NotFoundError and error.message == "gone"


class Relay(echo_pb2_grpc.EchoServiceServicer):
    """Calls a downstream Fail and lets its error escape."""

    def __init__(self, error: str) -> None:
        self.error = error
        self.stub: echo_pb2_grpc.EchoServiceStub | None = None

    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> Any:
        assert self.stub is not None
        await self.stub.Fail(echo_pb2.FailRequest(error=self.error, message="downstream says"))


@pytest.mark.parametrize(
    ("downstream", "upstream"),
    [
        ("UnauthenticatedError", errors.InternalError),
        ("PermissionDeniedError", errors.InternalError),
        ("NotFoundError", errors.NotFoundError),
        ("ConflictError", errors.ConflictError),
    ],
)
async def test_downstream_errors_about_our_own_call_are_not_passed_to_the_caller(
    downstream: str, upstream: type[errors.FrameworkError]
) -> None:
    """A dependency's UNAUTHENTICATED becomes INTERNAL; NOT_FOUND/ABORTED pass through."""
    relay = Relay(downstream)
    async with serve(EchoServicer()) as d, serve(relay) as front:
        relay.stub = echo_pb2_grpc.EchoServiceStub(d.connect())
        with pytest.raises(upstream) as caught:
            await front.stub(echo_pb2_grpc.EchoServiceStub).Echo(echo_pb2.EchoRequest())
    assert type(caught.value) is upstream
    if upstream is errors.InternalError:
        assert "downstream says" not in caught.value.message


async def test_error_classes_defined_later_come_back_typed() -> None:
    """A service's own error subclass, defined after first use, is rebuilt on the client."""

    class StockShortError(errors.FailedPreconditionError):
        default_reason = "STOCK_SHORT_TEST"

    status = errors.to_status(StockShortError("only 2 left"))
    back = errors.from_status(status.code, status.message, status.trailing_metadata)
    assert type(back) is StockShortError


class Refuse(BasePolicy):
    """Rejects every call in its enter."""

    def enter(self, call: Call) -> Exit | None:
        raise errors.BulkheadFullError("no slot free for the test")


async def test_a_client_rejection_surfaces_when_the_call_is_awaited() -> None:
    """Like grpc.aio, creating the call never raises; awaiting it does."""
    async with serve(EchoServicer(), client_policies=[Refuse()]) as t:
        call = t.stub(echo_pb2_grpc.EchoServiceStub).Echo(echo_pb2.EchoRequest())
        future = asyncio.ensure_future(call)
        with pytest.raises(errors.BulkheadFullError):
            await future


class RefuseStreams(BasePolicy):
    """A server policy that refuses every client-streaming call before the handler reads."""

    def enter(self, call: Call) -> Exit | None:
        if call.method.name == "Collect":
            raise errors.PermissionDeniedError("streams are not allowed here")
        return None


async def test_a_refusal_racing_the_writes_always_arrives_typed() -> None:
    """The server refuses a client stream at once while the client writes: whatever the
    write meets (still open, already ended, or grpc.aio's own INTERNAL for a send that
    failed in the core), the caller sees the server's PERMISSION_DENIED, never INTERNAL
    or a bare InvalidStateError."""
    async with serve(EchoServicer(), policies=[RefuseStreams()]) as t:
        stub = t.stub(echo_pb2_grpc.EchoServiceStub)
        for attempt in range(300):  # the status grpc.aio overwrites: ~1 attempt in 150
            call = stub.Collect()
            with pytest.raises(errors.PermissionDeniedError, match="not allowed") as raised:
                for index in range(200):
                    await call.write(echo_pb2.EchoRequest(text=f"{attempt}-{index}"))
                await call.done_writing()
                await call
            assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED
            assert await call.code() is grpc.StatusCode.PERMISSION_DENIED
