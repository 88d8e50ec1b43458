"""JetStream restarted without its data: the relay re-creates the stream and publishes again,
members re-create their consumers, and every event is applied exactly once per group.

Runs its own nats-server (free port, own store directory), killed with SIGKILL
and started again on an empty store: never the shared server on 4222.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest

from framework.errors import FailedPreconditionError, UnavailableError
from framework.events.consumer import IdempotentHandler, consume
from framework.events.nats import JetStreamBus, JetStreamConfig
from framework.events.relay import OutboxRelay, RelayConfig
from framework.events.sqlite import SqliteConfig, SqliteEventStore, SqliteTransaction
from framework.events.store import NewEvent
from gen.events.v1.envelope_pb2 import EventEnvelope
from gen.events.v1.testing_pb2 import AmountDeposited
from tests.events.account import account_types
from tests.events.nats_server import NatsServer
from tests.events.pg_faults import wait_until


@pytest.fixture
def server(tmp_path: Path) -> Any:
    """A nats-server of this test's own."""
    s = NatsServer(tmp_path / "nats")
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteEventStore]:
    """The events database (the outbox, the ledgers and the read models live in it)."""
    s = await SqliteEventStore.open(SqliteConfig(path=str(tmp_path / "events.db")), account_types())
    try:
        yield s
    finally:
        await s.close()


class Group:
    """A consumer group running `consume()` with an idempotent handler into `applied_<name>`."""

    def __init__(self, store: SqliteEventStore, bus: JetStreamBus, name: str) -> None:
        self.store, self.bus, self.name = store, bus, name
        self.task: asyncio.Task[None] | None = None
        self.sub: Any = None

    async def start(self) -> None:
        async with self.store.transaction() as tx:
            await tx.execute(f"CREATE TABLE IF NOT EXISTS applied_{self.name} (event_id TEXT)")

        async def apply(tx: SqliteTransaction, envelope: EventEnvelope) -> None:
            await tx.execute(f"INSERT INTO applied_{self.name} VALUES (?)", (envelope.event_id,))

        handler = IdempotentHandler(self.store, self.name, apply)
        await handler.setup()
        if self.sub is None:
            self.sub = await self.bus.subscribe(self.name)
        self.task = asyncio.create_task(
            consume(
                self.sub,
                handler,
                fetch_timeout_s=0.1,
                retry_delay_s=0.05,
                reconnect_delay_s=0.05,
                max_reconnect_delay_s=0.5,
                trace=False,
            )
        )

    async def pause(self) -> None:
        """Stop handling (the member stays bound): events pile up for the group."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None

    async def has(self, n: int) -> bool:
        """Whether exactly `n` events were applied, each once."""
        return await self.applied() == (n, n)

    async def close(self) -> None:
        await self.pause()
        if self.sub is not None:
            await self.sub.close()

    async def applied(self) -> tuple[int, int]:
        """(applications, distinct events applied)."""
        async with self.store.transaction() as tx:
            row = await tx.fetchone(
                f"SELECT count(*), count(DISTINCT event_id) FROM applied_{self.name}"
            )
        return int(row[0]), int(row[1])


async def _deposit(store: SqliteEventStore, count: int) -> None:
    events = [NewEvent.of(AmountDeposited(amount=i)) for i in range(1, count + 1)]
    await store.append(f"acc-{uuid.uuid4().hex[:8]}", events, 0, aggregate_type="Account")


async def test_jetstream_restarted_empty_loses_nothing_and_applies_nothing_twice(
    server: NatsServer, store: SqliteEventStore
) -> None:
    """SIGKILL + empty store: stream and consumers come back, every event applied once per group."""
    config = JetStreamConfig(
        stream="ORDERS",
        subject_prefix="orders",
        ack_wait_s=2.0,
        consumer_check_interval_s=0.2,
    )
    bus = await JetStreamBus.connect(server.url, config)
    relay = OutboxRelay(
        store,
        bus,
        RelayConfig(name="orders", poll_interval_s=0.05, retry_delay_s=0.05, max_retry_delay_s=0.5),
    )
    billing, audit = Group(store, bus, "billing"), Group(store, bus, "audit")
    await relay.start()
    await billing.start()
    await audit.start()
    try:
        await _deposit(store, 10)

        async def both_have(n: int) -> bool:
            return await billing.has(n) and await audit.has(n)

        assert await wait_until(lambda: both_have(10))
        await audit.pause()  # audit falls behind: 5 events wait in the stream for it
        await _deposit(store, 5)

        async def published() -> bool:
            return await relay.cursor() == await store.head_position()

        assert await wait_until(published)
        assert await wait_until(lambda: billing.has(15))

        server.kill()
        server.start(fresh_store=True)  # JetStream is back, knowing nothing

        await _deposit(store, 5)
        failing: list[BaseException] = []

        async def relay_failed() -> bool:
            if relay.last_error is not None:
                failing.append(relay.last_error)
            return bool(failing)

        await audit.start()  # the same bound member resumes
        assert await wait_until(relay_failed)
        assert await wait_until(lambda: both_have(20))
        assert bus.stream_resets >= 1
        assert await bus.stream_messages() == 20  # everything published again, once
    finally:
        await billing.close()
        await audit.close()
        await relay.close()
        await bus.close()
    assert isinstance(failing[0], UnavailableError)
    assert await billing.applied() == (20, 20)
    assert await audit.applied() == (20, 20)


async def test_shorter_duplicate_window_than_configured_is_refused(server: NatsServer) -> None:
    """A stream that forgets message ids sooner than duplicate_window_s: FAILED_PRECONDITION."""
    nc = await nats.connect(server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="SHORT", subjects=["short.>"], duplicate_window=5.0)
    finally:
        await nc.close()
    config = JetStreamConfig(stream="SHORT", subject_prefix="short", duplicate_window_s=120.0)
    with pytest.raises(FailedPreconditionError, match="duplicate publishes for 5s") as caught:
        await JetStreamBus.connect(server.url, config)
    assert "--dupe-window 120s" in caught.value.message
    longer = JetStreamConfig(stream="SHORT", subject_prefix="short", duplicate_window_s=2.0)
    bus = await JetStreamBus.connect(server.url, longer)  # a longer window is fine
    await bus.close()


async def test_late_nack_after_ack_wait_does_not_duplicate(server: NatsServer) -> None:
    """A JetStream nack after the ack wait ran out adds no second redelivery."""
    config = JetStreamConfig(stream="LATE", subject_prefix="late", ack_wait_s=2.0)
    bus = await JetStreamBus.connect(server.url, config)
    try:
        await bus.publish(
            [EventEnvelope(event_id=str(uuid.uuid4()), type="a.B", position=1, version=1)]
        )
        sub = await bus.subscribe("g")
        [first] = await sub.fetch(timeout_s=2.0)
        again: list[Any] = []
        for _ in range(100):  # bounded: the server redelivers after its ack wait
            again = await sub.fetch(timeout_s=0.1)
            if again:
                break
        await first.nack()  # late: the server redelivered it already; that one is in hand
        extra = await sub.fetch(timeout_s=0.5)  # a nak'ed message would be back at once
        for delivery in again + extra:
            await delivery.ack()
        await sub.close()
    finally:
        await bus.close()
    assert [d.attempt for d in again] == [2]
    assert extra == []
