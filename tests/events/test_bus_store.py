"""The embedded event bus: consumer groups as durable cursors over the store (both backends)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from framework.errors import FailedPreconditionError, InvalidArgumentError
from framework.events.bus import Delivery
from framework.events.consumer import IdempotentHandler, consume
from framework.events.consumer_group import StoreBus, StoreBusConfig, StoreSubscription
from framework.events.envelope import to_envelope
from framework.events.store import EventMetadata, NewEvent
from framework.telemetry.tracing import trace_fields
from gen.events.v1.envelope_pb2 import EventEnvelope
from gen.events.v1.testing_pb2 import AccountOpened, AmountDeposited
from tests.events.conftest import Backend

DEPOSITED = AmountDeposited.DESCRIPTOR.full_name


async def _append(store: Any, stream: str, deposits: int) -> None:
    events = [NewEvent.of(AccountOpened(owner=stream))]
    events += [NewEvent.of(AmountDeposited(amount=i)) for i in range(1, deposits + 1)]
    await store.append(stream, events, 0, aggregate_type="Account")


async def _take(sub: StoreSubscription, want: int, ack: bool = True) -> list[Delivery]:
    """Fetch until `want` deliveries arrived (bounded), acking them if asked."""
    got: list[Delivery] = []
    for _ in range(100):
        if len(got) >= want:
            break
        batch = await sub.fetch(max_count=want - len(got), timeout_s=0.2)
        for delivery in batch:
            if ack:
                await delivery.ack()
        got += batch
    return got


async def test_every_group_gets_every_event_in_store_order(store: Any) -> None:
    """Two groups each receive all events, in global position order."""
    await _append(store, "a", 3)
    await _append(store, "b", 2)
    bus = StoreBus(store)
    one = await bus.subscribe("one")
    two = await bus.subscribe("two")
    got_one = await _take(one, 7)
    got_two = await _take(two, 7)
    await bus.close()
    assert [d.envelope.position for d in got_one] == list(range(1, 8))
    assert [d.envelope.position for d in got_two] == list(range(1, 8))
    assert got_one[0].envelope.type == AccountOpened.DESCRIPTOR.full_name


async def test_members_share_and_position_is_durable(store: Any) -> None:
    """Members of one group split the events; a new bus resumes after the acked position."""
    await _append(store, "a", 9)
    bus = StoreBus(store)
    m1 = await bus.subscribe("g")
    m2 = await bus.subscribe("g")
    first = await m1.fetch(max_count=4, timeout_s=1.0)
    second = await m2.fetch(max_count=4, timeout_s=1.0)
    for delivery in first + second:
        await delivery.ack()
    await bus.close()
    assert {d.envelope.position for d in first}.isdisjoint(d.envelope.position for d in second)
    assert len(first) == len(second) == 4
    assert await store.load_checkpoint("group:g") == 8

    again = StoreBus(store)
    rest = await _take(await again.subscribe("g"), 2)
    await again.close()
    assert [d.envelope.position for d in rest] == [9, 10]


async def test_position_waits_for_the_first_unacked_event(store: Any) -> None:
    """Acks past an unacked event do not move the checkpoint over it; a restart redelivers it."""
    await _append(store, "a", 4)
    bus = StoreBus(store)
    sub = await bus.subscribe("g")
    got = await _take(sub, 5, ack=False)
    for delivery in got[1:]:
        await delivery.ack()
    assert bus.position("g") == 0
    await got[0].ack()
    assert bus.position("g") == 5
    await bus.flush()
    assert await store.load_checkpoint("group:g") == 5
    await bus.close()


async def test_nack_and_ack_timeout_redeliver(store: Any) -> None:
    """A nacked event and an event left unacked past ack_wait both come back."""
    await _append(store, "a", 1)
    bus = StoreBus(store, StoreBusConfig(ack_wait_s=0.2))
    sub = await bus.subscribe("g")
    first, _ = await _take(sub, 2, ack=False)
    await first.nack()
    again = await _take(sub, 2, ack=False)  # the nacked one at once, the other after 0.2 s
    await bus.close()
    assert [d.envelope.position for d in again] == [1, 2]
    assert [d.attempt for d in again] == [2, 2]


async def test_late_nack_after_ack_wait_does_not_duplicate(store: Any) -> None:
    """A nack that arrives after the ack wait expired adds no second redelivery."""
    await _append(store, "a", 1)
    bus = StoreBus(store, StoreBusConfig(ack_wait_s=0.2))
    sub = await bus.subscribe("g")
    first, second = await _take(sub, 2, ack=False)
    # Both expire; fetching one at a time takes position 1 again and leaves 2 queued.
    [redelivered] = await _take(sub, 1, ack=False)
    await redelivered.ack()
    await first.nack()  # stale: position 1 was redelivered (and acked) meanwhile
    await second.nack()  # late: position 2 is already queued for redelivery
    batch = await sub.fetch(max_count=10, timeout_s=1.0)
    for delivery in batch:
        await delivery.ack()
    await bus.flush()
    checkpoint = await store.load_checkpoint("group:g")
    await bus.close()
    assert (redelivered.envelope.position, redelivered.attempt) == (1, 2)
    assert [(d.envelope.position, d.attempt) for d in batch] == [(2, 2)]
    assert checkpoint == 2


async def test_leaving_member_hands_its_events_back(store: Any) -> None:
    """Deliveries a member took but never acked go to the other member when it leaves."""
    await _append(store, "a", 2)
    bus = StoreBus(store)
    quitter = await bus.subscribe("g")
    stayer = await bus.subscribe("g")
    taken = await _take(quitter, 3, ack=False)
    await quitter.close()
    got = await _take(stayer, 3)
    await bus.close()
    assert [d.envelope.event_id for d in got] == [d.envelope.event_id for d in taken]


async def test_catch_up_then_live(store: Any) -> None:
    """A group reads the backlog, then receives events appended after it subscribed."""
    await _append(store, "a", 1)
    bus = StoreBus(store, StoreBusConfig(poll_interval_s=0.05))
    sub = await bus.subscribe("g")
    backlog = await _take(sub, 2)
    await _append(store, "b", 1)
    live = await _take(sub, 2)
    await bus.close()
    assert [d.envelope.stream_id for d in backlog + live] == ["a", "a", "b", "b"]


async def test_type_filter_and_bad_names(store: Any) -> None:
    """A filtered group only sees its types and still moves its checkpoint; bad input is refused."""
    await _append(store, "a", 2)
    bus = StoreBus(store)
    sub = await bus.subscribe("deposits", event_types=[DEPOSITED])
    got = await _take(sub, 2)
    assert [d.envelope.type for d in got] == [DEPOSITED, DEPOSITED]
    await bus.flush()
    assert await store.load_checkpoint("group:deposits") == 3
    with pytest.raises(FailedPreconditionError):
        await bus.subscribe("deposits")
    with pytest.raises(InvalidArgumentError):
        await bus.subscribe("bad name")
    with pytest.raises(InvalidArgumentError):
        await bus.subscribe("g", event_types=["not a type"])
    await bus.close()


async def test_idempotent_handler_applies_each_event_once(backend: Backend, store: Any) -> None:
    """Redelivered events (handler crashed before ack) change the read model only once."""
    await _append(store, "a", 5)
    pg = backend.name == "postgres"
    balance = f"{backend.schema}.balance" if pg else "balance"
    upsert = (
        f"INSERT INTO {balance} VALUES ({'$1, $2' if pg else '?, ?'}) ON CONFLICT (stream_id)"
        " DO UPDATE SET total = balance.total + excluded.total"
    )
    async with store.transaction() as tx:
        await tx.execute(f"CREATE TABLE {balance} (stream_id TEXT PRIMARY KEY, total BIGINT)")

    async def apply(tx: Any, envelope: EventEnvelope) -> None:
        if envelope.type == DEPOSITED:
            amount = AmountDeposited.FromString(envelope.payload).amount
            if pg:
                await tx.execute(upsert, envelope.stream_id, amount)
            else:
                await tx.execute(upsert, (envelope.stream_id, amount))

    handler = IdempotentHandler(
        store,
        "balance",
        apply,
        table=f"{backend.schema}.processed_events" if pg else "processed_events",
        paramstyle="asyncpg" if pg else "qmark",
    )
    await handler.setup()
    bus = StoreBus(store, StoreBusConfig(ack_wait_s=0.1))
    sub = await bus.subscribe("balance")
    applied = [await handler(d.envelope) for d in await _take(sub, 6, ack=False)]  # no acks
    redelivered: list[bool] = []

    async def counting(envelope: EventEnvelope) -> None:
        redelivered.append(await handler(envelope))

    task = asyncio.create_task(consume(sub, counting, fetch_timeout_s=0.1))
    for _ in range(100):
        if bus.position("balance") == 6:
            break
        await asyncio.sleep(0.02)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await bus.close()
    async with store.transaction() as tx:
        select = f"SELECT total FROM {balance} WHERE stream_id = 'a'"
        total = await (tx.fetchval(select) if pg else tx.fetchone(select))
    assert applied == [True] * 6
    assert redelivered == [False] * 6  # every event came again, none applied twice
    assert await store.load_checkpoint("group:balance") == 6
    assert (total if pg else total[0]) == 1 + 2 + 3 + 4 + 5


async def test_pruned_ledger_still_skips_old_events(backend: Backend, store: Any) -> None:
    """prune() drops ledger rows up to a position; redelivered old events are still skipped."""
    await _append(store, "a", 5)  # positions 1..6
    pg = backend.name == "postgres"
    applied: list[int] = []

    async def apply(tx: Any, envelope: EventEnvelope) -> None:
        applied.append(envelope.position)

    table = f"{backend.schema}.processed_events" if pg else "processed_events"
    handler = IdempotentHandler(
        store, "audit", apply, table=table, paramstyle="asyncpg" if pg else "qmark"
    )
    await handler.setup()
    envelopes = [to_envelope(e) for e in await store.read_all()]
    first = [await handler(e) for e in envelopes[:5]]
    removed = await handler.prune(3)
    assert await handler.prune(2) == 0  # the floor never moves down
    again = [await handler(e) for e in envelopes]  # a redelivery of everything
    async with store.transaction() as tx:
        sql = f"SELECT event_id, position FROM {table} ORDER BY position"
        rows = [tuple(r) for r in await (tx.fetch(sql) if pg else tx.fetchall(sql))]
    assert first == [True] * 5
    assert removed == 3
    assert again == [False] * 5 + [True]  # 1-3 by the floor, 4-5 by their rows, 6 is new
    assert applied == [1, 2, 3, 4, 5, 6]
    assert [p for _, p in rows] == [3, 4, 5, 6] and rows[0][0] == ""


async def test_poison_event_is_dead_lettered_after_max_attempts(store: Any) -> None:
    """An event whose handler always fails goes to the dead letter; the group moves on."""
    await _append(store, "a", 3)
    handled: list[int] = []
    dead: list[tuple[int, str]] = []

    async def handler(envelope: EventEnvelope) -> None:
        if envelope.version == 2:
            raise ValueError("cannot handle deposit 1 (test)")
        handled.append(envelope.version)

    async def dead_letter(envelope: EventEnvelope, error: Exception) -> None:
        dead.append((envelope.version, str(error)))

    bus = StoreBus(store)
    sub = await bus.subscribe("g")
    task = asyncio.create_task(
        consume(
            sub,
            handler,
            retry_delay_s=0.01,
            max_attempts=3,
            dead_letter=dead_letter,
            fetch_timeout_s=0.1,
        )
    )
    for _ in range(500):  # bounded: at most ~10 s
        if bus.position("g") == 4:
            break
        await asyncio.sleep(0.02)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await bus.close()
    assert sorted(handled) == [1, 3, 4]
    assert dead == [(2, "cannot handle deposit 1 (test)")]
    assert await store.load_checkpoint("group:g") == 4


async def test_consume_continues_the_trace_the_event_was_recorded_in(store: Any) -> None:
    """consume() handles each event in a CONSUMER span of the trace that appended it."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("test").start_as_current_span("PlaceOrder") as request:
        metadata = EventMetadata(**trace_fields())
    await store.append("a", [NewEvent.of(AccountOpened(owner="a"), metadata)], 0)
    bus = StoreBus(store)
    sub = await bus.subscribe("traced")
    seen: list[str] = []

    async def handler(envelope: EventEnvelope) -> None:
        seen.append(envelope.event_id)

    task = asyncio.create_task(consume(sub, handler, tracer_provider=provider))
    for _ in range(500):  # bounded: at most ~10 s
        if bus.position("traced") == 1:
            break
        await asyncio.sleep(0.02)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await bus.close()
    (span,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.CONSUMER]
    assert span.context.trace_id == request.get_span_context().trace_id
    assert span.name == f"process {AccountOpened.DESCRIPTOR.full_name}"
    assert span.attributes is not None and span.attributes["messaging.message.id"] == seen[0]


async def test_fetch_after_bus_close_is_refused(store: Any) -> None:
    """A member still fetching when its bus closes gets a clear error, not endless silence."""
    bus = StoreBus(store)
    sub = await bus.subscribe("g")
    waiting = asyncio.create_task(sub.fetch(timeout_s=5.0))
    await asyncio.sleep(0)  # let it start waiting
    await bus.close()
    with pytest.raises(FailedPreconditionError, match="closed"):
        await waiting
