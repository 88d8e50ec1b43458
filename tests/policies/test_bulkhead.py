"""Bulkhead: exactly the calls above the cap are rejected, server per method, client per target."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from framework.errors import BulkheadFullError
from framework.policies.bulkhead import Bulkhead, BulkheadConfig, BulkheadPolicy
from framework.testing import serve
from framework.testing.echo import EchoServicer
from gen.echo.v1.echo_pb2 import EchoRequest, EchoResponse
from gen.echo.v1.echo_pb2_grpc import EchoServiceStub


async def _until(predicate: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.002)


async def _echo(stub: EchoServiceStub, text: str) -> EchoResponse:
    return await stub.Echo(EchoRequest(text=text))


def _outcomes(results: list[object]) -> tuple[int, int]:
    rejected = sum(isinstance(r, BulkheadFullError) for r in results)
    others = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, BulkheadFullError) for r in others), others
    return len(results) - rejected, rejected


async def test_server_rejects_exactly_the_calls_above_the_cap() -> None:
    """With 3 slots held, 8 concurrent calls give 3 answers and exactly 5 BULKHEAD_FULL."""
    release = asyncio.Event()
    servicer = EchoServicer(release=release)
    policy = BulkheadPolicy(BulkheadConfig(max_concurrency=3))
    async with serve(servicer, policies=[policy]) as t:
        stub = t.stub(EchoServiceStub)
        tasks = [asyncio.ensure_future(_echo(stub, str(i))) for i in range(8)]
        await _until(lambda: sum(task.done() for task in tasks) == 5)
        assert servicer.calls["Echo"] == 3
        release.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert _outcomes(results) == (3, 5)
        errors = [r for r in results if isinstance(r, BulkheadFullError)]
        assert errors[0].reason == "BULKHEAD_FULL" and errors[0].retry_after_s == 0.05
        # Another method has its own compartment, and freed slots are reusable.
        assert (await stub.Echo(EchoRequest(text="again"))).text == "again"


async def test_client_caps_calls_per_target() -> None:
    """A client bulkhead of 2 rejects the third concurrent call before it leaves the process."""
    release = asyncio.Event()
    servicer = EchoServicer(release=release)
    client = BulkheadPolicy(BulkheadConfig(max_concurrency=2))
    async with serve(servicer, client_policies=[client]) as t:
        stub = t.stub(EchoServiceStub)
        tasks = [asyncio.ensure_future(_echo(stub, str(i))) for i in range(5)]
        await _until(lambda: sum(task.done() for task in tasks) == 3)
        release.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert _outcomes(results) == (2, 3)
        assert servicer.calls["Echo"] == 2


class OrderedEcho(EchoServicer):
    """Echo that records the order in which handlers start."""

    def __init__(self, release: asyncio.Event) -> None:
        super().__init__(release=release)
        self.order: list[str] = []

    async def Echo(self, request: EchoRequest, context: Any) -> EchoResponse:
        self.order.append(request.text)
        return await super().Echo(request, context)


async def test_waiting_bulkhead_queues_in_order_and_bounds_the_queue() -> None:
    """With max_wait_s, calls wait for a freed slot and get it first come, first served;
    beyond max_waiting a call is rejected."""
    release = asyncio.Event()
    servicer = OrderedEcho(release)
    policy = BulkheadPolicy(BulkheadConfig(max_concurrency=1, max_wait_s=600.0, max_waiting=2))
    async with serve(servicer, policies=[policy]) as t:
        stub = t.stub(EchoServiceStub)
        compartment = policy._by_method["/echo.v1.EchoService/Echo"]
        first = asyncio.ensure_future(_echo(stub, "first"))
        await _until(lambda: servicer.order == ["first"])
        second = asyncio.ensure_future(_echo(stub, "second"))
        await _until(lambda: compartment.waiting == 1)
        third = asyncio.ensure_future(_echo(stub, "third"))
        await _until(lambda: compartment.waiting == 2)
        with pytest.raises(BulkheadFullError):
            await stub.Echo(EchoRequest(text="fourth"))
        release.set()
        replies = [(await call).text for call in (first, second, third)]
    assert replies == ["first", "second", "third"]
    assert servicer.order == ["first", "second", "third"]  # the queue is FIFO


async def test_wait_gives_up_after_max_wait_s() -> None:
    """A waiter that gets no slot within max_wait_s is rejected and leaves the queue."""
    bulkhead = Bulkhead(BulkheadConfig(max_concurrency=1, max_wait_s=0.05), "b")
    bulkhead.acquire()
    started = time.monotonic()
    with pytest.raises(BulkheadFullError):
        await bulkhead.wait(None)
    assert time.monotonic() - started >= 0.05
    bulkhead.release()
    assert bulkhead.in_flight == 0 and bulkhead.try_acquire()


async def test_cancelled_waiter_passes_its_slot_on() -> None:
    """A waiter cancelled after being handed a slot releases it to the next waiter."""
    bulkhead = Bulkhead(BulkheadConfig(max_concurrency=1, max_wait_s=10.0), "b")
    bulkhead.acquire()
    first = asyncio.ensure_future(bulkhead.wait(None))
    second = asyncio.ensure_future(bulkhead.wait(None))
    await _until(lambda: bulkhead.waiting == 2)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    bulkhead.release()
    await asyncio.wait_for(second, 60.0)
    assert bulkhead.in_flight == 1
