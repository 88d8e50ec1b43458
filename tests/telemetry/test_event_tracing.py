"""Trace context flows RPC -> Repository.save -> stored event -> consumer / projection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from framework.events.aggregate import Repository
from framework.events.consumer import consume
from framework.events.consumer_group import StoreBus
from framework.events.projection import ProjectionRunner
from framework.events.sqlite import SqliteConfig, SqliteEventStore
from framework.events.store import EventMetadata, RecordedEvent
from framework.telemetry.sdk import Telemetry
from framework.telemetry.tracing import current_trace_ids
from framework.testing import serve
from gen.echo.v1 import echo_pb2, echo_pb2_grpc
from gen.events.v1.envelope_pb2 import EventEnvelope
from gen.events.v1.testing_pb2 import AccountOpened, AmountDeposited
from tests.events.account import Account, account_types


class OpenAccounts(echo_pb2_grpc.EchoServiceServicer):
    """Echo(text) opens account `text` through the repository; no metadata built by hand."""

    def __init__(self, repository: Repository[Account]) -> None:
        self.repository = repository

    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        account = Account(request.text)
        account.open(owner="ada")
        result = await self.repository.save(account)
        assert result is not None
        return echo_pb2.EchoResponse(text=str(result.positions[0]))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteEventStore]:
    """A SQLite event store in this test's own directory."""
    opened = await SqliteEventStore.open(
        SqliteConfig(path=str(tmp_path / "events.db")), account_types()
    )
    yield opened
    await opened.close()


def spans(telemetry: Telemetry) -> list[ReadableSpan]:
    assert isinstance(telemetry.span_exporter, InMemorySpanExporter)
    return list(telemetry.span_exporter.get_finished_spans())


async def _wait_for(predicate: Any, timeout_s: float = 10.0) -> None:
    """Poll (bounded) until `predicate()` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


async def test_consumer_span_joins_the_rpc_that_saved_the_aggregate(
    telemetry: Telemetry, store: SqliteEventStore
) -> None:
    """RPC saves an aggregate; the StoreBus consumer's span is a child of the RPC's server span."""
    bus = StoreBus(store)
    handled: list[tuple[str, tuple[str, str] | None]] = []

    async def handler(envelope: EventEnvelope) -> None:
        handled.append((envelope.stream_id, current_trace_ids()))

    subscription = await bus.subscribe("billing")
    task = asyncio.create_task(
        consume(subscription, handler, tracer_provider=telemetry.tracer_provider)
    )
    try:
        servicer = OpenAccounts(Repository(store, Account))
        async with serve(servicer, policies=telemetry.policies()) as t:
            reply = await t.stub(echo_pb2_grpc.EchoServiceStub).Echo(
                echo_pb2.EchoRequest(text="acc-1")
            )
        await _wait_for(lambda: len(handled) == 1)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await bus.close()
    assert reply.text == "1"
    server = [s for s in spans(telemetry) if s.kind is SpanKind.SERVER]
    consumer = [s for s in spans(telemetry) if s.kind is SpanKind.CONSUMER]
    assert len(server) == 1 and len(consumer) == 1
    rpc, handling = server[0], consumer[0]
    assert handling.context.trace_id == rpc.context.trace_id
    assert handling.parent is not None and handling.parent.span_id == rpc.context.span_id
    assert [link.context.span_id for link in handling.links] == [rpc.context.span_id]
    assert handled == [
        ("acc-1", (f"{rpc.context.trace_id:032x}", f"{handling.context.span_id:016x}"))
    ]
    stored = (await store.read_stream("acc-1"))[0].metadata
    assert stored.traceparent.startswith(
        f"00-{rpc.context.trace_id:032x}-{rpc.context.span_id:016x}-"
    )


async def test_repository_keeps_given_context_and_correlation(
    telemetry: Telemetry, store: SqliteEventStore
) -> None:
    """A caller's traceparent is kept; correlation ids survive the filling of the others."""
    assert telemetry.tracer_provider is not None
    tracer = telemetry.tracer_provider.get_tracer("test")
    given = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    account = Account("acc-2")
    account.emit(AccountOpened(owner="x"), EventMetadata(traceparent=given, correlation_id="c1"))
    account.emit(AmountDeposited(amount=5), EventMetadata(correlation_id="c2"))
    with tracer.start_as_current_span("command") as span:
        await Repository(store, Account).save(account)
    first, second = (e.metadata for e in await store.read_stream("acc-2"))
    assert (first.traceparent, first.correlation_id) == (given, "c1")
    ctx = span.get_span_context()
    assert second.traceparent.startswith(f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-")
    assert second.correlation_id == "c2"


async def test_repository_outside_a_span_adds_nothing(store: SqliteEventStore) -> None:
    """Saved outside any span, events carry no trace context."""
    account = Account("acc-3")
    account.open("x")
    await Repository(store, Account).save(account)
    assert (await store.read_stream("acc-3"))[0].metadata.traceparent == ""


class Owners:
    """Read model: account -> owner, in a table of the store's database."""

    name = "owners"

    def __init__(self) -> None:
        self.trace_ids: list[tuple[str, str] | None] = []

    async def create(self, store: SqliteEventStore) -> None:
        async with store.transaction() as tx:
            await tx.execute("CREATE TABLE IF NOT EXISTS owners (id TEXT PRIMARY KEY, owner TEXT)")

    async def apply(self, tx: Any, event: RecordedEvent) -> None:
        self.trace_ids.append(current_trace_ids())
        if event.type == AccountOpened.DESCRIPTOR.full_name:
            owner = AccountOpened.FromString(event.payload).owner
            await tx.execute("INSERT INTO owners VALUES (?, ?)", (event.stream_id, owner))

    async def reset(self, tx: Any) -> None:
        await tx.execute("DELETE FROM owners")


async def test_projection_live_joins_trace_and_rebuild_only_links(
    telemetry: Telemetry, store: SqliteEventStore
) -> None:
    """Live projection spans are children of the RPC span; rebuild spans start new traces + link."""
    owners = Owners()
    await owners.create(store)
    runner = ProjectionRunner(store, owners, tracer_provider=telemetry.tracer_provider)
    stop = asyncio.Event()
    live = asyncio.create_task(runner.run(stop))
    await asyncio.wait_for(runner.live.wait(), 10)  # events from now on are live, not catch-up
    try:
        async with serve(
            OpenAccounts(Repository(store, Account)), policies=telemetry.policies()
        ) as t:
            await t.stub(echo_pb2_grpc.EchoServiceStub).Echo(echo_pb2.EchoRequest(text="acc-9"))
        await _wait_for(lambda: len(owners.trace_ids) == 1)
    finally:
        stop.set()
        await live
    rpc = next(s for s in spans(telemetry) if s.kind is SpanKind.SERVER)
    projected = [s for s in spans(telemetry) if s.kind is SpanKind.CONSUMER]
    assert len(projected) == 1
    assert projected[0].name == "project events.v1.testing.AccountOpened"
    assert projected[0].context.trace_id == rpc.context.trace_id
    assert projected[0].parent is not None and projected[0].parent.span_id == rpc.context.span_id
    assert projected[0].attributes is not None
    assert projected[0].attributes["projection.name"] == "owners"

    assert await runner.rebuild() == 1
    rebuilt = [s for s in spans(telemetry) if s.kind is SpanKind.CONSUMER][1:]
    assert len(rebuilt) == 1
    assert rebuilt[0].context.trace_id != rpc.context.trace_id
    assert rebuilt[0].parent is None
    assert [link.context.span_id for link in rebuilt[0].links] == [rpc.context.span_id]
    async with store.transaction() as tx:
        assert await tx.fetchall("SELECT id, owner FROM owners") == [("acc-9", "ada")]
