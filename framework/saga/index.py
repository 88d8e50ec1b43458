"""The saga index: one row per saga (status, definition, times), a projection of the saga log.

It answers `ListSagas` (filter by status and definition, newest first) and
tells the orchestrator, at start-up, which sagas are unfinished.  It is an
ordinary projection (`framework.events.projection`) kept in the event store's
own database, so each batch of rows moves together with its checkpoint; the
orchestrator catches it up before resuming, so a crash between an append and
the index never hides a saga.  Events of other aggregates in a shared store
are skipped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from framework.events.envelope import to_micros
from framework.events.store import RecordedEvent
from framework.saga.run import AGGREGATE_TYPE, SagaStatus
from gen.saga.v1 import events_pb2 as ev

__all__ = ["IndexRow", "SagaIndex"]

NAME = "saga-index"
_PLACEHOLDER = re.compile(r"\?")

_EVENT_TYPES: dict[str, type[Message]] = {
    cls.DESCRIPTOR.full_name: cls
    for cls in (
        ev.SagaStarted,
        ev.CompensationStarted,
        ev.SagaCompleted,
        ev.SagaCompensated,
        ev.SagaNeedsAttention,
        ev.SagaRetried,
    )
}


@dataclass(frozen=True, slots=True)
class IndexRow:
    """One saga in a listing."""

    saga_id: str
    definition: str
    status: SagaStatus
    error: str
    created_us: int
    updated_us: int
    position: int


class SagaIndex:
    """The projection and its queries, for the SQLite or the PostgreSQL event store."""

    def __init__(self, store: Any) -> None:
        from framework.events.sqlite import SqliteEventStore

        self.store = store
        self._postgres = not isinstance(store, SqliteEventStore)
        if self._postgres:
            self.table = f'"{store.config.schema}".saga_index'
            self._index_name = "saga_index_status"
        else:
            self.table = "saga_index"
            self._index_name = "saga_index_status"

    @property
    def name(self) -> str:
        return NAME

    # ------------------------------------------------------------ SQL plumbing

    def _sql(self, sql: str) -> str:
        if not self._postgres:
            return sql
        counter = iter(range(1, 1000))
        return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)

    async def _execute(self, tx: Any, sql: str, params: Sequence[object] = ()) -> None:
        if self._postgres:
            await tx.execute(self._sql(sql), *params)
        else:
            await tx.execute(sql, params)

    async def _fetch(self, tx: Any, sql: str, params: Sequence[object] = ()) -> list[Any]:
        if self._postgres:
            return list(await tx.fetch(self._sql(sql), *params))
        return list(await tx.fetchall(sql, params))

    async def setup(self) -> None:
        """Create the table and its index if missing."""
        async with self.store.transaction() as tx:
            await self._execute(
                tx,
                f"CREATE TABLE IF NOT EXISTS {self.table} ("
                " saga_id TEXT PRIMARY KEY, definition TEXT NOT NULL, status INTEGER NOT NULL,"
                " error TEXT NOT NULL, attention_from INTEGER NOT NULL,"
                " created_us BIGINT NOT NULL, updated_us BIGINT NOT NULL,"
                " position BIGINT NOT NULL)",
            )
            await self._execute(
                tx,
                f"CREATE INDEX IF NOT EXISTS {self._index_name} ON {self.table} (status, position)",
            )

    # ------------------------------------------------------------ projection

    async def apply(self, tx: Any, event: RecordedEvent) -> None:
        if event.aggregate_type != AGGREGATE_TYPE:
            return
        at = to_micros(event.recorded_at)
        cls = _EVENT_TYPES.get(event.type)
        if cls is None:  # a step-level event: the saga moved
            await self._execute(
                tx,
                f"UPDATE {self.table} SET updated_us = ? WHERE saga_id = ?",
                (at, event.stream_id),
            )
            return
        message = cls.FromString(event.payload)
        sid = event.stream_id
        if isinstance(message, ev.SagaStarted):
            await self._execute(
                tx,
                f"INSERT INTO {self.table} (saga_id, definition, status, error, attention_from,"
                " created_us, updated_us, position) VALUES (?, ?, ?, '', 0, ?, ?, ?)"
                " ON CONFLICT (saga_id) DO NOTHING",
                (sid, message.definition, int(SagaStatus.RUNNING), at, at, event.position),
            )
        elif isinstance(message, ev.SagaRetried):
            await self._execute(
                tx,
                f"UPDATE {self.table} SET status = CASE WHEN attention_from = 0 THEN ? ELSE"
                " attention_from END, error = '', updated_us = ? WHERE saga_id = ?",
                (int(SagaStatus.RUNNING), at, sid),
            )
        elif isinstance(message, ev.SagaNeedsAttention):
            await self._execute(
                tx,
                f"UPDATE {self.table} SET attention_from = status, status = ?, error = ?,"
                " updated_us = ? WHERE saga_id = ?",
                (int(SagaStatus.NEEDS_ATTENTION), message.reason, at, sid),
            )
        elif isinstance(message, ev.CompensationStarted):
            await self._set(tx, sid, SagaStatus.COMPENSATING, at, message.reason)
        elif isinstance(message, ev.SagaCompleted):
            await self._set(tx, sid, SagaStatus.COMPLETED, at)
        elif isinstance(message, ev.SagaCompensated):
            await self._set(tx, sid, SagaStatus.COMPENSATED, at)

    async def _set(
        self, tx: Any, saga_id: str, status: SagaStatus, at: int, error: str | None = None
    ) -> None:
        if error is None:
            sql = f"UPDATE {self.table} SET status = ?, updated_us = ? WHERE saga_id = ?"
            await self._execute(tx, sql, (int(status), at, saga_id))
        else:
            sql = f"UPDATE {self.table} SET status = ?, error = ?, updated_us = ? WHERE saga_id = ?"
            await self._execute(tx, sql, (int(status), error, at, saga_id))

    async def reset(self, tx: Any) -> None:
        await self._execute(tx, f"DELETE FROM {self.table}")

    # ------------------------------------------------------------ queries

    async def active_ids(self) -> list[str]:
        """Ids of the sagas still running or compensating, oldest first."""
        async with self.store.transaction() as tx:
            rows = await self._fetch(
                tx,
                f"SELECT saga_id FROM {self.table} WHERE status IN (?, ?) ORDER BY position",
                (int(SagaStatus.RUNNING), int(SagaStatus.COMPENSATING)),
            )
        return [str(row[0]) for row in rows]

    async def page(
        self,
        *,
        status: SagaStatus = SagaStatus.UNSPECIFIED,
        definition: str = "",
        limit: int = 50,
        before_position: int = 0,
    ) -> list[IndexRow]:
        """Sagas matching the filters, newest first, started before `before_position` (0: any)."""
        where: list[str] = []
        params: list[object] = []
        if status is not SagaStatus.UNSPECIFIED:
            where.append("status = ?")
            params.append(int(status))
        if definition:
            where.append("definition = ?")
            params.append(definition)
        if before_position > 0:
            where.append("position < ?")
            params.append(before_position)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        sql = (
            "SELECT saga_id, definition, status, error, created_us, updated_us, position"
            f" FROM {self.table}{clause} ORDER BY position DESC LIMIT ?"
        )
        async with self.store.transaction() as tx:
            rows = await self._fetch(tx, sql, (*params, limit))
        return [
            IndexRow(
                str(r[0]),
                str(r[1]),
                SagaStatus(int(r[2])),
                str(r[3]),
                int(r[4]),
                int(r[5]),
                int(r[6]),
            )
            for r in rows
        ]
