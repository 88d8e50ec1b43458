"""Event store append throughput vs a raw INSERT loop, and vs the `eventsourcing` library.

Same database, same run, interleaved rounds, medians:

* `event_append_sqlite_b1|b100`: `SqliteEventStore.append` (WAL, synchronous=FULL,
  own thread, version check, type/payload validation) vs a plain sqlite3 loop of
  `INSERT` + `COMMIT` of the same rows into a table of the same shape (same
  UNIQUE(stream_id, version) index) on the same file, run directly on the loop's
  thread.
* `event_append_pg_b1|b100`: `PostgresEventStore.append` (one round trip, advisory
  xact lock for ordered positions) vs asyncpg `INSERT`s (b1: one autocommit
  statement; b100: `executemany` in one transaction) into a same-shape table.
* printed only: 8 concurrent appenders per store (SQLite group commit; PostgreSQL
  appends serialized by the ordering lock) against the raw loops.
* `event_store_vs_eventsourcing`: a new aggregate with one event saved through a
  repository, ours (`Repository.save`, SQLite) vs eventsourcing's
  `Application.save` with its SQLite persistence (WAL, default synchronous=FULL),
  each on its own file in the same directory. Our events table is also the
  outbox, so no extra write is needed for publishing.

Events are built before the timed loop (the store's cost is measured, not uuid4).
The PostgreSQL variants are skipped with a note when no server answers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import sqlite3
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from framework.events.aggregate import Repository
from framework.events.sqlite import SqliteConfig, SqliteEventStore
from framework.events.store import NewEvent, new_event_id
from gen.events.v1.testing_pb2 import AmountDeposited
from tests.bench.harness import Sample, bench_line, interleave, median_cpu_us, median_rate, timed
from tests.events.account import Account, account_types

ROUNDS = 5
B1_APPENDS = 300
B100_BATCHES = 30
PEER_SAVES = 300
PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"

RAW_TABLE = """
CREATE TABLE IF NOT EXISTS raw_events (
    position {pk},
    stream_id TEXT NOT NULL, version BIGINT NOT NULL, aggregate_type TEXT NOT NULL,
    event_id TEXT NOT NULL, type TEXT NOT NULL, schema_version INTEGER NOT NULL,
    metadata {blob} NOT NULL, payload {blob} NOT NULL, recorded_at {ts} NOT NULL,
    UNIQUE (stream_id, version)
)
"""


def _events(batch: int) -> list[NewEvent]:
    return [NewEvent.of(AmountDeposited(amount=i + 1)) for i in range(batch)]


def _fresh_ids(batches: list[list[NewEvent]]) -> list[list[NewEvent]]:
    """The same events under new ids (built before the clock starts)."""
    return [[dataclasses.replace(e, event_id=new_event_id()) for e in b] for b in batches]


def _rows(stream: str, first_version: int, events: list[NewEvent]) -> list[tuple[Any, ...]]:
    return [
        (stream, first_version + i, "Account", e.event_id, e.type, 1, b"", e.payload)
        for i, e in enumerate(events)
    ]


def _report(name: str, ours: list[Sample], raw: list[Sample], batch: int, base: str) -> None:
    ours_rate, raw_rate = median_rate(ours) * batch, median_rate(raw) * batch
    ours_cpu, raw_cpu = median_cpu_us(ours) / batch, median_cpu_us(raw) / batch
    print(
        f"  {name}: ours {ours_rate:,.0f} events/s ({ours_cpu:.1f} us CPU/event),"
        f" raw {raw_rate:,.0f} events/s ({raw_cpu:.1f} us CPU/event)",
        flush=True,
    )
    bench_line(name, ours_rate / raw_rate, ours_rate, "events/s", base)


# ---------------------------------------------------------------- SQLite


async def _sqlite(directory: Path) -> None:
    path = directory / "bench.db"
    store = await SqliteEventStore.open(SqliteConfig(str(path)), account_types())
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("PRAGMA journal_mode=WAL")
    raw.execute("PRAGMA synchronous=FULL")
    raw.execute(RAW_TABLE.format(pk="INTEGER PRIMARY KEY AUTOINCREMENT", blob="BLOB", ts="INTEGER"))
    insert = (
        "INSERT INTO raw_events (stream_id, version, aggregate_type, event_id, type,"
        " schema_version, metadata, payload, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0)"
    )

    for batch, count in ((1, B1_APPENDS), (100, B100_BATCHES)):
        batches = [_events(batch) for _ in range(count)]

        def ours(batch: int = batch, batches: list[list[NewEvent]] = batches) -> Any:
            fresh = _fresh_ids(batches)  # event ids are unique in the store: new ones per round

            async def run() -> int:
                stream = uuid.uuid4().hex
                for i, events in enumerate(fresh):
                    await store.append(stream, events, i * batch)
                return len(fresh)

            return timed(run)

        def plain(batch: int = batch, batches: list[list[NewEvent]] = batches) -> Any:
            async def run() -> int:
                stream = uuid.uuid4().hex
                for i, events in enumerate(batches):
                    raw.execute("BEGIN IMMEDIATE")
                    raw.executemany(insert, _rows(stream, i * batch + 1, events))
                    raw.execute("COMMIT")
                return len(batches)

            return timed(run)

        results = await interleave(ROUNDS, ours=ours, raw=plain)
        _report(
            f"event_append_sqlite_b{batch}",
            results["ours"],
            results["raw"],
            batch,
            "raw_sqlite3_insert_loop_same_db",
        )
    await _sqlite_concurrent(store, raw, insert)
    raw.close()
    await store.close()


async def _sqlite_concurrent(store: SqliteEventStore, raw: Any, insert: str) -> None:
    """Group commit: 8 concurrent single-event appenders on one store vs the raw loop.

    The raw baseline cannot overlap commits on one connection (it is sequential);
    ours shares one transaction (one WAL sync) among the appends waiting. Printed.
    """
    writers, each = 8, 60

    async def ours_run() -> int:
        async def one() -> None:
            stream = uuid.uuid4().hex
            for i in range(each):
                await store.append(stream, _events(1), i)

        await asyncio.gather(*(one() for _ in range(writers)))
        return writers * each

    async def raw_run() -> int:
        stream = uuid.uuid4().hex
        for i in range(writers * each):
            raw.execute(insert, _rows(stream, i + 1, _events(1))[0])
        return writers * each

    results = await interleave(3, ours=lambda: timed(ours_run), raw=lambda: timed(raw_run))
    ours_rate, raw_rate = median_rate(results["ours"]), median_rate(results["raw"])
    print(
        f"  sqlite b1 x{writers} concurrent writers (group commit): ours {ours_rate:,.0f}"
        f" events/s, raw sequential commits {raw_rate:,.0f} events/s"
        f" (ratio {ours_rate / raw_rate:.2f})",
        flush=True,
    )


# ---------------------------------------------------------------- PostgreSQL


def _pg_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1.0):
            return True
    except OSError:
        return False


async def _postgres() -> None:
    import asyncpg

    from framework.events.postgres import PostgresConfig, PostgresEventStore

    schema = f"bench_{uuid.uuid4().hex[:12]}"
    store = await PostgresEventStore.open(PostgresConfig(PG_DSN, schema), account_types())
    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(
            RAW_TABLE.format(pk="BIGSERIAL PRIMARY KEY", blob="BYTEA", ts="TIMESTAMPTZ").replace(
                "raw_events", f'"{schema}".raw_events'
            )
        )
        insert = (
            f'INSERT INTO "{schema}".raw_events (stream_id, version, aggregate_type, event_id,'
            " type, schema_version, metadata, payload, recorded_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now())"
        )
        for batch, count in ((1, B1_APPENDS), (100, B100_BATCHES)):
            batches = [_events(batch) for _ in range(count)]

            def ours(batch: int = batch, batches: list[list[NewEvent]] = batches) -> Any:
                fresh = _fresh_ids(batches)  # event ids are unique in the store

                async def run() -> int:
                    stream = uuid.uuid4().hex
                    for i, events in enumerate(fresh):
                        await store.append(stream, events, i * batch)
                    return len(fresh)

                return timed(run)

            def plain(batch: int = batch, batches: list[list[NewEvent]] = batches) -> Any:
                async def run() -> int:
                    stream = uuid.uuid4().hex
                    for i, events in enumerate(batches):
                        rows = _rows(stream, i * batch + 1, events)
                        if batch == 1:
                            await conn.execute(insert, *rows[0])
                        else:
                            async with conn.transaction():
                                await conn.executemany(insert, rows)
                    return len(batches)

                return timed(run)

            results = await interleave(ROUNDS, ours=ours, raw=plain)
            _report(
                f"event_append_pg_b{batch}",
                results["ours"],
                results["raw"],
                batch,
                "raw_asyncpg_insert_same_db",
            )
        await _pg_concurrent(schema, insert)
    finally:
        await store.close()
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()


async def _pg_concurrent(schema: str, insert: str) -> None:
    """Cost of ordered positions: 8 concurrent single-event appenders, each its own store.

    Our appends serialize on the store's advisory lock (so `read_all` never skips a
    late commit); raw INSERTs on 8 connections do not.  Printed for the record.
    """
    import asyncpg

    from framework.events.postgres import PostgresConfig, PostgresEventStore

    writers, each = 8, 40
    stores = [
        await PostgresEventStore.open(PostgresConfig(PG_DSN, schema), account_types())
        for _ in range(writers)
    ]
    conns = [await asyncpg.connect(PG_DSN) for _ in range(writers)]
    try:

        async def ours_run() -> int:
            async def one(store: Any) -> None:
                stream = uuid.uuid4().hex
                for i in range(each):
                    await store.append(stream, _events(1), i)

            await asyncio.gather(*(one(s) for s in stores))
            return writers * each

        async def raw_run() -> int:
            async def one(conn: Any) -> None:
                stream = uuid.uuid4().hex
                for i in range(each):
                    await conn.execute(insert, *_rows(stream, i + 1, _events(1))[0])

            await asyncio.gather(*(one(c) for c in conns))
            return writers * each

        results = await interleave(3, ours=lambda: timed(ours_run), raw=lambda: timed(raw_run))
        ours_rate, raw_rate = median_rate(results["ours"]), median_rate(results["raw"])
        print(
            f"  pg b1 x{writers} concurrent writers: ours {ours_rate:,.0f} events/s,"
            f" raw {raw_rate:,.0f} events/s (ratio {ours_rate / raw_rate:.2f}:"
            " the price of positions visible in order)",
            flush=True,
        )
    finally:
        for store in stores:
            await store.close()
        for conn in conns:
            await conn.close()


# ---------------------------------------------------------------- eventsourcing


def _peer_app(path: Path) -> tuple[Any, Callable[[int], Any]]:
    from eventsourcing.application import Application
    from eventsourcing.domain import Aggregate, event

    class EsAccount(Aggregate):  # the same shape as tests.events.account.Account
        @event("Opened")
        def __init__(self, owner: str) -> None:
            self.owner = owner
            self.balance = 0

        @event("Deposited")
        def deposit(self, amount: int) -> None:
            self.balance += amount

    app = Application(
        env={"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(path)}
    )

    def new_account(events: int) -> Any:
        account = EsAccount(owner="ann")
        for amount in range(1, events):
            account.deposit(amount)
        return account

    return app, new_account


async def _peer(directory: Path) -> None:
    store = await SqliteEventStore.open(SqliteConfig(str(directory / "ours.db")), account_types())
    repo = Repository(store, Account)
    app, new_account = _peer_app(directory / "theirs.db")

    for events in (1, 10):

        def ours(events: int = events) -> Awaitable[Sample]:
            async def run() -> int:
                for _ in range(PEER_SAVES):
                    account = Account(uuid.uuid4().hex)
                    account.open("ann")
                    for amount in range(1, events):
                        account.deposit(amount)
                    await repo.save(account)
                return PEER_SAVES

            return timed(run)

        def theirs(events: int = events) -> Awaitable[Sample]:
            async def run() -> int:
                for _ in range(PEER_SAVES):
                    app.save(new_account(events))
                return PEER_SAVES

            return timed(run)

        results = await interleave(ROUNDS, ours=ours, theirs=theirs)
        ours_rate, theirs_rate = median_rate(results["ours"]), median_rate(results["theirs"])
        print(
            f"  aggregate saves of {events} event(s): ours {ours_rate:,.0f}/s"
            f" ({median_cpu_us(results['ours']):.0f} us CPU/save),"
            f" eventsourcing {theirs_rate:,.0f}/s"
            f" ({median_cpu_us(results['theirs']):.0f} us CPU/save)",
            flush=True,
        )
        if events == 1:
            bench_line(
                "event_store_vs_eventsourcing",
                ours_rate / theirs_rate,
                ours_rate,
                "saves/s",
                "eventsourcing_sqlite_application_save",
            )
    await store.close()


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-events-") as scratch:
        directory = Path(scratch)
        await _sqlite(directory)
        if _pg_answers():
            await _postgres()
        else:
            print("  PostgreSQL does not answer on 127.0.0.1:5432: pg variants skipped")
        await _peer(directory)


if __name__ == "__main__":
    asyncio.run(main())
