"""A service's own database: its event store, and SQL that runs on either backend.

Each service of a system owns one database (never shared with another service):
a SQLite file in the data directory by default, or a PostgreSQL schema.  It is
opened as the framework's event store (`framework.events`), so the service gets the
events table (its transactional outbox), checkpoints for projections and consumer
groups, and `transaction()` for its own tables in the same database.

`ServiceDatabase` runs one SQL dialect on both: write `?` placeholders and `{name}`
for the service's tables; on PostgreSQL placeholders become `$1..$n` and tables are
qualified with the schema.  Keep to the common subset (`CREATE TABLE IF NOT EXISTS`,
`INSERT ... ON CONFLICT`, `RETURNING`, `BIGINT`, `TEXT`, `BYTEA`-as-`BLOB` through
`{blob}`), and no literal `?` inside SQL strings.

    db = await ServiceDatabase.open("sqlite:data/payment.sqlite3", types)
    async with db.transaction() as tx:
        row = await db.fetchone(tx, "SELECT state FROM {payments} WHERE id = ?", pid)
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from framework.events.store import EventStore
from framework.events.typeregistry import EventTypeRegistry

__all__ = ["ServiceDatabase", "StoreUrl"]

_PLACEHOLDER = re.compile(r"\?")
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(frozen=True, slots=True)
class StoreUrl:
    """`sqlite:PATH` or `postgresql://...` (with the schema the service owns)."""

    url: str
    schema: str = ""

    def __post_init__(self) -> None:
        if self.is_sqlite:
            if not self.url[len("sqlite:") :]:
                raise ValueError("a sqlite store URL names a file: sqlite:data/orders.sqlite3")
        elif self.url.startswith(("postgresql://", "postgres://")):
            if not _IDENTIFIER.match(self.schema):
                raise ValueError(
                    f"a PostgreSQL store needs its own schema (lower-case identifier), "
                    f"got {self.schema!r}"
                )
        else:
            raise ValueError(f"store URL must be sqlite:PATH or postgresql://..., got {self.url!r}")

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite:")

    @property
    def path(self) -> str:
        return self.url[len("sqlite:") :]


class ServiceDatabase:
    """The event store a service owns, plus backend-neutral SQL on its transactions."""

    def __init__(self, store: Any, *, postgres: bool, schema: str = "") -> None:
        self.store: EventStore = store
        self._raw = store
        self.postgres = postgres
        self.schema = schema
        self._compiled: dict[str, str] = {}

    @classmethod
    async def open(
        cls, url: str | StoreUrl, types: EventTypeRegistry, *, schema: str = ""
    ) -> ServiceDatabase:
        """Open (creating if needed) the database at `url`."""
        where = url if isinstance(url, StoreUrl) else StoreUrl(url, schema)
        if where.is_sqlite:
            from framework.events.sqlite import SqliteConfig, SqliteEventStore

            Path(where.path).parent.mkdir(parents=True, exist_ok=True)
            store: Any = await SqliteEventStore.open(SqliteConfig(where.path), types)
            return cls(store, postgres=False)
        from framework.events.postgres import PostgresConfig, PostgresEventStore

        store = await PostgresEventStore.open(PostgresConfig(where.url, where.schema), types)
        return cls(store, postgres=True, schema=where.schema)

    # ------------------------------------------------------------ SQL
    def sql(self, text: str) -> str:
        """`text` for this backend: `{table}` qualified, `{blob}` typed, `?` numbered."""
        compiled = self._compiled.get(text)
        if compiled is None:
            compiled = text.format_map(_TableNames(self.schema if self.postgres else ""))
            if self.postgres:
                counter = iter(range(1, 10_000))
                compiled = _PLACEHOLDER.sub(lambda _: f"${next(counter)}", compiled)
            self._compiled[text] = compiled
        return compiled

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        """One transaction (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: READ COMMITTED)."""
        async with self._raw.transaction() as tx:
            yield tx

    async def execute(self, tx: Any, text: str, *params: object) -> int:
        """Run one statement; the number of rows it changed."""
        sql = self.sql(text)
        if self.postgres:
            status: str = await tx.execute(sql, *params)
            last = status.rsplit(" ", 1)[-1]
            return int(last) if last.isdigit() else 0
        return int(await tx.execute(sql, params))

    async def fetchone(self, tx: Any, text: str, *params: object) -> Sequence[Any] | None:
        sql = self.sql(text)
        if self.postgres:
            row = await tx.fetchrow(sql, *params)
            return tuple(row) if row is not None else None
        found = await tx.fetchone(sql, params)
        return tuple(found) if found is not None else None

    async def fetchall(self, tx: Any, text: str, *params: object) -> list[Sequence[Any]]:
        sql = self.sql(text)
        if self.postgres:
            return [tuple(r) for r in await tx.fetch(sql, *params)]
        return [tuple(r) for r in await tx.fetchall(sql, params)]

    async def script(self, statements: Sequence[str]) -> None:
        """Run DDL statements (each `CREATE ... IF NOT EXISTS`) in one transaction."""
        async with self.transaction() as tx:
            for statement in statements:
                await self.execute(tx, statement)

    @property
    def for_update(self) -> str:
        """` FOR UPDATE` on PostgreSQL (row lock), empty on SQLite (the database is locked)."""
        return " FOR UPDATE" if self.postgres else ""

    async def ping(self) -> None:
        """Raise when the database does not answer (a health check)."""
        async with self.transaction() as tx:
            await self.fetchone(tx, "SELECT 1")

    async def close(self) -> None:
        await self._raw.close()


class _TableNames(dict[str, str]):
    """`{name}` -> the table name, schema-qualified on PostgreSQL; `{blob}` -> the bytes type."""

    def __init__(self, schema: str) -> None:
        super().__init__()
        self.schema = schema

    def __missing__(self, key: str) -> str:
        if key == "blob":
            return "BYTEA" if self.schema else "BLOB"
        if not _IDENTIFIER.match(key):
            raise ValueError(f"{{{key}}} is not a table name")
        return f'"{self.schema}".{key}' if self.schema else key
