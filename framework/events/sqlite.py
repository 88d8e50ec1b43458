"""The embedded event store: stdlib sqlite3 in WAL mode, off the event loop.

Every database call runs on a dedicated thread (`sqlite_writer.ThreadConnection`),
so the event loop never blocks on disk.  Appends are group-committed: one
append alone is one `BEGIN IMMEDIATE ... COMMIT`; appends that arrive while a
commit is in flight share the next transaction, each inside its own savepoint
(`sqlite_writer.GroupCommit`).  Every batch is all or nothing, also across a
kill -9 (WAL recovery drops the uncommitted tail).  `UNIQUE(stream_id, version)`
is enforced by the database; the global position is `INTEGER PRIMARY KEY
AUTOINCREMENT`, assigned under SQLite's single writer lock, so positions commit
in increasing order and are never reused.  Projection transactions
(`transaction()`) run on a second connection with its own thread.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from framework.events.envelope import Codec, StoredRow, from_micros, to_micros
from framework.events.notify import AppendSignal
from framework.events.sqlite_writer import VERSION_SQL, GroupCommit, ThreadConnection
from framework.events.store import (
    DEFAULT_PAGE_SIZE,
    AppendResult,
    NewEvent,
    RecordedEvent,
    Snapshot,
    check_limit,
    check_non_negative,
    check_stream_id,
)
from framework.events.typeregistry import EventTypeRegistry
from framework.events.upcast import Upcasters

T = TypeVar("T")

logger = logging.getLogger(__name__)

_SYNC_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    stream_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    aggregate_type TEXT NOT NULL,
    event_id TEXT NOT NULL,
    type TEXT NOT NULL,
    schema_version INTEGER NOT NULL,
    metadata BLOB NOT NULL,
    payload BLOB NOT NULL,
    recorded_at INTEGER NOT NULL,
    UNIQUE (stream_id, version)
);
CREATE TABLE IF NOT EXISTS snapshots (
    stream_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    type TEXT NOT NULL,
    state BLOB NOT NULL,
    recorded_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    name TEXT PRIMARY KEY,
    position INTEGER NOT NULL
);
"""

_COLUMNS = (
    "position, stream_id, aggregate_type, version, event_id, type, schema_version,"
    " metadata, payload, recorded_at"
)
_SAVE_SNAPSHOT = (
    "INSERT INTO snapshots (stream_id, version, type, state, recorded_at) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version, type = excluded.type,"
    " state = excluded.state, recorded_at = excluded.recorded_at"
    " WHERE excluded.version >= snapshots.version"
)
_SAVE_CHECKPOINT = (
    "INSERT INTO checkpoints (name, position) VALUES (?, ?)"
    " ON CONFLICT (name) DO UPDATE SET position = excluded.position"
)


def _index_event_ids(conn: sqlite3.Connection) -> None:
    """Event ids are unique (appends are idempotent by id): a unique index, or a plain one.

    A database written before appends were idempotent may hold one id twice;
    it gets a plain index (the append path still finds retries by id) and a
    warning naming the way out.
    """
    try:
        conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS events_event_id ON events (event_id)")
    except sqlite3.IntegrityError:
        logger.warning(
            "SQLite event store %s: the events table holds some event id twice (written"
            " before appends were idempotent); using a non-unique index. Find them with"
            " SELECT event_id FROM events GROUP BY event_id HAVING count(*) > 1",
            conn.execute("PRAGMA database_list").fetchone()[2],
        )
        conn.execute("CREATE INDEX IF NOT EXISTS events_event_id_any ON events (event_id)")


def _begin(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")


def _commit(conn: sqlite3.Connection) -> None:
    conn.execute("COMMIT")


@dataclass(frozen=True, slots=True)
class SqliteConfig:
    """Where the database lives and how hard each commit is synced.

    `synchronous="FULL"` syncs the WAL on every commit (durable across power
    loss); "NORMAL" is durable across a process crash only.
    """

    path: str
    synchronous: str = "FULL"
    busy_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.path or self.path == ":memory:":
            raise ValueError(
                f"path must name a database file, got {self.path!r} (the store opens two"
                " connections; use a temporary file for throwaway stores)"
            )
        if self.synchronous not in _SYNC_MODES:
            raise ValueError(f"synchronous must be one of {_SYNC_MODES}, got {self.synchronous!r}")
        if self.busy_timeout_s < 0:
            raise ValueError(f"busy_timeout_s must be >= 0, got {self.busy_timeout_s}")


class SqliteTransaction:
    """An open transaction on the events database, for projections and consumers.

    Runs on the store's second connection (and thread); commits or rolls back
    as a whole when the `transaction()` block ends.  Do not append to the store
    from inside it: the append would wait for this transaction's write lock.
    """

    __slots__ = ("_connection",)

    def __init__(self, connection: ThreadConnection) -> None:
        self._connection = connection

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        """Run one statement; returns the number of rows it changed."""
        return await self._connection.call(lambda c: c.execute(sql, params).rowcount)

    async def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        await self._connection.call(lambda c: c.executemany(sql, rows))

    async def fetchall(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        return await self._connection.call(lambda c: c.execute(sql, params).fetchall())

    async def fetchone(self, sql: str, params: Sequence[object] = ()) -> Any:
        return await self._connection.call(lambda c: c.execute(sql, params).fetchone())


class SqliteEventStore:
    """EventStore on SQLite; create with `await SqliteEventStore.open(config, types)`."""

    def __init__(
        self,
        config: SqliteConfig,
        types: EventTypeRegistry,
        upcasters: Upcasters | None = None,
    ) -> None:
        self.config = config
        self.codec = Codec(types, upcasters or Upcasters())
        self._signal = AppendSignal()
        self._main = ThreadConnection("sqlite-events")
        self._appends = GroupCommit(self._main, self._signal.notify)
        self._tx_connection: ThreadConnection | None = None
        self._tx_lock = asyncio.Lock()

    @classmethod
    async def open(
        cls, config: SqliteConfig, types: EventTypeRegistry, upcasters: Upcasters | None = None
    ) -> SqliteEventStore:
        store = cls(config, types, upcasters)
        await store._main.open(store._connect)
        return store

    # ------------------------------------------------------------ plumbing

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.config.path,
            timeout=self.config.busy_timeout_s,
            isolation_level=None,
            check_same_thread=False,
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.config.synchronous}")
        conn.executescript(SCHEMA)
        _index_event_ids(conn)
        return conn

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._main.call(fn)

    # ------------------------------------------------------------ writes

    async def append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        expected_version: int | None,
        *,
        aggregate_type: str = "",
    ) -> AppendResult:
        rows = self.codec.rows(stream_id, events, expected_version)
        return await self._appends.append(stream_id, aggregate_type, rows, expected_version)

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        check_stream_id(snapshot.stream_id)
        check_non_negative("snapshot.version", snapshot.version)
        at = to_micros(snapshot.recorded_at or datetime.now(UTC))
        row = (snapshot.stream_id, snapshot.version, snapshot.type, snapshot.state, at)
        await self._call(lambda c: c.execute(_SAVE_SNAPSHOT, row))

    async def save_checkpoint(self, name: str, position: int) -> None:
        check_non_negative("position", position)
        await self._call(lambda c: c.execute(_SAVE_CHECKPOINT, (name, position)))

    # ------------------------------------------------------------ reads

    async def read_stream(
        self, stream_id: str, from_version: int = 1, limit: int = DEFAULT_PAGE_SIZE
    ) -> list[RecordedEvent]:
        check_stream_id(stream_id)
        check_non_negative("from_version", from_version)
        check_limit(limit)
        sql = (
            f"SELECT {_COLUMNS} FROM events WHERE stream_id = ? AND version >= ?"
            " ORDER BY version LIMIT ?"
        )
        rows: list[StoredRow] = await self._call(
            lambda c: c.execute(sql, (stream_id, from_version, limit)).fetchall()
        )
        return [self.codec.recorded(r) for r in rows]

    async def read_all(
        self, after_position: int = 0, limit: int = DEFAULT_PAGE_SIZE
    ) -> list[RecordedEvent]:
        check_non_negative("after_position", after_position)
        check_limit(limit)
        sql = f"SELECT {_COLUMNS} FROM events WHERE position > ? ORDER BY position LIMIT ?"
        rows: list[StoredRow] = await self._call(
            lambda c: c.execute(sql, (after_position, limit)).fetchall()
        )
        return [self.codec.recorded(r) for r in rows]

    async def stream_version(self, stream_id: str) -> int:
        check_stream_id(stream_id)
        version: int = await self._call(
            lambda c: c.execute(VERSION_SQL, (stream_id,)).fetchone()[0]
        )
        return version

    async def head_position(self) -> int:
        sql = "SELECT COALESCE(MAX(position), 0) FROM events"
        head: int = await self._call(lambda c: c.execute(sql).fetchone()[0])
        return head

    async def wait_for_events(self, after_position: int, timeout_s: float) -> bool:
        return await self._signal.wait_past(after_position, timeout_s, self.head_position)

    async def load_snapshot(self, stream_id: str) -> Snapshot | None:
        check_stream_id(stream_id)
        sql = "SELECT stream_id, version, type, state, recorded_at FROM snapshots WHERE stream_id=?"
        row = await self._call(lambda c: c.execute(sql, (stream_id,)).fetchone())
        if row is None:
            return None
        return Snapshot(row[0], row[1], row[2], row[3], from_micros(row[4]))

    async def load_checkpoint(self, name: str) -> int:
        sql = "SELECT position FROM checkpoints WHERE name = ?"
        row = await self._call(lambda c: c.execute(sql, (name,)).fetchone())
        return int(row[0]) if row else 0

    # ------------------------------------------------------------ projections

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqliteTransaction]:
        """A transaction on the events database (commit on success, rollback on error).

        Cancellation-safe: statements queued on the connection's thread run
        even when their caller stops waiting (an `asyncio.timeout`, a cancelled
        task), so whenever the block does not end in a COMMIT that returned, a
        rollback of whatever is open is queued behind them before the block
        lets the next transaction in.  A `BEGIN` still waiting for another
        writer when its caller gave up is thus undone as soon as it runs.
        """
        async with self._tx_lock:
            connection = self._tx_connection
            if connection is None:
                connection = ThreadConnection("sqlite-events-tx")
                await connection.open(self._connect)
                self._tx_connection = connection
            committed = False
            try:
                await connection.call(_begin)
                yield SqliteTransaction(connection)
                await connection.call(_commit)
                committed = True
            finally:
                if not committed:
                    connection.end_transaction()

    async def checkpoint_in(self, tx: SqliteTransaction, name: str) -> int:
        row = await tx.fetchone("SELECT position FROM checkpoints WHERE name = ?", (name,))
        return int(row[0]) if row else 0

    async def set_checkpoint_in(self, tx: SqliteTransaction, name: str, position: int) -> None:
        await tx.execute(_SAVE_CHECKPOINT, (name, position))

    async def close(self) -> None:
        await self._appends.drain()
        async with self._tx_lock:
            if self._tx_connection is not None:
                await self._tx_connection.close()
                self._tx_connection = None
        await self._main.close()
