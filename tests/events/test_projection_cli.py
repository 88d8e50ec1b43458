"""`python -m framework.events rebuild`: a projection rebuilt from zero by the command line."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from framework.events.projection import ProjectionRunner
from framework.events.sqlite import SqliteConfig, SqliteEventStore
from framework.events.store import NewEvent, RecordedEvent
from gen.events.v1.testing_pb2 import AccountOpened, AmountDeposited
from tests.events.account import account_types

ROOT = Path(__file__).resolve().parents[2]


class Totals:
    """Read model: total deposited per account (SQLite), creating its table on reset."""

    name = "totals"

    async def apply(self, tx: Any, event: RecordedEvent) -> None:
        if event.type == AmountDeposited.DESCRIPTOR.full_name:
            amount = AmountDeposited.FromString(event.payload).amount
            await tx.execute(
                "INSERT INTO totals VALUES (?, ?) ON CONFLICT (id)"
                " DO UPDATE SET total = totals.total + excluded.total",
                (event.stream_id, amount),
            )

    async def reset(self, tx: Any) -> None:
        await tx.execute("CREATE TABLE IF NOT EXISTS totals (id TEXT PRIMARY KEY, total INTEGER)")
        await tx.execute("DELETE FROM totals")


def make_totals() -> Totals:
    """The factory the command line is pointed at."""
    return Totals()


class PgTotals:
    """The same read model for PostgreSQL (asyncpg connection, `$n` placeholders)."""

    name = "totals"

    def __init__(self, schema: str) -> None:
        self.table = f'"{schema}".totals'

    async def apply(self, tx: Any, event: RecordedEvent) -> None:
        if event.type == AmountDeposited.DESCRIPTOR.full_name:
            amount = AmountDeposited.FromString(event.payload).amount
            await tx.execute(
                f"INSERT INTO {self.table} VALUES ($1, $2) ON CONFLICT (id)"
                f" DO UPDATE SET total = {self.table}.total + excluded.total",
                event.stream_id,
                amount,
            )

    async def reset(self, tx: Any) -> None:
        await tx.execute(
            f"CREATE TABLE IF NOT EXISTS {self.table} (id TEXT PRIMARY KEY, total INT)"
        )
        await tx.execute(f"DELETE FROM {self.table}")


async def make_pg_totals() -> PgTotals:
    """An async factory, reading the schema from the environment the test sets."""
    return PgTotals(os.environ["TEST_TOTALS_SCHEMA"])


async def _rows(store: SqliteEventStore) -> list[tuple[str, int]]:
    async with store.transaction() as tx:
        rows = await tx.fetchall("SELECT id, total FROM totals ORDER BY id")
    return [(r[0], r[1]) for r in rows]


async def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "framework.events",
        *args,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_rebuild_command_replays_everything_and_equals_live(tmp_path: Path) -> None:
    """The command resets the read model, applies all 9 events and matches the live projection."""
    path = tmp_path / "events.db"
    store = await SqliteEventStore.open(SqliteConfig(path=str(path)), account_types())
    try:
        for a in range(3):
            events = [NewEvent.of(AccountOpened(owner=f"o{a}"))]
            events += [NewEvent.of(AmountDeposited(amount=10 * a + d)) for d in (1, 2)]
            await store.append(f"acc-{a}", events, 0)
        runner = ProjectionRunner(store, Totals())
        await runner.rebuild()  # the live read model, built in-process
        live = await _rows(store)
        async with store.transaction() as tx:  # damage it: the rebuild must repair it
            await tx.execute("UPDATE totals SET total = -1")
            await tx.execute("INSERT INTO totals VALUES ('ghost', 5)")
    finally:
        await store.close()

    code, out, err = await _run(
        "rebuild",
        "--store",
        f"sqlite:{path}",
        "--projection",
        "tests.events.test_projection_cli:make_totals",
    )
    assert code == 0, err
    assert "rebuilt projection totals: 9 events applied, checkpoint at position 9" in out

    store = await SqliteEventStore.open(SqliteConfig(path=str(path)), account_types())
    try:
        assert await _rows(store) == live == [("acc-0", 3), ("acc-1", 23), ("acc-2", 43)]
        assert await store.load_checkpoint("totals") == 9
    finally:
        await store.close()


async def test_rebuild_command_names_a_bad_projection(tmp_path: Path) -> None:
    """An unknown projection attribute exits 2 with a message naming it; no store is touched."""
    path = tmp_path / "events.db"
    code, _, err = await _run(
        "rebuild",
        "--store",
        f"sqlite:{path}",
        "--projection",
        "tests.events.test_projection_cli:no_such_factory",
    )
    assert code == 2
    assert "has no attribute 'no_such_factory'" in err
    assert not path.exists()


@pytest.mark.postgres
async def test_rebuild_command_on_postgresql(postgres_dsn: str) -> None:
    """On PostgreSQL (own schema) the command rebuilds through an async factory."""
    from framework.events.postgres import PostgresConfig, PostgresEventStore

    schema = f"cli_{uuid.uuid4().hex[:12]}"
    store = await PostgresEventStore.open(PostgresConfig(postgres_dsn, schema), account_types())
    try:
        deposits = [NewEvent.of(AmountDeposited(amount=n)) for n in (4, 5)]
        await store.append("acc-pg", [NewEvent.of(AccountOpened(owner="p")), *deposits], 0)
        code, out, err = await _run(
            "rebuild",
            "--store",
            postgres_dsn,
            "--schema",
            schema,
            "--projection",
            "tests.events.test_projection_cli:make_pg_totals",
            env={"TEST_TOTALS_SCHEMA": schema},
        )
        assert code == 0, err
        assert "rebuilt projection totals: 3 events applied" in out
        async with store.transaction() as tx:
            rows = await tx.fetch(f'SELECT id, total FROM "{schema}".totals')
        assert [(r[0], r[1]) for r in rows] == [("acc-pg", 9)]
        assert await store.load_checkpoint("totals") == 3
    finally:
        await store.close()
        import asyncpg

        conn = await asyncpg.connect(postgres_dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
