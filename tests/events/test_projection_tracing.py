"""ProjectionRunner spans: one per event, link-only on catch-up, errors recorded, opt-out."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from framework.events.projection import ProjectionConfig, ProjectionRunner
from framework.events.sqlite import SqliteConfig, SqliteEventStore
from framework.events.store import EventMetadata, NewEvent, RecordedEvent
from framework.telemetry.tracing import trace_fields
from gen.events.v1.testing_pb2 import AmountDeposited
from tests.events.account import account_types


class Sum:
    """Read model: one row holding the sum of deposits; fails on amount 13."""

    name = "sum"

    async def apply(self, tx: Any, event: RecordedEvent) -> None:
        amount = AmountDeposited.FromString(event.payload).amount
        if amount == 13:
            raise RuntimeError("unlucky deposit")
        await tx.execute("UPDATE total SET value = value + ?", (amount,))

    async def reset(self, tx: Any) -> None:
        await tx.execute("CREATE TABLE IF NOT EXISTS total (value INTEGER)")
        await tx.execute("DELETE FROM total")
        await tx.execute("INSERT INTO total VALUES (0)")


@pytest.fixture
def provider() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """A tracer provider exporting finished spans into memory."""
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield tracer_provider, exporter
    tracer_provider.shutdown()


async def _store(tmp_path: Path) -> SqliteEventStore:
    return await SqliteEventStore.open(
        SqliteConfig(path=str(tmp_path / "events.db")), account_types()
    )


def _consumer(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind is SpanKind.CONSUMER]


async def test_catch_up_spans_link_to_the_recording_span(
    tmp_path: Path, provider: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """Catch-up makes one span per event, each a new trace linking to the recording span."""
    tracer_provider, exporter = provider
    store = await _store(tmp_path)
    try:
        with tracer_provider.get_tracer("t").start_as_current_span("command") as command:
            meta = EventMetadata(**trace_fields())
        events = [NewEvent.of(AmountDeposited(amount=n), meta) for n in (1, 2)]
        await store.append("acc", events, 0)
        runner = ProjectionRunner(store, Sum(), tracer_provider=tracer_provider)
        assert await runner.rebuild() == 2
        async with store.transaction() as tx:
            assert await tx.fetchone("SELECT value FROM total") == (3,)
    finally:
        await store.close()
    spans = _consumer(exporter)
    recorded = command.get_span_context()
    assert [s.attributes["event.position"] for s in spans if s.attributes] == [1, 2]
    assert all(s.parent is None for s in spans)
    assert all(s.context.trace_id != recorded.trace_id for s in spans)
    assert all([link.context.span_id for link in s.links] == [recorded.span_id] for s in spans)


async def test_failing_apply_is_an_error_span_and_nothing_moves(
    tmp_path: Path, provider: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """A raising apply marks its span ERROR; the read model and checkpoint roll back."""
    tracer_provider, exporter = provider
    store = await _store(tmp_path)
    try:
        runner = ProjectionRunner(store, Sum(), tracer_provider=tracer_provider)
        await runner.rebuild()
        events = [NewEvent.of(AmountDeposited(amount=n)) for n in (5, 13)]
        await store.append("acc", events, 0)
        with pytest.raises(RuntimeError, match="unlucky"):
            await runner.step()
        async with store.transaction() as tx:
            assert await tx.fetchone("SELECT value FROM total") == (0,)
        assert await store.load_checkpoint("sum") == 0
    finally:
        await store.close()
    spans = _consumer(exporter)
    assert [s.status.status_code for s in spans] == [StatusCode.UNSET, StatusCode.ERROR]


async def test_trace_false_makes_no_spans(
    tmp_path: Path, provider: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """With trace=False the runner applies events without any span."""
    tracer_provider, exporter = provider
    store = await _store(tmp_path)
    try:
        await store.append("acc", [NewEvent.of(AmountDeposited(amount=4))], 0)
        runner = ProjectionRunner(store, Sum(), trace=False, tracer_provider=tracer_provider)
        assert await runner.rebuild() == 1
    finally:
        await store.close()
    assert exporter.get_finished_spans() == ()


class BatchSum(Sum):
    """Sum with `apply_batch`: one statement per page."""

    async def apply_batch(self, tx: Any, events: Sequence[RecordedEvent]) -> None:
        total = sum(AmountDeposited.FromString(e.payload).amount for e in events)
        await tx.execute("UPDATE total SET value = value + ?", (total,))


async def test_batched_rebuild_makes_one_span_per_page(
    tmp_path: Path, provider: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """A BatchProjection's rebuild: one CONSUMER span per page, linked to its first event."""
    tracer_provider, exporter = provider
    store = await _store(tmp_path)
    try:
        with tracer_provider.get_tracer("t").start_as_current_span("command") as command:
            meta = EventMetadata(**trace_fields())
        events = [NewEvent.of(AmountDeposited(amount=n), meta) for n in range(1, 6)]
        await store.append("acc", events, 0)
        config = ProjectionConfig(batch_size=2)
        runner = ProjectionRunner(store, BatchSum(), config, tracer_provider=tracer_provider)
        assert await runner.rebuild() == 5
        async with store.transaction() as tx:
            assert await tx.fetchone("SELECT value FROM total") == (15,)
    finally:
        await store.close()
    spans = _consumer(exporter)
    recorded = command.get_span_context()
    assert [s.name for s in spans] == ["project batch sum"] * 3
    assert [dict(s.attributes or {})["projection.batch_size"] for s in spans] == [2, 2, 1]
    assert all(s.parent is None for s in spans)
    assert all([link.context.span_id for link in s.links] == [recorded.span_id] for s in spans)
