"""A group member in another process: RemoteSubscription over EventStoreService.Subscribe."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from framework.client import connect
from framework.config import ServerConfig
from framework.errors import FailedPreconditionError
from framework.events.consumer import IdempotentHandler, consume
from framework.events.consumer_group import StoreBus, StoreBusConfig
from framework.events.consumer_grpc import RemoteSubscription
from framework.events.service import EventStoreServicer
from framework.events.sqlite import SqliteConfig, SqliteEventStore, SqliteTransaction
from framework.events.store import NewEvent
from framework.testing import serve
from gen.events.v1.envelope_pb2 import EventEnvelope
from gen.events.v1.testing_pb2 import AccountOpened, AmountDeposited
from tests.events.account import account_types


async def _open(path: Path) -> SqliteEventStore:
    return await SqliteEventStore.open(
        SqliteConfig(path=str(path), synchronous="NORMAL"), account_types()
    )


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[tuple[SqliteEventStore, SqliteEventStore]]:
    """The server's event store and the remote consumer's own database."""
    server, consumer = await _open(tmp_path / "server.db"), await _open(tmp_path / "consumer.db")
    yield server, consumer
    await server.close()
    await consumer.close()


async def _append(store: SqliteEventStore, stream: str, deposits: int) -> None:
    events = [NewEvent.of(AccountOpened(owner=stream))]
    events += [NewEvent.of(AmountDeposited(amount=i)) for i in range(1, deposits + 1)]
    await store.append(stream, events, 0, aggregate_type="Account")


async def test_remote_consumer_applies_backlog_and_live_events_once(
    stores: tuple[SqliteEventStore, SqliteEventStore],
) -> None:
    """consume() over a RemoteSubscription applies stored then live events, each once."""
    server_store, consumer_db = stores
    await _append(server_store, "a", 3)
    async with consumer_db.transaction() as tx:
        await tx.execute("CREATE TABLE applied (event_id TEXT NOT NULL)")

    async def apply(tx: SqliteTransaction, envelope: EventEnvelope) -> None:
        await tx.execute("INSERT INTO applied VALUES (?)", (envelope.event_id,))

    handler = IdempotentHandler(consumer_db, "remote", apply)
    await handler.setup()
    bus = StoreBus(server_store, StoreBusConfig(poll_interval_s=0.05))
    async with serve(EventStoreServicer(server_store, bus=bus)) as t:
        sub = await RemoteSubscription.open(t.channel, "remote")
        task = asyncio.create_task(consume(sub, handler, fetch_timeout_s=0.1))

        async def settled(head: int) -> None:
            for _ in range(500):  # bounded: at most ~10 s
                if bus.position("remote") == head:
                    return
                await asyncio.sleep(0.02)

        await settled(4)
        await _append(server_store, "b", 1)
        await settled(6)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sub.close()
        with pytest.raises(FailedPreconditionError):
            await sub.fetch()
    await bus.close()
    async with consumer_db.transaction() as tx:
        rows = await tx.fetchall("SELECT event_id, COUNT(*) FROM applied GROUP BY event_id")
    stored = {e.event_id for e in await server_store.read_all(0, 100)}
    assert {event_id for event_id, _ in rows} == stored
    assert all(count == 1 for _, count in rows)
    assert await server_store.load_checkpoint("group:remote") == 6


async def test_server_refusal_surfaces_on_fetch(
    stores: tuple[SqliteEventStore, SqliteEventStore],
) -> None:
    """A group joined with another type filter: the server's FAILED_PRECONDITION reaches fetch()."""
    server_store, _ = stores
    bus = StoreBus(server_store)
    local = await bus.subscribe("g")
    async with serve(EventStoreServicer(server_store, bus=bus)) as t:
        deposits = [AmountDeposited.DESCRIPTOR.full_name]
        sub = await RemoteSubscription.open(t.channel, "g", event_types=deposits)
        with pytest.raises(FailedPreconditionError, match="already consumes"):
            for _ in range(50):  # bounded: the error arrives with the stream's end
                await sub.fetch(timeout_s=0.2)
        await sub.close()
    await local.close()
    await bus.close()


async def test_remote_consumer_rides_out_a_server_restart(
    stores: tuple[SqliteEventStore, SqliteEventStore], caplog: pytest.LogCaptureFixture
) -> None:
    """The event store's server stops and comes back on its port: consume() goes on, each once."""
    caplog.set_level(logging.INFO, logger="framework.events.consumer_grpc")
    server_store, consumer_db = stores
    await _append(server_store, "a", 3)
    async with consumer_db.transaction() as tx:
        await tx.execute("CREATE TABLE applied (event_id TEXT NOT NULL)")

    async def apply(tx: SqliteTransaction, envelope: EventEnvelope) -> None:
        await tx.execute("INSERT INTO applied VALUES (?)", (envelope.event_id,))

    handler = IdempotentHandler(consumer_db, "remote", apply)
    await handler.setup()
    bus = StoreBus(server_store, StoreBusConfig(poll_interval_s=0.05))

    async def settled(head: int) -> bool:
        for _ in range(1000):  # bounded: at most ~20 s
            if bus.position("remote") == head:
                return True
            await asyncio.sleep(0.02)
        return False

    async with serve(EventStoreServicer(server_store, bus=bus)) as first:
        port = first.port
        channel = connect(f"127.0.0.1:{port}")
        sub = await RemoteSubscription.open(channel, "remote")
        task = asyncio.create_task(
            consume(sub, handler, fetch_timeout_s=0.1, reconnect_delay_s=0.05)
        )
        assert await settled(4)
    await _append(server_store, "b", 2)  # appended while no server runs
    config = ServerConfig(name="test", host="127.0.0.1", port=port, grace_s=1.0, insecure_dev=True)
    async with serve(EventStoreServicer(server_store, bus=bus), config=config):
        assert await settled(7)
        survived = not task.done()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sub.close()
    await channel.close()
    await bus.close()
    async with consumer_db.transaction() as tx:
        rows = await tx.fetchall("SELECT event_id, COUNT(*) FROM applied GROUP BY event_id")
    stored = {e.event_id for e in await server_store.read_all(0, 100)}
    assert survived
    assert any("opened again" in r.getMessage() for r in caplog.records)
    assert {event_id for event_id, _ in rows} == stored
    assert all(count == 1 for _, count in rows)
