"""Projection rebuild rate: a one-UPSERT projection against the runner with a no-op projection.

Same store, same run, interleaved rounds, medians:

* `projection_rebuild_sqlite` / `projection_rebuild_pg`: `ProjectionRunner.rebuild()`
  of a balance-per-account projection (one `INSERT ... ON CONFLICT DO UPDATE`
  per event, sent per page with `executemany` through `apply_batch`) vs the
  same rebuild with a projection that does nothing (what the runner itself
  costs: reading pages, decoding, one transaction and checkpoint per page).
  Goal: ratio >= 0.5.  Printed beside it: the same UPSERT projection without
  `apply_batch` (a statement per event, as before batching), and on PostgreSQL
  a projection that sends the page as arrays in one statement (`unnest`).
* The curve (events/s at 100k, 300k and 1M stored events) is a separate knob,
  run outside `make bench`'s 15-minute limit per module (filling 1M events
  takes a while): `BENCH_PROJECTION_EVENTS=100000,300000,1000000
  .venv/bin/python -m tests.bench.run_one projection`; the default run uses
  `DEFAULT_EVENTS` events.

PostgreSQL is skipped with a note when no server answers on 127.0.0.1:5432.
Tracing is off (`trace=False`): a large offline rebuild, telemetry aside.
"""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from framework.events.projection import ProjectionConfig, ProjectionRunner
from framework.events.sqlite import SqliteConfig, SqliteEventStore
from framework.events.store import NewEvent, RecordedEvent
from gen.events.v1.testing_pb2 import AmountDeposited
from tests.bench.harness import Sample, bench_line, interleave, median_cpu_us, median_rate, timed
from tests.events.account import account_types

ROUNDS = 3
DEFAULT_EVENTS = 30_000
ACCOUNTS = 1_000
PER_APPEND = 20
PAGE = 1_000
PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"


class UpsertEach:
    """Balance per account: one UPSERT per event, each awaited (`apply` only)."""

    def __init__(self, table: str, pg: bool) -> None:
        self.name = f"proj_{table.rsplit('.', 1)[-1]}"
        self.table = table
        self.pg = pg
        marks = "($1, $2)" if pg else "(?, ?)"
        self.sql = (
            f"INSERT INTO {table} (id, balance) VALUES {marks} ON CONFLICT (id)"
            f" DO UPDATE SET balance = {table}.balance + excluded.balance"
        )

    async def apply(self, tx: Any, event: RecordedEvent) -> None:
        amount = AmountDeposited.FromString(event.payload).amount
        if self.pg:
            await tx.execute(self.sql, event.stream_id, amount)
        else:
            await tx.execute(self.sql, (event.stream_id, amount))

    async def reset(self, tx: Any) -> None:
        create = f"CREATE TABLE IF NOT EXISTS {self.table} (id TEXT PRIMARY KEY, balance BIGINT)"
        await tx.execute(create)
        await tx.execute(f"DELETE FROM {self.table}")


class UpsertPages(UpsertEach):
    """The same projection with `apply_batch`: the page's UPSERTs in one `executemany`."""

    async def apply_batch(self, tx: Any, events: Sequence[RecordedEvent]) -> None:
        parse = AmountDeposited.FromString
        await tx.executemany(self.sql, [(e.stream_id, parse(e.payload).amount) for e in events])


class UpsertArrays(UpsertEach):
    """PostgreSQL only: the page as arrays in ONE statement (summed per account first)."""

    async def apply_batch(self, tx: Any, events: Sequence[RecordedEvent]) -> None:
        parse = AmountDeposited.FromString
        await tx.execute(
            f"INSERT INTO {self.table} (id, balance)"
            " SELECT id, sum(amount) FROM unnest($1::TEXT[], $2::BIGINT[]) AS u(id, amount)"
            f" GROUP BY id ON CONFLICT (id) DO UPDATE SET balance = {self.table}.balance"
            " + excluded.balance",
            [e.stream_id for e in events],
            [parse(e.payload).amount for e in events],
        )


class NoOp:
    """The baseline: a projection that reads nothing and writes nothing."""

    name = "proj_noop"

    async def apply(self, tx: Any, event: RecordedEvent) -> None:
        return None

    async def reset(self, tx: Any) -> None:
        return None


async def _fill(store: Any, total: int, already: int = 0) -> None:
    """Append deposits until the store holds `total` events: appends of PER_APPEND
    events, cycling over ACCOUNTS streams (a page then touches ~PAGE/PER_APPEND accounts)."""
    for start in range(already, total, PER_APPEND):
        count = min(PER_APPEND, total - start)
        events = [NewEvent.of(AmountDeposited(amount=1 + (start + i) % 7)) for i in range(count)]
        stream = f"acc-{(start // PER_APPEND) % ACCOUNTS}"
        await store.append(stream, events, None, aggregate_type="Account")


def _round(store: Any, projection: Any, events: int) -> Callable[[], Awaitable[Sample]]:
    runner = ProjectionRunner(store, projection, ProjectionConfig(batch_size=PAGE), trace=False)

    async def run() -> int:
        applied = await runner.rebuild()
        assert applied == events, (applied, events)
        return applied

    return lambda: timed(run)


async def _measure(
    store: Any, prefix: str, events: int, *, rounds: int, with_plain: bool
) -> tuple[float, float]:
    """(UPSERT projection's rebuild rate, ratio to the no-op runner), medians of `rounds`."""
    pg = bool(prefix)
    variants = {
        "upsert": _round(store, UpsertPages(f"{prefix}balances_pages", pg), events),
        "runner": _round(store, NoOp(), events),
    }
    if with_plain:
        variants["plain"] = _round(store, UpsertEach(f"{prefix}balances_each", pg), events)
    if pg:
        arrays = UpsertArrays(f"{prefix}balances_arrays", pg)
        variants["arrays"] = _round(store, arrays, events)
    samples = await interleave(rounds, **variants)
    ours, base = median_rate(samples["upsert"]), median_rate(samples["runner"])
    extra = ""
    if with_plain:
        extra = f", per-event UPSERT (no apply_batch) {median_rate(samples['plain']):,.0f} ev/s"
    if "arrays" in samples:
        arrays_rate = median_rate(samples["arrays"])
        extra += (
            f", one UPSERT over arrays per page {arrays_rate:,.0f} ev/s"
            f" (ratio {arrays_rate / base:.2f})"
        )
    print(
        f"  {'pg' if pg else 'sqlite'} {events:,} events: UPSERT projection {ours:,.0f} ev/s"
        f" ({median_cpu_us(samples['upsert']):.1f} us CPU/ev), no-op runner {base:,.0f} ev/s"
        f" ({median_cpu_us(samples['runner']):.1f} us CPU/ev){extra}; ratio {ours / base:.2f}",
        flush=True,
    )
    return ours, ours / base


def _curve() -> list[int]:
    raw = os.environ.get("BENCH_PROJECTION_EVENTS", "")
    return sorted(int(n) for n in raw.replace(",", " ").split()) if raw else []


async def _sqlite(directory: Path) -> None:
    store = await SqliteEventStore.open(
        SqliteConfig(str(directory / "projection.db")), account_types()
    )
    try:
        await _fill(store, DEFAULT_EVENTS)
        rate, ratio = await _measure(store, "", DEFAULT_EVENTS, rounds=ROUNDS, with_plain=True)
        bench_line(
            "projection_rebuild_sqlite", ratio, rate, "events/s", "runner_with_noop_projection"
        )
        filled = DEFAULT_EVENTS
        for n in _curve():
            await _fill(store, n, filled)
            filled = n
            await _measure(store, "", n, rounds=1, with_plain=False)
    finally:
        await store.close()


def _pg_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1.0):
            return True
    except OSError:
        return False


async def _pg() -> None:
    import asyncpg

    from framework.events.postgres import PostgresConfig, PostgresEventStore

    schema = f"bench_{uuid.uuid4().hex[:12]}"
    store = await PostgresEventStore.open(PostgresConfig(PG_DSN, schema=schema), account_types())
    try:
        await _fill(store, DEFAULT_EVENTS)
        prefix = f'"{schema}".'
        rate, ratio = await _measure(store, prefix, DEFAULT_EVENTS, rounds=ROUNDS, with_plain=True)
        bench_line("projection_rebuild_pg", ratio, rate, "events/s", "runner_with_noop_projection")
        filled = DEFAULT_EVENTS
        for n in _curve():
            await _fill(store, n, filled)
            filled = n
            await _measure(store, prefix, n, rounds=1, with_plain=False)
    finally:
        await store.close()
        conn = await asyncpg.connect(PG_DSN)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        await _sqlite(Path(tmp))
    if _pg_up():
        await _pg()
    else:
        print("PostgreSQL does not answer on 127.0.0.1:5432: projection_rebuild_pg skipped")
