"""PostgreSQL connections cut mid-query (`pg_terminate_backend`): every loop recovers, exactly once.

Each test opens the store under test with its own `application_name`, cuts
its connection while a statement is running (`tests.events.pg_faults`), keeps
appending through another store object (another process, in effect), and then
checks that everything appended arrived once: nothing lost, nothing twice.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from framework.errors import UnavailableError
from framework.events.consumer import IdempotentHandler, consume
from framework.events.consumer_group import StoreBus, StoreBusConfig
from framework.events.postgres import PostgresConfig, PostgresEventStore
from framework.events.projection import ProjectionConfig, ProjectionRunner
from framework.events.relay import OutboxRelay, RelayConfig
from framework.events.store import NewEvent, RecordedEvent
from gen.events.v1.envelope_pb2 import EventEnvelope
from gen.events.v1.testing_pb2 import AmountDeposited
from tests.events.account import account_types
from tests.events.pg_faults import cut_mid_query, wait_until

pytestmark = pytest.mark.postgres


class Place:
    """This test's schema, a writer store, and stores opened under their own names."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.tag = uuid.uuid4().hex[:12]
        self.schema = f"ev_{self.tag}"
        self.opened: list[PostgresEventStore] = []

    async def store(self, role: str) -> PostgresEventStore:
        config = PostgresConfig(self.dsn, self.schema, application_name=self.name(role))
        store = await PostgresEventStore.open(config, account_types())
        self.opened.append(store)
        return store

    def name(self, role: str) -> str:
        return f"{role}-{self.tag}"

    async def cut(self, role: str, table: str, trigger: Any = None) -> int:
        return await cut_mid_query(self.dsn, self.schema, table, self.name(role), trigger)

    async def close(self) -> None:
        for store in self.opened:
            await store.close()
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        finally:
            await conn.close()


@pytest.fixture
async def place(postgres_dsn: str) -> AsyncIterator[Place]:
    """A schema of this test's own, dropped afterwards."""
    p = Place(postgres_dsn)
    try:
        yield p
    finally:
        await p.close()


async def _deposit(store: PostgresEventStore, stream: str, *amounts: int) -> None:
    events = [NewEvent.of(AmountDeposited(amount=a)) for a in amounts]
    await store.append(stream, events, None, aggregate_type="Account")


async def test_append_cut_mid_query_is_unavailable_and_a_retry_stores_once(place: Place) -> None:
    """An append whose connection dies is UNAVAILABLE; the same events retried are stored once."""
    store = await place.store("writer")
    await _deposit(store, "acc-1", 1)
    events = [NewEvent.of(AmountDeposited(amount=a)) for a in (2, 3)]
    pending: list[asyncio.Task[Any]] = []

    async def trigger() -> None:
        pending.append(asyncio.create_task(store.append("acc-1", events, 1)))

    assert await place.cut("writer", "events", trigger) == 1
    with pytest.raises(UnavailableError, match="connection was lost"):
        await pending[0]
    result = await store.append("acc-1", events, 1)  # the retry, on a fresh connection
    again = await store.append("acc-1", events, 1)
    await _deposit(store, "acc-1", 4)
    stored = await store.read_stream("acc-1")
    assert result == again and result.version == 3
    assert [AmountDeposited.FromString(e.payload).amount for e in stored] == [1, 2, 3, 4]


async def test_reads_cut_mid_query_are_unavailable(place: Place) -> None:
    """A read whose connection is terminated raises UnavailableError, and the next read works."""
    store = await place.store("reader")
    await _deposit(store, "acc-1", 1)
    pending: list[asyncio.Task[Any]] = []

    async def trigger() -> None:
        pending.append(asyncio.create_task(store.read_all(0, 10)))

    assert await place.cut("reader", "events", trigger) == 1
    with pytest.raises(UnavailableError):
        await pending[0]
    assert [e.version for e in await store.read_all(0, 10)] == [1]


class RecordingBus:
    """An EventBus keeping what it accepted, in order (the relay's side of the test)."""

    def __init__(self) -> None:
        self.accepted: list[EventEnvelope] = []

    async def publish(self, envelopes: Any) -> None:
        self.accepted.extend(envelopes)

    async def subscribe(self, group: str, *, event_types: Any = ()) -> Any:
        raise NotImplementedError

    async def close(self) -> None:
        return None


async def test_relay_rides_out_connections_cut_mid_query(
    place: Place, caplog: pytest.LogCaptureFixture
) -> None:
    """The relay's reads and checkpoint writes cut mid-query: it retries and publishes all once."""
    caplog.set_level(logging.WARNING, logger="framework.events.relay")
    writer = await place.store("writer")
    relay_store = await place.store("relay")
    bus = RecordingBus()
    config = RelayConfig(
        name="r",
        batch_size=4,
        poll_interval_s=0.05,
        retry_delay_s=0.02,
        max_retry_delay_s=0.2,
        checkpoint_interval_s=0,
    )
    relay = OutboxRelay(relay_store, bus, config)
    await relay.start()
    try:
        cuts = 0
        for n in range(3):
            await _deposit(writer, f"acc-{n}", *range(1, 6))
            cuts += await place.cut("relay", "events")  # its read or head query

        async def appended() -> None:
            await _deposit(writer, "acc-x", 7, 8)

        cuts += await place.cut("relay", "checkpoints", appended)  # its cursor write
        await _deposit(writer, "acc-y", 9)

        async def caught_up() -> bool:
            head = await writer.head_position()
            return await relay.cursor() == head and relay.last_error is None

        assert await wait_until(caught_up)
        await relay.check(max_lag=0)
    finally:
        await relay.close()
    stored = await writer.read_all(0, 100)
    positions = [e.position for e in bus.accepted]
    assert cuts == 4
    # at least once: a batch whose cursor write was cut is published again, never skipped
    assert sorted(set(positions)) == [e.position for e in stored]
    assert positions == sorted(positions) or len(positions) > len(stored)
    assert await writer.load_checkpoint("relay:r") == stored[-1].position
    assert any("connection was lost" in r.getMessage() for r in caplog.records)


async def test_group_and_consumer_ride_out_connections_cut_mid_query(place: Place) -> None:
    """A StoreBus group's feeder, its handler's transaction and its checkpoint write are cut:
    every event is applied exactly once and consume() keeps running."""
    writer = await place.store("writer")
    group_store = await place.store("group")
    s = f'"{place.schema}"'
    async with group_store.transaction() as tx:
        await tx.execute(f"CREATE TABLE {s}.applied (event_id TEXT NOT NULL, amount BIGINT)")

    async def apply(tx: Any, envelope: EventEnvelope) -> None:
        amount = AmountDeposited.FromString(envelope.payload).amount
        await tx.execute(f"INSERT INTO {s}.applied VALUES ($1, $2)", envelope.event_id, amount)

    ledger = f"{place.schema}.processed_events"
    handler = IdempotentHandler(group_store, "billing", apply, table=ledger, paramstyle="asyncpg")
    await handler.setup()
    bus = StoreBus(
        group_store,
        StoreBusConfig(
            poll_interval_s=0.05, retry_delay_s=0.02, max_retry_delay_s=0.2, ack_wait_s=30
        ),
    )
    sub = await bus.subscribe("billing")
    task = asyncio.create_task(
        consume(sub, handler, retry_delay_s=0.02, fetch_timeout_s=0.1, trace=False)
    )
    try:
        await _deposit(writer, "acc-0", 1, 2, 3)

        async def deposit(stream: str) -> Any:
            async def go() -> None:
                await _deposit(writer, stream, 10, 20)

            return go

        cuts = await place.cut("group", "events", await deposit("acc-1"))  # the feeder's read
        cuts += await place.cut("group", "processed_events", await deposit("acc-2"))  # handler tx
        cuts += await place.cut("group", "checkpoints", await deposit("acc-3"))  # checkpoint
        await _deposit(writer, "acc-4", 100)
        head = await writer.head_position()

        async def done() -> bool:
            return bus.position("billing") == head

        assert await wait_until(done)
        await bus.flush()
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sub.close()
        await bus.close()
    async with writer.transaction() as tx:
        count, distinct, total = await tx.fetchrow(
            f"SELECT count(*), count(DISTINCT event_id), sum(amount) FROM {s}.applied"
        )
    assert cuts == 3
    assert (count, distinct) == (head, head)
    assert total == 1 + 2 + 3 + 3 * 30 + 100
    assert await writer.load_checkpoint("group:billing") == head


class Totals:
    """A projection: one row per stream with the sum of its deposits."""

    def __init__(self, schema: str) -> None:
        self.name = "totals"
        self.table = f'"{schema}".totals'

    async def apply(self, tx: Any, event: RecordedEvent) -> None:
        amount = AmountDeposited.FromString(event.payload).amount
        await tx.execute(
            f"INSERT INTO {self.table} (id, total) VALUES ($1, $2) ON CONFLICT (id)"
            f" DO UPDATE SET total = {self.table}.total + excluded.total",
            event.stream_id,
            amount,
        )

    async def reset(self, tx: Any) -> None:
        await tx.execute(f"DELETE FROM {self.table}")


async def test_projection_runner_rides_out_connections_cut_mid_query(place: Place) -> None:
    """The runner's read, its read-model write and its checkpoint are cut: totals come out exact."""
    writer = await place.store("writer")
    store = await place.store("projection")
    projection = Totals(place.schema)
    async with store.transaction() as tx:
        await tx.execute(f"CREATE TABLE {projection.table} (id TEXT PRIMARY KEY, total BIGINT)")
    config = ProjectionConfig(batch_size=3, idle_wait_s=0.05, retry_delay_s=0.02)
    runner = ProjectionRunner(store, projection, config, trace=False)
    await _deposit(writer, "acc-0", 1, 2, 3, 4)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:

        async def deposit(stream: str) -> Any:
            async def go() -> None:
                await _deposit(writer, stream, 5, 6)

            return go

        await runner.live.wait()
        cuts = await place.cut("projection", "events", await deposit("acc-1"))
        cuts += await place.cut("projection", "totals", await deposit("acc-2"))
        cuts += await place.cut("projection", "checkpoints", await deposit("acc-3"))
        await _deposit(writer, "acc-0", 10)
        head = await writer.head_position()

        async def done() -> bool:
            return await writer.load_checkpoint("totals") == head

        assert await wait_until(done)
        assert not task.done()
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    async with writer.transaction() as tx:
        rows = dict(await tx.fetch(f"SELECT id, total FROM {projection.table}"))
    assert cuts == 3
    assert rows == {"acc-0": 20, "acc-1": 11, "acc-2": 11, "acc-3": 11}
