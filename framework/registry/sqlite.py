"""SQLite registry store: the default; a restarted registry still knows its instances.

One registry process per database file.  Statements run on one worker thread
(SQLite connections are not shared across threads here), so the event loop never
blocks on disk.  Changes are announced to this process's watchers in memory.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from framework.registry.model import Health, Instance, ServiceView
from framework.registry.store import (
    INSTANCE_COLUMNS,
    UPSERT_ON_ADDRESS,
    ChangeFeed,
    ChangeListener,
    instance_from_row,
    instance_row,
    weights_from_json,
    weights_to_json,
)

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS registry_revision (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO registry_revision (id, value) VALUES (1, 0);
CREATE TABLE IF NOT EXISTS registry_services (
    name TEXT PRIMARY KEY,
    revision INTEGER NOT NULL,
    version_weights TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS registry_instances (
    lease_id TEXT PRIMARY KEY,
    service TEXT NOT NULL,
    address TEXT NOT NULL,
    version TEXT NOT NULL,
    zone TEXT NOT NULL,
    weight INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    health INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    ttl_s REAL NOT NULL,
    owner TEXT NOT NULL DEFAULT '',
    UNIQUE (service, address)
);
CREATE INDEX IF NOT EXISTS registry_instances_expiry ON registry_instances (expires_at);
"""


class SqliteStore:
    """Registry state in one SQLite file (or ':memory:' for throwaway use)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._feed = ChangeFeed()

    # ----------------------------------------------------------- plumbing
    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None or self._executor is None:
            raise RuntimeError("SqliteStore is not open: call `await store.open()` first")
        conn = self._conn
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, conn)

    async def open(self) -> None:
        if self._conn is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry-sqlite")

        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            columns = {r[1] for r in conn.execute("PRAGMA table_info(registry_instances)")}
            if "owner" not in columns:  # a file written before leases had owners
                conn.execute(
                    "ALTER TABLE registry_instances ADD COLUMN owner TEXT NOT NULL DEFAULT ''"
                )
            return conn

        loop = asyncio.get_running_loop()
        self._conn = await loop.run_in_executor(self._executor, connect)

    async def close(self) -> None:
        conn, executor = self._conn, self._executor
        self._conn, self._executor = None, None
        if conn is not None and executor is not None:
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)
            executor.shutdown(wait=False)

    def _changed(self, revision: int | None, service: str) -> None:
        if revision is not None:
            self._feed.publish(revision, service)

    @staticmethod
    def _bump(conn: sqlite3.Connection, service: str) -> int:
        """Inside a transaction: next revision, recorded as the service's last change."""
        row = conn.execute(
            "UPDATE registry_revision SET value = value + 1 WHERE id = 1 RETURNING value"
        ).fetchone()
        revision = int(row[0])
        conn.execute(
            "INSERT INTO registry_services (name, revision) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET revision = excluded.revision",
            (service, revision),
        )
        return revision

    @staticmethod
    def _tx(conn: sqlite3.Connection, body: Callable[[], T]) -> T:
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = body()
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    # ------------------------------------------------------------- writes
    async def put(self, instance: Instance) -> int | None:
        def work(conn: sqlite3.Connection) -> int | None:
            def body() -> int | None:
                stored = conn.execute(
                    f"INSERT INTO registry_instances ({INSTANCE_COLUMNS}) "
                    f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) {UPSERT_ON_ADDRESS}",
                    instance_row(instance),
                ).fetchone()
                if stored is None:  # another owner holds this address
                    return None
                return self._bump(conn, instance.service)

            return self._tx(conn, body)

        revision = await self._run(work)
        self._changed(revision, instance.service)
        return revision

    async def now(self) -> float:
        return time.time()

    async def renew(self, lease_id: str, now: float | None) -> Instance | None:
        at = time.time() if now is None else now

        def work(conn: sqlite3.Connection) -> Instance | None:
            row = conn.execute(
                f"UPDATE registry_instances SET expires_at = ? + ttl_s "
                f"WHERE lease_id = ? AND expires_at > ? RETURNING {INSTANCE_COLUMNS}",
                (at, lease_id, at),
            ).fetchone()
            return None if row is None else instance_from_row(row)

        return await self._run(work)

    async def extend_leases(self, now: float | None) -> int:
        at = time.time() if now is None else now

        def work(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                "UPDATE registry_instances SET expires_at = ? + ttl_s WHERE expires_at < ? + ttl_s",
                (at, at),
            )
            return int(cursor.rowcount)

        return await self._run(work)

    async def try_lead(self) -> bool:
        return self._conn is not None

    async def resign(self) -> None:
        return None

    async def delete(self, lease_id: str) -> Instance | None:
        def work(conn: sqlite3.Connection) -> tuple[Instance | None, int | None]:
            def body() -> tuple[Instance | None, int | None]:
                row = conn.execute(
                    f"DELETE FROM registry_instances WHERE lease_id = ? "
                    f"RETURNING {INSTANCE_COLUMNS}",
                    (lease_id,),
                ).fetchone()
                if row is None:
                    return None, None
                removed = instance_from_row(row)
                return removed, self._bump(conn, removed.service)

            return self._tx(conn, body)

        removed, revision = await self._run(work)
        if removed is not None:
            self._changed(revision, removed.service)
        return removed

    async def set_health(self, lease_id: str, health: Health) -> bool:
        def work(conn: sqlite3.Connection) -> tuple[int, str] | None:
            def body() -> tuple[int, str] | None:
                row = conn.execute(
                    "UPDATE registry_instances SET health = ? WHERE lease_id = ? AND health != ? "
                    "RETURNING service",
                    (health.value, lease_id, health.value),
                ).fetchone()
                return None if row is None else (self._bump(conn, row[0]), row[0])

            return self._tx(conn, body)

        changed = await self._run(work)
        if changed is not None:
            self._changed(*changed)
        return changed is not None

    async def expire(self, now: float | None) -> list[Instance]:
        at = time.time() if now is None else now

        def work(conn: sqlite3.Connection) -> tuple[list[Instance], list[tuple[int, str]]]:
            def body() -> tuple[list[Instance], list[tuple[int, str]]]:
                rows = conn.execute(
                    f"DELETE FROM registry_instances WHERE expires_at <= ? "
                    f"RETURNING {INSTANCE_COLUMNS}",
                    (at,),
                ).fetchall()
                removed = [instance_from_row(r) for r in rows]
                changes = [
                    (self._bump(conn, service), service)
                    for service in sorted({i.service for i in removed})
                ]
                return removed, changes

            return self._tx(conn, body)

        removed, changes = await self._run(work)
        for revision, service in changes:
            self._changed(revision, service)
        return removed

    async def set_version_weights(self, service: str, weights: Mapping[str, int]) -> int:
        text = weights_to_json(weights)

        def work(conn: sqlite3.Connection) -> int:
            def body() -> int:
                revision = self._bump(conn, service)
                conn.execute(
                    "UPDATE registry_services SET version_weights = ? WHERE name = ?",
                    (text, service),
                )
                return revision

            return self._tx(conn, body)

        revision = await self._run(work)
        self._changed(revision, service)
        return revision

    # -------------------------------------------------------------- reads
    async def get(self, lease_id: str) -> Instance | None:
        def work(conn: sqlite3.Connection) -> Instance | None:
            row = conn.execute(
                f"SELECT {INSTANCE_COLUMNS} FROM registry_instances WHERE lease_id = ?",
                (lease_id,),
            ).fetchone()
            return None if row is None else instance_from_row(row)

        return await self._run(work)

    @staticmethod
    def _read_view(conn: sqlite3.Connection, service: str) -> ServiceView:
        row = conn.execute(
            "SELECT revision, version_weights FROM registry_services WHERE name = ?", (service,)
        ).fetchone()
        if row is None:
            return ServiceView(service, 0)
        rows = conn.execute(
            f"SELECT {INSTANCE_COLUMNS} FROM registry_instances WHERE service = ? ORDER BY address",
            (service,),
        ).fetchall()
        return ServiceView(
            service,
            int(row[0]),
            tuple(instance_from_row(r) for r in rows),
            weights_from_json(row[1]),
        )

    async def view(self, service: str) -> ServiceView:
        return await self._run(lambda conn: self._read_view(conn, service))

    async def views(self) -> list[ServiceView]:
        def work(conn: sqlite3.Connection) -> list[ServiceView]:
            names = [r[0] for r in conn.execute("SELECT name FROM registry_services ORDER BY name")]
            return [self._read_view(conn, n) for n in names]

        return await self._run(work)

    async def instances(self) -> list[Instance]:
        def work(conn: sqlite3.Connection) -> list[Instance]:
            rows = conn.execute(
                f"SELECT {INSTANCE_COLUMNS} FROM registry_instances ORDER BY service, address"
            ).fetchall()
            return [instance_from_row(r) for r in rows]

        return await self._run(work)

    async def revision(self) -> int:
        def work(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT value FROM registry_revision WHERE id = 1").fetchone()
            return int(row[0])

        return await self._run(work)

    async def service_revisions(self, services: Sequence[str]) -> dict[str, int]:
        wanted = list(services)

        def work(conn: sqlite3.Connection) -> dict[str, int]:
            marks = ", ".join("?" for _ in wanted)
            rows = conn.execute(
                f"SELECT name, revision FROM registry_services WHERE name IN ({marks})", wanted
            ).fetchall()
            return {str(name): int(revision) for name, revision in rows}

        return await self._run(work) if wanted else {}

    def on_change(self, listener: ChangeListener) -> None:
        self._feed.subscribe(listener)

    @property
    def listening(self) -> bool:
        return True  # one process: every change is its own write

    async def relisten(self) -> None:
        return None
