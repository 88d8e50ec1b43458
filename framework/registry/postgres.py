"""PostgreSQL registry store (asyncpg): several registry replicas share one view.

Every change bumps a revision row and sends `NOTIFY` with the new revision and
the changed service in the same transaction, so a replica's watch hub wakes as
soon as another replica commits and re-reads only that service.  While the
listening connection is lost, `listening` is False and the hub compares the
watched services' revisions every `watch_poll_s` (asking the store to listen
again each time); nothing is polled while it listens.  All tables live in one
schema (`schema=`), created on `open()`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar

import asyncpg

from framework.errors import UnavailableError
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

logger = logging.getLogger(__name__)
T = TypeVar("T")
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")
# The database's clock, in epoch seconds: leases are timed by it unless the registry has
# a clock of its own (tests), so replicas whose wall clocks disagree still agree on leases.
DB_NOW = "extract(epoch from clock_timestamp())::float8"
# Lost connections and a server that went away: the store is unavailable for now.
_GONE = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)
# ... and a server that is shutting down or not accepting connections yet.
_DOWN = (
    *_GONE,
    TimeoutError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.CannotConnectNowError,
)
P = ParamSpec("P")


def _unavailable_when_down(
    method: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """The store's database unreachable is `UnavailableError` (UNAVAILABLE: retry), not
    INTERNAL; the driver's text goes to the log, never to callers."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except _DOWN as error:
            logger.warning("registry database unreachable in %s: %r", method.__name__, error)
            raise UnavailableError(
                "the registry's database is unreachable; retry shortly",
                reason="REGISTRY_STORE_DOWN",
            ) from error

    return wrapper


_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.registry_revision (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    value BIGINT NOT NULL
);
INSERT INTO {s}.registry_revision (id, value) VALUES (1, 0) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS {s}.registry_services (
    name TEXT PRIMARY KEY,
    revision BIGINT NOT NULL,
    version_weights TEXT NOT NULL DEFAULT '{{}}'
);
CREATE TABLE IF NOT EXISTS {s}.registry_instances (
    lease_id TEXT PRIMARY KEY,
    service TEXT NOT NULL,
    address TEXT NOT NULL,
    version TEXT NOT NULL,
    zone TEXT NOT NULL,
    weight INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    health INTEGER NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    ttl_s DOUBLE PRECISION NOT NULL,
    owner TEXT NOT NULL DEFAULT '',
    UNIQUE (service, address)
);
ALTER TABLE {s}.registry_instances ADD COLUMN IF NOT EXISTS owner TEXT NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS registry_instances_expiry ON {s}.registry_instances (expires_at);
"""


class PostgresStore:
    """Registry state in PostgreSQL schema `schema`, shared by every replica using it."""

    def __init__(self, dsn: str, *, schema: str = "registry", pool_size: int = 4) -> None:
        if not _IDENT.match(schema):
            raise ValueError(
                f"schema must be a lower-case SQL identifier (letters, digits, _), got {schema!r}"
            )
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        self.dsn = dsn
        self.schema = schema
        self.channel = f"registry_{schema}"[:63]
        self._pool_size = pool_size
        self._pool: Any = None
        self._listener: Any = None
        self._feed = ChangeFeed()
        self._relisten_lock = asyncio.Lock()
        # The connection holding the leader lock (a session advisory lock), if any.
        self._lock_conn: Any = None
        self._leading = False

    # ----------------------------------------------------------- plumbing
    async def open(self) -> None:
        if self._pool is not None:
            return
        self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=self._pool_size)
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", self.schema)
            await conn.execute(_SCHEMA.format(s=self.schema))
        self._listener = await self._listen()

    async def close(self) -> None:
        await self.resign()
        listener, pool = self._listener, self._pool
        self._listener, self._pool = None, None
        if listener is not None:
            await listener.close()
        if pool is not None:
            await pool.close()

    async def _listen(self) -> Any:
        listener = await asyncpg.connect(self.dsn)
        await listener.add_listener(self.channel, self._on_notify)
        listener.add_termination_listener(self._on_listener_lost)
        return listener

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        """ "REVISION SERVICE" (a replica of this version) or "REVISION" (an older one)."""
        revision, _, service = payload.partition(" ")
        try:
            self._feed.publish(int(revision), service or None)
        except ValueError:
            logger.warning("ignoring registry notification with payload %r", payload)

    def _on_listener_lost(self, _conn: object) -> None:
        if self._pool is not None:  # not our own close()
            logger.warning("registry LISTEN connection lost; watchers poll until it is back")
            self._feed.publish(0, None)

    def _require_pool(self) -> Any:
        if self._pool is None:
            raise RuntimeError("PostgresStore is not open: call `await store.open()` first")
        return self._pool

    async def _tx(self, body: Callable[[Any], Awaitable[T]]) -> T:
        """A write transaction. Writers lock the revision row first, so they queue in one
        order and never deadlock (registry writes are rare; heartbeats do not take it)."""
        async with self._require_pool().acquire() as conn, conn.transaction():
            await conn.execute(
                f"SELECT 1 FROM {self.schema}.registry_revision WHERE id = 1 FOR UPDATE"
            )
            return await body(conn)

    async def _bump(self, conn: Any, service: str) -> int:
        s = self.schema
        revision = int(
            await conn.fetchval(
                f"UPDATE {s}.registry_revision SET value = value + 1 WHERE id = 1 RETURNING value"
            )
        )
        await conn.execute(
            f"INSERT INTO {s}.registry_services (name, revision) VALUES ($1, $2) "
            "ON CONFLICT (name) DO UPDATE SET revision = excluded.revision",
            service,
            revision,
        )
        await conn.execute("SELECT pg_notify($1, $2)", self.channel, f"{revision} {service}")
        return revision

    # ------------------------------------------------------------- writes
    @_unavailable_when_down
    async def put(self, instance: Instance) -> int | None:
        s = self.schema

        async def body(conn: Any) -> int | None:
            stored = await conn.fetchval(
                f"INSERT INTO {s}.registry_instances ({INSTANCE_COLUMNS}) "
                f"VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) {UPSERT_ON_ADDRESS}",
                *instance_row(instance),
            )
            if stored is None:  # another owner holds this address
                return None
            return await self._bump(conn, instance.service)

        revision = await self._tx(body)
        if revision is not None:
            self._feed.publish(revision, instance.service)
        return revision

    @_unavailable_when_down
    async def now(self) -> float:
        return float(await self._require_pool().fetchval(f"SELECT {DB_NOW}"))

    @_unavailable_when_down
    async def renew(self, lease_id: str, now: float | None) -> Instance | None:
        row = await self._require_pool().fetchrow(
            f"WITH t AS (SELECT COALESCE($1::float8, {DB_NOW}) AS now) "
            f"UPDATE {self.schema}.registry_instances SET expires_at = t.now + ttl_s FROM t "
            f"WHERE lease_id = $2 AND expires_at > t.now RETURNING {INSTANCE_COLUMNS}",
            now,
            lease_id,
        )
        return None if row is None else instance_from_row(tuple(row))

    @_unavailable_when_down
    async def extend_leases(self, now: float | None) -> int:
        status = await self._require_pool().execute(
            f"WITH t AS (SELECT COALESCE($1::float8, {DB_NOW}) AS now) "
            f"UPDATE {self.schema}.registry_instances SET expires_at = t.now + ttl_s FROM t "
            "WHERE expires_at < t.now + ttl_s",
            now,
        )
        return int(str(status).rsplit(" ", 1)[-1])

    # --------------------------------------------------------- leadership
    async def try_lead(self) -> bool:
        """Hold a session advisory lock on a connection of our own: the lock lives exactly
        as long as that session, so a replica that dies or loses it frees the lock."""
        conn = self._lock_conn
        if self._leading and (conn is None or conn.is_closed()):
            logger.warning("registry leader lock connection closed; the lead is lost")
            await self._drop_lock_conn()  # report the loss; try again next period
            return False
        try:
            if conn is None or conn.is_closed():
                conn = self._lock_conn = await asyncpg.connect(self.dsn)
            if self._leading:
                await conn.fetchval("SELECT 1")  # the session (and so the lock) is alive
                return True
            self._leading = bool(
                await conn.fetchval(
                    "SELECT pg_try_advisory_lock(hashtext('framework.registry'), hashtext($1))",
                    self.schema,
                )
            )
        except (*_GONE, asyncpg.PostgresError) as error:  # e.g. AdminShutdownError
            logger.warning("registry leader lock connection lost (%s)", error)
            await self._drop_lock_conn()
            return False
        return self._leading

    async def resign(self) -> None:
        await self._drop_lock_conn()

    async def _drop_lock_conn(self) -> None:
        conn, self._lock_conn, self._leading = self._lock_conn, None, False
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 5)
            except (*_GONE, TimeoutError):
                conn.terminate()

    @_unavailable_when_down
    async def delete(self, lease_id: str) -> Instance | None:
        async def body(conn: Any) -> tuple[Instance | None, int | None]:
            row = await conn.fetchrow(
                f"DELETE FROM {self.schema}.registry_instances WHERE lease_id = $1 "
                f"RETURNING {INSTANCE_COLUMNS}",
                lease_id,
            )
            if row is None:
                return None, None
            removed = instance_from_row(tuple(row))
            return removed, await self._bump(conn, removed.service)

        removed, revision = await self._tx(body)
        if removed is not None and revision is not None:
            self._feed.publish(revision, removed.service)
        return removed

    @_unavailable_when_down
    async def set_health(self, lease_id: str, health: Health) -> bool:
        async def body(conn: Any) -> tuple[int, str] | None:
            service = await conn.fetchval(
                f"UPDATE {self.schema}.registry_instances SET health = $1 "
                "WHERE lease_id = $2 AND health != $1 RETURNING service",
                health.value,
                lease_id,
            )
            return None if service is None else (await self._bump(conn, service), service)

        changed = await self._tx(body)
        if changed is not None:
            self._feed.publish(*changed)
        return changed is not None

    @_unavailable_when_down
    async def expire(self, now: float | None) -> list[Instance]:
        async def body(conn: Any) -> tuple[list[Instance], list[tuple[int, str]]]:
            rows = await conn.fetch(
                f"DELETE FROM {self.schema}.registry_instances "
                f"WHERE expires_at <= COALESCE($1::float8, {DB_NOW}) "
                f"RETURNING {INSTANCE_COLUMNS}",
                now,
            )
            removed = [instance_from_row(tuple(r)) for r in rows]
            changes = [
                (await self._bump(conn, service), service)
                for service in sorted({i.service for i in removed})
            ]
            return removed, changes

        removed, changes = await self._tx(body)
        for revision, service in changes:
            self._feed.publish(revision, service)
        return removed

    @_unavailable_when_down
    async def set_version_weights(self, service: str, weights: Mapping[str, int]) -> int:
        async def body(conn: Any) -> int:
            revision = await self._bump(conn, service)
            await conn.execute(
                f"UPDATE {self.schema}.registry_services SET version_weights = $1 WHERE name = $2",
                weights_to_json(weights),
                service,
            )
            return revision

        revision = await self._tx(body)
        self._feed.publish(revision, service)
        return revision

    # -------------------------------------------------------------- reads
    @_unavailable_when_down
    async def get(self, lease_id: str) -> Instance | None:
        row = await self._require_pool().fetchrow(
            f"SELECT {INSTANCE_COLUMNS} FROM {self.schema}.registry_instances WHERE lease_id = $1",
            lease_id,
        )
        return None if row is None else instance_from_row(tuple(row))

    async def _read_view(self, conn: Any, service: str) -> ServiceView:
        s = self.schema
        head = await conn.fetchrow(
            f"SELECT revision, version_weights FROM {s}.registry_services WHERE name = $1",
            service,
        )
        if head is None:
            return ServiceView(service, 0)
        rows = await conn.fetch(
            f"SELECT {INSTANCE_COLUMNS} FROM {s}.registry_instances WHERE service = $1 "
            "ORDER BY address",
            service,
        )
        return ServiceView(
            service,
            int(head[0]),
            tuple(instance_from_row(tuple(r)) for r in rows),
            weights_from_json(head[1]),
        )

    @_unavailable_when_down
    async def view(self, service: str) -> ServiceView:
        async def body(conn: Any) -> ServiceView:
            return await self._read_view(conn, service)

        return await self._read_only(body)

    @_unavailable_when_down
    async def views(self) -> list[ServiceView]:
        async def body(conn: Any) -> list[ServiceView]:
            names = await conn.fetch(
                f"SELECT name FROM {self.schema}.registry_services ORDER BY name"
            )
            return [await self._read_view(conn, r[0]) for r in names]

        return await self._read_only(body)

    async def _read_only(self, body: Callable[[Any], Awaitable[T]]) -> T:
        """One consistent snapshot (REPEATABLE READ) for multi-statement reads."""
        pool = self._require_pool()
        async with (
            pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            return await body(conn)

    @_unavailable_when_down
    async def instances(self) -> list[Instance]:
        rows = await self._require_pool().fetch(
            f"SELECT {INSTANCE_COLUMNS} FROM {self.schema}.registry_instances "
            "ORDER BY service, address"
        )
        return [instance_from_row(tuple(r)) for r in rows]

    @_unavailable_when_down
    async def revision(self) -> int:
        value = await self._require_pool().fetchval(
            f"SELECT value FROM {self.schema}.registry_revision WHERE id = 1"
        )
        return int(value)

    @_unavailable_when_down
    async def service_revisions(self, services: Sequence[str]) -> dict[str, int]:
        rows = await self._require_pool().fetch(
            f"SELECT name, revision FROM {self.schema}.registry_services "
            "WHERE name = ANY($1::text[])",
            list(services),
        )
        return {str(r[0]): int(r[1]) for r in rows}

    def on_change(self, listener: ChangeListener) -> None:
        self._feed.subscribe(listener)

    @property
    def listening(self) -> bool:
        return self._listener is not None and not self._listener.is_closed()

    async def relisten(self) -> None:
        """Open a new LISTEN connection if the old one closed (one attempt per call);
        then announce that anything may have changed meanwhile."""
        if self._pool is None or self.listening:
            return
        async with self._relisten_lock:
            if self.listening:
                return
            try:
                listener = await self._listen()
            except (*_GONE, asyncpg.PostgresError) as error:
                logger.warning("registry LISTEN connection lost (%s); polling meanwhile", error)
                return
            self._listener = listener
            logger.info("registry LISTEN connection re-established")
        self._feed.publish(0, None)

    async def drop(self) -> None:
        """Remove the schema and everything in it (tests, decommissioning)."""
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")
        finally:
            await conn.close()
