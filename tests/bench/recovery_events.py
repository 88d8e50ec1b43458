"""Time to recover from each fault of the event store's recovery table (framework/events/README.md).

`python -m tests.bench.recovery_events [rounds]` (not part of `make bench`: it
prints seconds, not ratios).  Every loop runs with its *default* configuration,
so the figures are what a user gets out of the box.  Each fault is injected
`rounds` times (default 3); the median and the worst are printed.  Needs
PostgreSQL on 127.0.0.1:5432 and the nats-server binary (it starts its own
server on a free port; the shared one on 4222 is never touched).

Measured from the moment the fault ends (the lock holder commits, the
connection is cut, the server is back) to the moment the loop has delivered
what was appended meanwhile.
"""

from __future__ import annotations

import asyncio
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from framework.client import connect
from framework.config import ServerConfig
from framework.events.consumer import IdempotentHandler, consume
from framework.events.consumer_group import StoreBus
from framework.events.consumer_grpc import RemoteSubscription
from framework.events.nats import JetStreamBus, JetStreamConfig
from framework.events.postgres import PostgresConfig, PostgresEventStore
from framework.events.projection import ProjectionRunner
from framework.events.relay import OutboxRelay
from framework.events.service import EventStoreServicer
from framework.events.sqlite import SqliteConfig, SqliteEventStore
from framework.events.store import NewEvent, RecordedEvent
from framework.testing import serve
from gen.events.v1.envelope_pb2 import EventEnvelope
from gen.events.v1.testing_pb2 import AmountDeposited
from tests.events.account import account_types
from tests.events.nats_server import NatsServer
from tests.events.pg_faults import cut_mid_query

DSN = "postgresql://postgres@127.0.0.1:5432/test"


async def _until(predicate: Callable[[], Awaitable[bool]], limit_s: float = 60.0) -> float:
    """Seconds until `predicate` holds (polled every 5 ms)."""
    start = time.monotonic()
    while not await predicate():
        if time.monotonic() - start > limit_s:
            raise TimeoutError("did not recover within the limit")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


def _deposits(n: int) -> list[NewEvent]:
    return [NewEvent.of(AmountDeposited(amount=i + 1)) for i in range(n)]


class Recording:
    """A bus that keeps what it accepted (the relay's far side)."""

    def __init__(self) -> None:
        self.positions: list[int] = []

    async def publish(self, envelopes: Any) -> None:
        self.positions.extend(e.position for e in envelopes)

    async def subscribe(self, group: str, *, event_types: Any = ()) -> Any:
        raise NotImplementedError

    async def close(self) -> None:
        return None


async def sqlite_cancelled_transaction(tmp: Path) -> float:
    """A transaction() cancelled while BEGIN waits for another writer; then an append."""
    path = tmp / f"{uuid.uuid4().hex}.db"
    store = await SqliteEventStore.open(SqliteConfig(str(path)), account_types())
    try:
        async with store.transaction():
            pass
        other = sqlite3.connect(str(path), isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            async with asyncio.timeout(0.1):
                async with store.transaction():
                    pass
        except TimeoutError:
            pass
        other.execute("ROLLBACK")
        other.close()
        start = time.monotonic()
        await store.append("acc", _deposits(1), 0)
        return time.monotonic() - start
    finally:
        await store.close()


class Pg:
    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:10]
        self.schema = f"rec_{self.tag}"
        self.stores: list[PostgresEventStore] = []

    async def store(self, role: str) -> PostgresEventStore:
        config = PostgresConfig(DSN, self.schema, application_name=f"{role}-{self.tag}")
        s = await PostgresEventStore.open(config, account_types())
        self.stores.append(s)
        return s

    async def cut(self, role: str, table: str, trigger: Any) -> None:
        ended = await cut_mid_query(DSN, self.schema, table, f"{role}-{self.tag}", trigger)
        assert ended >= 1, "nothing was cut"

    async def close(self) -> None:
        for s in self.stores:
            await s.close()
        conn = await asyncpg.connect(DSN)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        await conn.close()


async def pg_relay_cut() -> float:
    """The relay's query is cut mid-flight; events appended meanwhile must be published."""
    pg = Pg()
    try:
        writer, relay_store = await pg.store("w"), await pg.store("relay")
        bus = Recording()
        relay = OutboxRelay(relay_store, bus)
        await relay.start()
        await writer.append("acc", _deposits(3), None)
        await _until(lambda: _eq(relay.cursor(), writer.head_position()))
        await pg.cut("relay", "events", lambda: writer.append("acc", _deposits(3), None))
        took = await _until(lambda: _eq(relay.cursor(), writer.head_position()))
        await relay.close()
        return took
    finally:
        await pg.close()


async def pg_group_cut() -> float:
    """A StoreBus group's feeder query is cut; consume() must apply what was appended meanwhile."""
    pg = Pg()
    try:
        writer, group_store = await pg.store("w"), await pg.store("group")
        bus = StoreBus(group_store)
        seen: set[str] = set()

        async def handler(envelope: EventEnvelope) -> None:
            seen.add(envelope.event_id)

        sub = await bus.subscribe("g")
        task = asyncio.create_task(consume(sub, handler, trace=False))
        await writer.append("acc", _deposits(3), None)
        await _until(lambda: _const(len(seen) == 3))
        await pg.cut("group", "events", lambda: writer.append("acc", _deposits(3), None))
        took = await _until(lambda: _const(len(seen) == 6))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await bus.close()
        return took
    finally:
        await pg.close()


class Count:
    name = "count"

    def __init__(self, table: str) -> None:
        self.table = table

    async def apply(self, tx: Any, event: RecordedEvent) -> None:
        await tx.execute(f"UPDATE {self.table} SET n = n + 1")

    async def reset(self, tx: Any) -> None:
        await tx.execute(f"UPDATE {self.table} SET n = 0")


async def pg_projection_cut() -> float:
    """The projection runner's read-model write is cut mid-statement inside its transaction."""
    pg = Pg()
    try:
        writer, store = await pg.store("w"), await pg.store("proj")
        table = f'"{pg.schema}".counter'
        async with store.transaction() as tx:
            await tx.execute(f"CREATE TABLE {table} (n BIGINT)")
            await tx.execute(f"INSERT INTO {table} VALUES (0)")
        runner = ProjectionRunner(store, Count(table), trace=False)
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop))
        await runner.live.wait()
        await pg.cut("proj", "counter", lambda: writer.append("acc", _deposits(3), None))

        async def done() -> bool:
            return await writer.load_checkpoint("count") == await writer.head_position()

        took = await _until(done)
        stop.set()
        await task
        return took
    finally:
        await pg.close()


async def nats_empty_restart(tmp: Path) -> float:
    """JetStream SIGKILLed and back on an empty store: until a group has every event again."""
    server = NatsServer(tmp / uuid.uuid4().hex)
    server.start()
    path = tmp / f"{uuid.uuid4().hex}.db"
    store = await SqliteEventStore.open(SqliteConfig(str(path)), account_types())
    bus = await JetStreamBus.connect(server.url, JetStreamConfig(stream="R", subject_prefix="r"))
    relay = OutboxRelay(store, bus)
    seen: set[str] = set()

    async def apply(tx: Any, envelope: EventEnvelope) -> None:
        seen.add(envelope.event_id)

    async with store.transaction() as tx:
        await tx.execute("SELECT 1")
    handler = IdempotentHandler(store, "g", apply)
    await handler.setup()
    sub = await bus.subscribe("g")
    task = asyncio.create_task(consume(sub, handler, trace=False))
    await relay.start()
    try:
        await store.append("acc", _deposits(3), None)
        await _until(lambda: _const(len(seen) == 3))
        server.kill()
        await store.append("acc", _deposits(3), None)
        server.start(fresh_store=True)
        return await _until(lambda: _const(len(seen) == 6))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await relay.close()
        await sub.close()
        await bus.close()
        await store.close()
        server.stop()


async def grpc_server_restart(tmp: Path) -> float:
    """The event store's gRPC server restarts on its port: until the remote consumer caught up."""
    path = tmp / f"{uuid.uuid4().hex}.db"
    store = await SqliteEventStore.open(SqliteConfig(str(path)), account_types())
    bus = StoreBus(store)
    seen: set[str] = set()

    async def handler(envelope: EventEnvelope) -> None:
        seen.add(envelope.event_id)

    try:
        async with serve(EventStoreServicer(store, bus=bus)) as first:
            port = first.port
            channel = connect(f"127.0.0.1:{port}")
            sub = await RemoteSubscription.open(channel, "remote")
            task = asyncio.create_task(consume(sub, handler, trace=False))
            await store.append("acc", _deposits(3), None)
            await _until(lambda: _const(len(seen) == 3))
        await store.append("acc", _deposits(3), None)
        config = ServerConfig(
            name="test", host="127.0.0.1", port=port, grace_s=1.0, insecure_dev=True
        )
        async with serve(EventStoreServicer(store, bus=bus), config=config):
            took = await _until(lambda: _const(len(seen) == 6))
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await sub.close()
        await channel.close()
        return took
    finally:
        await bus.close()
        await store.close()


async def _eq(a: Awaitable[int], b: Awaitable[int]) -> bool:
    return await a == await b


async def _const(value: bool) -> bool:
    return value


async def main(rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        faults: list[tuple[str, Callable[[], Awaitable[float]]]] = [
            (
                "sqlite: transaction() cancelled while BEGIN waits",
                lambda: sqlite_cancelled_transaction(tmp),
            ),
            ("pg: relay query cut (pg_terminate_backend)", pg_relay_cut),
            ("pg: group feeder query cut", pg_group_cut),
            ("pg: projection write cut mid-transaction", pg_projection_cut),
            ("nats: SIGKILL, back on an empty store", lambda: nats_empty_restart(tmp)),
            ("grpc: event store server restart", lambda: grpc_server_restart(tmp)),
        ]
        for name, fault in faults:
            times = [await fault() for _ in range(rounds)]
            print(
                f"{name}: median {statistics.median(times):.2f}s, worst {max(times):.2f}s"
                f" ({rounds} rounds)",
                flush=True,
            )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3))
