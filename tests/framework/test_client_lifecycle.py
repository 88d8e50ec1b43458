"""A client call starts once and ends its exits once, however the caller treats it.

Issue #11 items 2, 3 and 7, #22 item 4: with an async enter in the chain (a
waiting bulkhead) a call starts exactly once and `cancel()` before the start
keeps the RPC from ever being sent; exits are tied to the RPC's own end (a call
never awaited, a stream never read or dropped half-way, an outcome read through
`code()`), so bulkhead slots and half-open breaker probes never leak; the
absolute deadline is fixed when the call is created.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Awaitable, Callable

import grpc
import pytest

from framework.clock import ManualClock
from framework.errors import code_of
from framework.policies.breaker import BreakerConfig, BreakerState, CircuitBreakerPolicy
from framework.policies.bulkhead import BulkheadConfig, BulkheadPolicy
from framework.policy import BasePolicy, Call, Exit
from framework.testing import serve
from framework.testing.echo import EchoServicer
from gen.echo.v1 import echo_pb2, echo_pb2_grpc
from tests.framework.recording import RecordingPolicy


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Poll (bounded) until `condition()` holds."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting until {what}")


def _in_flight(policy: BulkheadPolicy) -> int:
    return sum(b.in_flight for b in policy._by_target.values())


def _waiting(policy: BulkheadPolicy) -> int:
    return sum(b.waiting for b in policy._by_target.values())


async def _response(call: Awaitable[echo_pb2.EchoResponse]) -> echo_pb2.EchoResponse:
    return await call


def _waiting_bulkhead(slots: int = 1) -> BulkheadPolicy:
    """A client bulkhead whose enter awaits a slot (the async path)."""
    return BulkheadPolicy(BulkheadConfig(max_concurrency=slots, max_wait_s=30))


# ------------------------------------------------------------ start once (#11 item 2)


async def test_two_awaiters_of_one_call_share_one_rpc() -> None:
    """With an async enter, two tasks awaiting one call start one RPC and free one slot."""
    bulkhead = _waiting_bulkhead()
    release = asyncio.Event()
    servicer = EchoServicer(release=release)
    async with serve(servicer, client_policies=[bulkhead]) as t:
        stub = t.stub(echo_pb2_grpc.EchoServiceStub)
        holder = asyncio.ensure_future(_response(stub.Echo(echo_pb2.EchoRequest(text="holder"))))
        await _until(lambda: servicer.calls.get("Echo") == 1, "the holder reached the server")
        call = stub.Echo(echo_pb2.EchoRequest(text="once"))

        async def wait() -> echo_pb2.EchoResponse:
            return await call

        both = asyncio.gather(wait(), wait())
        await _until(lambda: _waiting(bulkhead) >= 1, "the call waits for a slot")
        release.set()
        first, second = await both
        await holder
    assert first.text == second.text == "once"
    assert servicer.calls == {"Echo": 2}  # the holder and one RPC for the shared call
    assert _in_flight(bulkhead) == 0 and _waiting(bulkhead) == 0


async def test_two_readers_of_one_stream_share_one_rpc() -> None:
    """Two tasks reading one streamed call through an async chain start it once."""
    bulkhead = _waiting_bulkhead()
    release = asyncio.Event()
    servicer = EchoServicer(release=release)
    async with serve(servicer, client_policies=[bulkhead]) as t:
        stub = t.stub(echo_pb2_grpc.EchoServiceStub)
        holder = asyncio.ensure_future(_response(stub.Echo(echo_pb2.EchoRequest(text="holder"))))
        await _until(lambda: servicer.calls.get("Echo") == 1, "the holder reached the server")
        call = stub.EchoStream(echo_pb2.EchoRequest(text="s", repeat=2))
        both = asyncio.gather(call.read(), call.read())
        await _until(lambda: _waiting(bulkhead) >= 1, "the stream waits for a slot")
        release.set()
        first, second = await both
        assert await call.read() is grpc.aio.EOF
        await holder
        await _until(lambda: _in_flight(bulkhead) == 0, "the stream's slot is free")
    assert sorted([first.text, second.text]) == ["s#0", "s#1"]
    assert servicer.calls == {"Echo": 1, "EchoStream": 1}
    assert _waiting(bulkhead) == 0


async def test_cancel_before_the_start_never_sends_the_rpc() -> None:
    """cancel() while waiting for a slot returns True; the RPC is never sent; exits once."""
    bulkhead = _waiting_bulkhead()
    release = asyncio.Event()
    servicer = EchoServicer(release=release)
    log: list[str] = []
    async with serve(servicer, client_policies=[RecordingPolicy("c", log), bulkhead]) as t:
        stub = t.stub(echo_pb2_grpc.EchoServiceStub)
        holder = stub.Echo(echo_pb2.EchoRequest(text="holder"))
        await _until(lambda: servicer.calls.get("Echo") == 1, "the holder reached the server")
        queued = stub.Echo(echo_pb2.EchoRequest(text="queued"))
        await _until(lambda: _waiting(bulkhead) == 1, "the second call waits for a slot")
        assert queued.cancel() is True
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert queued.cancelled() and await queued.code() is grpc.StatusCode.CANCELLED
        release.set()
        assert (await holder).text == "holder"
        # FIFO bulkhead: had the cancelled call still been queued, it would run first
        assert (await stub.Echo(echo_pb2.EchoRequest(text="after"))).text == "after"
    assert servicer.calls == {"Echo": 2}
    assert log.count("exit:c:CANCELLED") == 1
    assert log == ["enter:c", "enter:c", "exit:c:CANCELLED", "exit:c:OK", "enter:c", "exit:c:OK"]
    assert _in_flight(bulkhead) == 0


# ------------------------------------------ exits tied to the RPC (#11 item 3, #22 item 4)


async def test_a_unary_call_never_awaited_frees_its_slot() -> None:
    """The exits run when the RPC ends, even if nobody awaits the call."""
    bulkhead = BulkheadPolicy(BulkheadConfig(max_concurrency=4))
    log: list[str] = []
    async with serve(EchoServicer(), client_policies=[RecordingPolicy("c", log), bulkhead]) as t:
        call = t.stub(echo_pb2_grpc.EchoServiceStub).Echo(echo_pb2.EchoRequest())
        await _until(lambda: _in_flight(bulkhead) == 0, "the un-awaited call's slot is free")
        assert log == ["enter:c", "exit:c:OK"]
        assert await call.code() is grpc.StatusCode.OK
    assert log == ["enter:c", "exit:c:OK"]


async def test_a_stream_never_iterated_frees_its_slot() -> None:
    """A streamed call nobody reads ends its exits when the RPC ends (here, its deadline)."""
    bulkhead = BulkheadPolicy(BulkheadConfig(max_concurrency=4))
    log: list[str] = []
    async with serve(EchoServicer(), client_policies=[RecordingPolicy("c", log), bulkhead]) as t:
        call = t.stub(echo_pb2_grpc.EchoServiceStub).EchoStream(
            echo_pb2.EchoRequest(repeat=5, delay_s=30), timeout=0.2
        )
        await _until(lambda: _in_flight(bulkhead) == 0, "the unread stream's slot is free")
        assert await call.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert log == ["enter:c", "exit:c:DEADLINE_EXCEEDED"]


async def test_a_stream_read_once_then_dropped_frees_its_slot() -> None:
    """Read one message, drop the call: the RPC is cancelled and the exits run once."""
    bulkhead = BulkheadPolicy(BulkheadConfig(max_concurrency=4))
    log: list[str] = []
    async with serve(EchoServicer(), client_policies=[RecordingPolicy("c", log), bulkhead]) as t:
        call = t.stub(echo_pb2_grpc.EchoServiceStub).EchoStream(
            echo_pb2.EchoRequest(repeat=1000, delay_s=0.01)
        )
        assert (await call.read()).text == "#0"
        del call
        gc.collect()
        await _until(lambda: _in_flight(bulkhead) == 0, "the dropped stream's slot is free")
    assert log == ["enter:c", "exit:c:CANCELLED"]


async def test_an_outcome_read_with_code_and_details_runs_the_exits() -> None:
    """grpc-style code reads code()/details()/trailing_metadata(); exits see that outcome."""
    seen: list[grpc.StatusCode] = []

    class Outcome(BasePolicy):
        def enter(self, call: Call) -> Exit:
            return lambda error: seen.append(code_of(error))

    async with serve(EchoServicer(), client_policies=[Outcome()]) as t:
        call = t.stub(echo_pb2_grpc.EchoServiceStub).Fail(
            echo_pb2.FailRequest(error="NotFoundError", message="no such order")
        )
        assert await call.code() is grpc.StatusCode.NOT_FOUND
        assert await call.details() == "no such order"
        assert any(k == "grpc-status-details-bin" for k, _ in await call.trailing_metadata())
        assert seen == [grpc.StatusCode.NOT_FOUND]


async def test_a_half_open_probe_read_through_code_closes_the_breaker() -> None:
    """A half-open probe whose outcome is read with code() is recorded; the breaker closes."""
    clock = ManualClock()
    breaker = CircuitBreakerPolicy(
        BreakerConfig(window_size=2, min_calls=2, open_wait_s=1.0, half_open_probes=1),
        clock=clock,
    )
    async with serve(EchoServicer(), client_policies=[breaker]) as t:
        stub = t.stub(echo_pb2_grpc.EchoServiceStub)
        for _ in range(2):  # two timeouts open it
            with pytest.raises(grpc.RpcError):
                await stub.Echo(echo_pb2.EchoRequest(delay_s=30), timeout=0.05)
        (echo,) = breaker.breakers()
        assert echo.state is BreakerState.OPEN
        clock.advance(1.0)
        probe = stub.Echo(echo_pb2.EchoRequest(text="probe"))
        assert echo.state is BreakerState.HALF_OPEN
        assert await probe.code() is grpc.StatusCode.OK  # never awaited for its response
        assert echo.state is BreakerState.CLOSED
        assert (await stub.Echo(echo_pb2.EchoRequest(text="next"))).text == "next"


# ------------------------------------------------ the deadline is fixed first (#11 item 7)


class _Remaining(BasePolicy):
    """Records what an outer policy sees of the call's deadline."""

    def __init__(self) -> None:
        self.seen: list[float | None] = []

    def enter(self, call: Call) -> None:
        self.seen.append(call.time_remaining())


async def test_outer_policies_see_the_deadline_of_a_call_without_a_timeout() -> None:
    """A call with no timeout gets its method's timeout_s before the first policy runs."""
    outer = _Remaining()
    async with serve(EchoServicer(), client_policies=[outer]) as t:
        reply = await t.stub(echo_pb2_grpc.EchoServiceStub).Echo(echo_pb2.EchoRequest())
    (remaining,) = outer.seen
    assert remaining is not None and 0 < remaining <= 10.0  # Echo's contract: timeout_s 10
    # grpc sends the timeout rounded up to 3 significant digits: 10.0xx s goes out as 10.1 s
    assert 0 < reply.deadline_remaining_s <= 10.1


async def test_time_waiting_in_an_async_enter_counts_against_the_timeout() -> None:
    """The server's deadline is the caller's timeout minus the time spent in the bulkhead."""
    bulkhead = _waiting_bulkhead()
    release = asyncio.Event()
    servicer = EchoServicer(release=release)
    timeout = 5.0
    async with serve(servicer, client_policies=[bulkhead]) as t:
        stub = t.stub(echo_pb2_grpc.EchoServiceStub)
        holder = stub.Echo(echo_pb2.EchoRequest(text="holder"))
        await _until(lambda: servicer.calls.get("Echo") == 1, "the holder reached the server")
        queued = stub.Echo(echo_pb2.EchoRequest(text="queued"), timeout=timeout)
        created = time.monotonic()  # the call was created before this instant
        await _until(lambda: _waiting(bulkhead) == 1, "the second call waits for a slot")
        await asyncio.sleep(0.3)  # time passes while the call holds no slot
        waited = time.monotonic() - created  # the RPC can only start after this instant
        release.set()
        await holder
        reply = await queued
    # grpc's deadline on the server is what was left of the caller's timeout when the
    # RPC started, so about `timeout - waited` (before: the whole timeout again); half
    # of `waited` leaves room for grpc rounding the timeout it sends up (3 digits)
    assert reply.deadline_remaining_s <= timeout - waited / 2
