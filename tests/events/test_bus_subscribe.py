"""gRPC streaming Subscribe: catch-up then live, flow control, cancellation, bad input."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from framework.errors import InvalidArgumentError, code_of
from framework.events.consumer_group import StoreBus, StoreBusConfig
from framework.events.service import EventStoreServicer
from framework.events.sqlite import SqliteConfig, SqliteEventStore
from framework.events.store import NewEvent
from framework.events.subscribe import SubscribeConfig, SubscribeMixin
from framework.events.typeregistry import EventTypeRegistry
from framework.testing import serve
from gen.events.v1 import testing_pb2
from gen.events.v1.envelope_pb2 import EventEnvelope
from gen.events.v1.store_pb2 import AppendRequest, ProposedEvent, SubscribeRequest
from gen.events.v1.store_pb2_grpc import EventStoreServiceServicer, EventStoreServiceStub
from gen.events.v1.testing_pb2 import AccountOpened, AmountDeposited


class _Servicer(SubscribeMixin, EventStoreServiceServicer):
    def __init__(self, bus: StoreBus, window: int) -> None:
        self.bus = bus
        self.subscribe_config = SubscribeConfig(window=window, fetch_timeout_s=0.1)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteEventStore]:
    """A SQLite event store in this test's own directory."""
    store = await SqliteEventStore.open(
        SqliteConfig(path=str(tmp_path / "events.db"), synchronous="NORMAL"),
        EventTypeRegistry.from_modules(testing_pb2),
    )
    yield store
    await store.close()


@pytest.fixture
async def buses(store: SqliteEventStore) -> AsyncIterator[list[StoreBus]]:
    """StoreBus instances made by the test, closed before the store closes."""
    made: list[StoreBus] = []
    yield made
    for bus in made:
        await bus.close()


def _bus(buses: list[StoreBus], store: SqliteEventStore, **config: float) -> StoreBus:
    bus = StoreBus(store, StoreBusConfig(**config))  # type: ignore[arg-type]
    buses.append(bus)
    return bus


async def _append(store: SqliteEventStore, stream: str, deposits: int) -> None:
    events = [NewEvent.of(AccountOpened(owner=stream))]
    events += [NewEvent.of(AmountDeposited(amount=i)) for i in range(1, deposits + 1)]
    await store.append(stream, events, 0, aggregate_type="Account")


def _start(group: str, after: int = 0) -> SubscribeRequest:
    return SubscribeRequest(start=SubscribeRequest.Start(group=group, after_position=after))


def _ack(position: int) -> SubscribeRequest:
    return SubscribeRequest(ack=SubscribeRequest.Ack(position=position))


async def _read(call: Any, count: int) -> list[EventEnvelope]:
    out: list[EventEnvelope] = []
    for _ in range(count):
        async with asyncio.timeout(5):
            out.append(await call.read())
    return out


async def test_catch_up_then_live(store: SqliteEventStore, buses: list[StoreBus]) -> None:
    """The stream sends the stored backlog, then events appended while it is open."""
    await _append(store, "a", 2)
    bus = _bus(buses, store, poll_interval_s=0.05)
    async with serve(_Servicer(bus, window=16)) as t:
        call = t.stub(EventStoreServiceStub).Subscribe()
        await call.write(_start("g"))
        backlog = await _read(call, 3)
        for envelope in backlog:
            await call.write(_ack(envelope.position))
        await _append(store, "b", 1)
        live = await _read(call, 2)
        for envelope in live:
            await call.write(_ack(envelope.position))
        await call.done_writing()
        async with asyncio.timeout(5):
            code = await call.code()  # the server ends the stream when the client half-closes
    await bus.flush()
    position = await store.load_checkpoint("group:g")
    assert [e.position for e in backlog + live] == [1, 2, 3, 4, 5]
    assert [e.stream_id for e in live] == ["b", "b"]
    assert position == 5
    assert code == grpc.StatusCode.OK


async def test_window_limits_unacked_events(store: SqliteEventStore, buses: list[StoreBus]) -> None:
    """With window 2 the server sends two events, then the next only after an ack."""
    await _append(store, "a", 4)
    bus = _bus(buses, store)
    async with serve(_Servicer(bus, window=2)) as t:
        call = t.stub(EventStoreServiceStub).Subscribe()
        await call.write(_start("g"))
        first = await _read(call, 2)
        held = asyncio.ensure_future(call.read())
        done, _ = await asyncio.wait([held], timeout=0.3)
        assert not done  # nothing beyond the window
        await call.write(_ack(first[0].position))
        async with asyncio.timeout(5):
            third = await held
        call.cancel()
    assert [e.position for e in [*first, third]] == [1, 2, 3]


async def test_cancel_returns_unacked_events_to_the_group(
    store: SqliteEventStore, buses: list[StoreBus]
) -> None:
    """A cancelled subscriber's unacked events are delivered to the group's next member."""
    await _append(store, "a", 2)
    bus = _bus(buses, store)
    async with serve(_Servicer(bus, window=16)) as t:
        stub = t.stub(EventStoreServiceStub)
        first = stub.Subscribe()
        await first.write(_start("g"))
        got = await _read(first, 3)
        await first.write(_ack(got[0].position))
        first.cancel()
        second = stub.Subscribe()
        await second.write(_start("g"))
        again = await _read(second, 2)
        second.cancel()
    assert [e.position for e in again] == [2, 3]
    assert again[0] == got[1]


async def test_stream_must_start_with_start(store: SqliteEventStore, buses: list[StoreBus]) -> None:
    """An ack before start, or a bad group name, ends the call with INVALID_ARGUMENT."""
    bus = _bus(buses, store)
    async with serve(_Servicer(bus, window=16)) as t:
        stub = t.stub(EventStoreServiceStub)
        codes = []
        for opening in (_ack(1), _start("bad group"), _start("g", after=-1)):
            call = stub.Subscribe()
            await call.write(opening)
            with pytest.raises(InvalidArgumentError) as caught:
                async with asyncio.timeout(5):
                    await call.read()
            codes.append(code_of(caught.value))
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 3


async def test_event_store_service_appends_reach_subscribers(
    store: Any, buses: list[StoreBus]
) -> None:
    """Through EventStoreServicer: events appended over gRPC reach an open Subscribe stream."""
    bus = _bus(buses, store, poll_interval_s=0.05)
    async with serve(EventStoreServicer(store, bus=bus)) as t:
        stub = t.stub(EventStoreServiceStub)
        call = stub.Subscribe()
        await call.write(_start("remote"))
        opened = AccountOpened(owner="zoe")
        proposed = ProposedEvent(
            type=opened.DESCRIPTOR.full_name, payload=opened.SerializeToString()
        )
        request = AppendRequest(
            stream_id="z", aggregate_type="Account", expected_version=0, events=[proposed]
        )
        await stub.Append(request)
        (got,) = await _read(call, 1)
        await call.write(_ack(got.position))
        call.cancel()
    assert (got.stream_id, got.version, got.aggregate_type) == ("z", 1, "Account")
    assert AccountOpened.FromString(got.payload) == opened
