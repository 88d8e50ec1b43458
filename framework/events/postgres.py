"""The event store on PostgreSQL (asyncpg), for many processes and machines.

An append is one round trip: a single call of a PL/pgSQL function, run as its
own transaction, that

1. takes `pg_advisory_xact_lock(<key of this store's schema>)`,
2. reads the stream's version (a fresh snapshot, after the lock) and refuses a
   stale expected version,
3. inserts the whole batch (`unnest` of arrays) and returns its positions.

`UNIQUE(stream_id, version)` is still enforced by the database.  Why the lock:
positions come from an identity sequence, which hands out numbers at insert
time, not at commit time, so two concurrent appends could commit out of order
and a reader of `read_all(after=cursor)` would skip the one that committed
late.  With every append holding the same transaction-scoped advisory lock
until its commit is visible, positions become visible strictly in order.  The
cost is that appends to one store serialize (one commit at a time); README.md
has the measurement.  Rolled-back appends leave holes in the numbering, which
readers simply step over.
"""

from __future__ import annotations

import asyncio
import logging
import re
import zlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import asyncpg

from framework.errors import ConflictError, InvalidArgumentError, UnavailableError
from framework.events.envelope import Codec
from framework.events.notify import AppendSignal
from framework.events.store import (
    DEFAULT_PAGE_SIZE,
    AppendResult,
    NewEvent,
    RecordedEvent,
    Snapshot,
    check_limit,
    check_non_negative,
    check_stream_id,
    conflict,
    retried_append,
)
from framework.events.typeregistry import EventTypeRegistry
from framework.events.upcast import Upcasters

logger = logging.getLogger(__name__)

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.events (
    position BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    aggregate_type TEXT NOT NULL,
    event_id TEXT NOT NULL,
    type TEXT NOT NULL,
    schema_version INTEGER NOT NULL,
    metadata BYTEA NOT NULL,
    payload BYTEA NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL,
    UNIQUE (stream_id, version)
);
CREATE TABLE IF NOT EXISTS {s}.snapshots (
    stream_id TEXT PRIMARY KEY,
    version BIGINT NOT NULL,
    type TEXT NOT NULL,
    state BYTEA NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.checkpoints (
    name TEXT PRIMARY KEY,
    position BIGINT NOT NULL
);
CREATE OR REPLACE FUNCTION {s}.append_events(
    p_lock BIGINT, p_stream TEXT, p_aggregate TEXT, p_expected BIGINT, p_at TIMESTAMPTZ,
    p_ids TEXT[], p_types TEXT[], p_schemas INTEGER[], p_metas BYTEA[], p_payloads BYTEA[]
) RETURNS TABLE (actual BIGINT, positions BIGINT[])
LANGUAGE plpgsql AS $fn$
DECLARE
    v_actual BIGINT;
    v_positions BIGINT[];
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock);
    SELECT COALESCE(MAX(e.version), 0) INTO v_actual FROM {s}.events e
        WHERE e.stream_id = p_stream;
    IF p_expected IS NOT NULL AND v_actual <> p_expected THEN
        RETURN QUERY SELECT v_actual, NULL::BIGINT[];
        RETURN;
    END IF;
    WITH ins AS (
        INSERT INTO {s}.events (stream_id, version, aggregate_type, event_id, type,
                                schema_version, metadata, payload, recorded_at)
        SELECT p_stream, v_actual + u.o, p_aggregate, u.id, u.t, u.sv, u.m, u.p, p_at
        FROM unnest(p_ids, p_types, p_schemas, p_metas, p_payloads)
            WITH ORDINALITY AS u(id, t, sv, m, p, o)
        ORDER BY u.o
        RETURNING position
    )
    SELECT array_agg(ins.position ORDER BY ins.position) INTO v_positions FROM ins;
    RETURN QUERY SELECT v_actual, v_positions;
END
$fn$;
"""

_COLUMNS = (
    "position, stream_id, aggregate_type, version, event_id, type, schema_version,"
    " metadata, payload, (extract(epoch FROM recorded_at) * 1000000)::BIGINT"
)


@dataclass(frozen=True, slots=True)
class PostgresConfig:
    """Where the store lives: a DSN and a schema (one store per schema)."""

    dsn: str
    schema: str = "events"
    min_connections: int = 1
    max_connections: int = 10
    # shown in pg_stat_activity, so an operator can tell the store's connections apart
    application_name: str = "framework.events"

    def __post_init__(self) -> None:
        if not self.dsn:
            raise ValueError("dsn must be a PostgreSQL URL, e.g. postgresql://user@host/db")
        if not _IDENTIFIER.match(self.schema):
            raise ValueError(f"schema must be a lower-case SQL identifier, got {self.schema!r}")
        if not 1 <= self.min_connections <= self.max_connections:
            raise ValueError(
                "min_connections must be >= 1 and <= max_connections, got "
                f"{self.min_connections} and {self.max_connections}"
            )


def is_connection_error(error: BaseException) -> bool:
    """Whether `error` means the connection or server failed (not that the server refused a call).

    Connection lost or refused, the backend terminated (`pg_terminate_backend`,
    a restart: SQLSTATE class 57), too many connections or out of resources
    (class 53), a statement cancelled, or a connection asyncpg already closed.
    """
    if isinstance(
        error,
        OSError
        | asyncpg.PostgresConnectionError
        | asyncpg.OperatorInterventionError
        | asyncpg.InsufficientResourcesError,
    ):
        return True
    return isinstance(error, asyncpg.InterfaceError) and "closed" in str(error)


class unavailable_on_connection_errors:  # noqa: N801 - used like a function: `with ...(what):`
    """Re-raise driver connection failures as `UnavailableError` (UNAVAILABLE: retry).

    A plain class, not a generator context manager: it wraps every call of the
    store, so entering and leaving it must cost next to nothing.
    """

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if error is None or isinstance(error, UnavailableError) or not is_connection_error(error):
            return
        # the driver's text (hosts, roles, paths) goes to the log, not to callers
        logger.warning("PostgreSQL event store: %s failed: %r", self.what, error)
        raise UnavailableError(
            f"PostgreSQL event store: {self.what} failed, the connection was lost; retry"
        ) from error


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Release without asyncpg's reset round trip (`RESET ALL; UNLISTEN *; ...`).

    The store never changes session state: its locks are transaction-scoped
    and it does not LISTEN.  Projections must likewise keep to `SET LOCAL`.
    """


async def _index_event_ids(conn: asyncpg.Connection, schema: str) -> None:
    """Event ids are unique (appends are idempotent by id): a unique index, or a plain one.

    A schema written before appends were idempotent may hold one id twice; it
    gets a plain index (appends still find retries by id) and a warning.
    """
    try:
        async with conn.transaction():  # a savepoint: a failure keeps the schema work
            await conn.execute(
                f'CREATE UNIQUE INDEX IF NOT EXISTS events_event_id ON "{schema}".events (event_id)'
            )
    except asyncpg.UniqueViolationError:
        logger.warning(
            "PostgreSQL event store %s: the events table holds some event id twice (written"
            " before appends were idempotent); using a non-unique index. Find them with"
            " SELECT event_id FROM %s.events GROUP BY event_id HAVING count(*) > 1",
            schema,
            schema,
        )
        await conn.execute(
            f'CREATE INDEX IF NOT EXISTS events_event_id_any ON "{schema}".events (event_id)'
        )


class PostgresEventStore:
    """EventStore on PostgreSQL; create with `await PostgresEventStore.open(config, types)`."""

    def __init__(
        self,
        config: PostgresConfig,
        types: EventTypeRegistry,
        upcasters: Upcasters | None = None,
    ) -> None:
        self.config = config
        self.codec = Codec(types, upcasters or Upcasters())
        s = f'"{config.schema}"'
        self._lock_key = zlib.crc32(f"framework.events:{config.schema}".encode())
        self._append_sql = (
            f"SELECT actual, positions FROM {s}.append_events"
            "($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        )
        self._read_stream_sql = (
            f"SELECT {_COLUMNS} FROM {s}.events WHERE stream_id = $1 AND version >= $2"
            " ORDER BY version LIMIT $3"
        )
        self._read_all_sql = (
            f"SELECT {_COLUMNS} FROM {s}.events WHERE position > $1 ORDER BY position LIMIT $2"
        )
        self._version_sql = f"SELECT COALESCE(MAX(version), 0) FROM {s}.events WHERE stream_id = $1"
        self._head_sql = f"SELECT COALESCE(MAX(position), 0) FROM {s}.events"
        self._find_ids_sql = (
            f"SELECT event_id, stream_id, version, position FROM {s}.events"
            " WHERE event_id = ANY($1::TEXT[])"
        )
        self._save_snapshot_sql = (
            f"INSERT INTO {s}.snapshots (stream_id, version, type, state, recorded_at)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (stream_id) DO UPDATE SET"
            " version = excluded.version, type = excluded.type, state = excluded.state,"
            " recorded_at = excluded.recorded_at WHERE excluded.version >= snapshots.version"
        )
        self._load_snapshot_sql = (
            f"SELECT stream_id, version, type, state, recorded_at FROM {s}.snapshots"
            " WHERE stream_id = $1"
        )
        self._load_checkpoint_sql = f"SELECT position FROM {s}.checkpoints WHERE name = $1"
        self._save_checkpoint_sql = (
            f"INSERT INTO {s}.checkpoints (name, position) VALUES ($1, $2)"
            " ON CONFLICT (name) DO UPDATE SET position = excluded.position"
        )
        self._pool: asyncpg.Pool | None = None
        self._append_conn: asyncpg.Connection | None = None
        self._append_lock = asyncio.Lock()
        self._signal = AppendSignal()

    @classmethod
    async def open(
        cls, config: PostgresConfig, types: EventTypeRegistry, upcasters: Upcasters | None = None
    ) -> PostgresEventStore:
        store = cls(config, types, upcasters)
        try:
            pool = await asyncpg.create_pool(
                config.dsn,
                min_size=config.min_connections,
                max_size=config.max_connections,
                reset=_keep_session,
                server_settings={"application_name": config.application_name},
            )
        except (OSError, asyncpg.PostgresError) as exc:
            raise UnavailableError(f"cannot connect to PostgreSQL: {exc}") from exc
        store._pool = pool
        try:
            with unavailable_on_connection_errors("schema set-up"):
                await store._create_schema()
        except BaseException:
            await pool.close()
            raise
        return store

    async def _create_schema(self) -> None:
        """Tables and the append function; serialized between processes opening the store."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", self._lock_key)
            await conn.execute(_SCHEMA.format(s=f'"{self.config.schema}"'))
            await _index_event_ids(conn, self.config.schema)

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise UnavailableError("the PostgreSQL event store is closed (or was never opened)")
        return self._pool

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
        args = (
            self._lock_key,
            stream_id,
            aggregate_type,
            expected_version,
            datetime.now(UTC),
            [r[0] for r in rows],
            [r[1] for r in rows],
            [r[2] for r in rows],
            [r[3] for r in rows],
            [r[4] for r in rows],
        )
        async with self._append_lock:
            with unavailable_on_connection_errors(
                "append (its outcome is unknown: retry it with the same events,"
                " appends are idempotent)"
            ):
                record = await self._append_call(args)
        if record is None or record[1] is None:
            # Refused: a stale expected version, or a unique violation (version or
            # event id).  Only now look the ids up: a retry of an append that
            # happened is its first result, nothing written (no cost when all is well).
            ids: list[str] = args[5]
            with unavailable_on_connection_errors("append"):
                found = await self.pool.fetch(self._find_ids_sql, ids)
            if found:
                outcome = retried_append(
                    stream_id, expected_version, ids, [tuple(r) for r in found]
                )
                if isinstance(outcome, ConflictError):
                    raise outcome
                return outcome
            actual = record[0] if record is not None else await self.stream_version(stream_id)
            raise conflict(stream_id, expected_version, actual)
        actual, positions = record[0], record[1]
        self._signal.notify()
        return AppendResult(tuple(positions), actual + len(rows))

    async def _append_call(self, args: tuple[Any, ...]) -> Any:
        """Run the append function on the store's append connection (caller holds the lock).

        Appends of one store serialize on the advisory lock anyway, so they share
        one connection kept out of the pool: no acquire/release per append.  A
        connection that failed or whose call was cancelled goes back to the pool
        (which closes or cleans it) and the next append takes a fresh one.
        """
        conn = self._append_conn
        if conn is None:
            conn = self._append_conn = await self.pool.acquire()
        try:
            return await conn.fetchrow(self._append_sql, *args)
        except asyncpg.UniqueViolationError:
            return None
        except asyncpg.DataError as exc:
            logger.warning("PostgreSQL refused an append to %r: %r", args[1], exc)
            raise InvalidArgumentError(
                "the database refused these events (a value is malformed or out of range, "
                "e.g. a NUL character in a string); nothing was stored"
            ) from exc
        except BaseException as exc:
            if isinstance(exc, asyncpg.PostgresError) and not (
                is_connection_error(exc) or conn.is_closed()
            ):
                raise  # the server refused this call; the connection is fine
            # Lost, terminated or cancelled mid-call: never reuse this connection.
            self._append_conn = None
            await asyncio.shield(self.pool.release(conn))
            raise

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        check_stream_id(snapshot.stream_id)
        check_non_negative("snapshot.version", snapshot.version)
        at = snapshot.recorded_at or datetime.now(UTC)
        with unavailable_on_connection_errors("save_snapshot"):
            await self.pool.execute(
                self._save_snapshot_sql,
                snapshot.stream_id,
                snapshot.version,
                snapshot.type,
                snapshot.state,
                at,
            )

    async def save_checkpoint(self, name: str, position: int) -> None:
        check_non_negative("position", position)
        with unavailable_on_connection_errors("save_checkpoint"):
            await self.pool.execute(self._save_checkpoint_sql, name, position)

    # ------------------------------------------------------------ reads

    async def read_stream(
        self, stream_id: str, from_version: int = 1, limit: int = DEFAULT_PAGE_SIZE
    ) -> list[RecordedEvent]:
        check_stream_id(stream_id)
        check_non_negative("from_version", from_version)
        check_limit(limit)
        with unavailable_on_connection_errors("read_stream"):
            rows = await self.pool.fetch(self._read_stream_sql, stream_id, from_version, limit)
            return [self.codec.recorded(tuple(r)) for r in rows]

    async def read_all(
        self, after_position: int = 0, limit: int = DEFAULT_PAGE_SIZE
    ) -> list[RecordedEvent]:
        check_non_negative("after_position", after_position)
        check_limit(limit)
        with unavailable_on_connection_errors("read_all"):
            rows = await self.pool.fetch(self._read_all_sql, after_position, limit)
            return [self.codec.recorded(tuple(r)) for r in rows]

    async def stream_version(self, stream_id: str) -> int:
        check_stream_id(stream_id)
        with unavailable_on_connection_errors("stream_version"):
            return int(await self.pool.fetchval(self._version_sql, stream_id))

    async def head_position(self) -> int:
        with unavailable_on_connection_errors("head_position"):
            return int(await self.pool.fetchval(self._head_sql))

    async def wait_for_events(self, after_position: int, timeout_s: float) -> bool:
        return await self._signal.wait_past(after_position, timeout_s, self.head_position)

    async def load_snapshot(self, stream_id: str) -> Snapshot | None:
        check_stream_id(stream_id)
        with unavailable_on_connection_errors("load_snapshot"):
            row = await self.pool.fetchrow(self._load_snapshot_sql, stream_id)
            if row is None:
                return None
            return Snapshot(row[0], row[1], row[2], bytes(row[3]), row[4])

    async def load_checkpoint(self, name: str) -> int:
        with unavailable_on_connection_errors("load_checkpoint"):
            value = await self.pool.fetchval(self._load_checkpoint_sql, name)
            return int(value) if value is not None else 0

    # ------------------------------------------------------------ projections

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        """An asyncpg connection inside a transaction on the store's database.

        A lost connection, also one the block's own statements ran into, leaves
        it as `UnavailableError` (the transaction did not commit; retry it).
        """
        with unavailable_on_connection_errors("transaction"):
            async with self.pool.acquire() as conn, conn.transaction():
                yield conn

    async def checkpoint_in(self, tx: Any, name: str) -> int:
        # One runner per checkpoint at a time: the lock lasts until `tx` ends.
        with unavailable_on_connection_errors("checkpoint_in"):
            await tx.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))", self.config.schema, name
            )
            value = await tx.fetchval(self._load_checkpoint_sql, name)
            return int(value) if value is not None else 0

    async def set_checkpoint_in(self, tx: Any, name: str, position: int) -> None:
        with unavailable_on_connection_errors("set_checkpoint_in"):
            await tx.execute(self._save_checkpoint_sql, name, position)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        conn, self._append_conn = self._append_conn, None
        if pool is not None and conn is not None:
            await pool.release(conn)
        if pool is not None:
            await pool.close()
