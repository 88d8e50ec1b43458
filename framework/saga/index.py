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

__all__ = ["IndexHost", "IndexRow", "SagaIndex"]

NAME = "saga-index"
_SET = "UPDATE {t} SET status = ?, updated_us = ? WHERE saga_id = ?"
_SET_ERROR = "UPDATE {t} SET status = ?, error = ?, updated_us = ? WHERE saga_id = ?"
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


class IndexHost:
    """The store as the index's projection host: flushes the index before each checkpoint."""

    def __init__(self, store: Any, index: SagaIndex) -> None:
        self.store = store
        self.index = index

    def transaction(self) -> Any:
        return self.store.transaction()

    async def checkpoint_in(self, tx: Any, name: str) -> int:
        position: int = await self.store.checkpoint_in(tx, name)
        return position

    async def set_checkpoint_in(self, tx: Any, name: str, position: int) -> None:
        await self.index.flush(tx)
        await self.store.set_checkpoint_in(tx, name, position)

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        events: list[RecordedEvent] = await self.store.read_all(after_position, limit)
        return events

    async def head_position(self) -> int:
        head: int = await self.store.head_position()
        return head

    async def wait_for_events(self, after_position: int, timeout_s: float) -> bool:
        found: bool = await self.store.wait_for_events(after_position, timeout_s)
        return found


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
        self._buffers: dict[int, dict[str, list[tuple[str, tuple[object, ...]]]]] = {}
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
        """Buffer the row change for `event` (written by `flush`, before the checkpoint)."""
        if event.aggregate_type != AGGREGATE_TYPE:
            return
        cls = _EVENT_TYPES.get(event.type)
        if cls is None:  # a step-level event: the row changes only with the saga's status
            return
        at = to_micros(event.recorded_at)
        message = cls.FromString(event.payload)
        sid = event.stream_id
        t = self.table
        change: tuple[str, tuple[object, ...]]
        if isinstance(message, ev.SagaStarted):
            change = (
                f"INSERT INTO {t} (saga_id, definition, status, error, attention_from,"
                " created_us, updated_us, position) VALUES (?, ?, ?, '', 0, ?, ?, ?)"
                " ON CONFLICT (saga_id) DO NOTHING",
                (sid, message.definition, int(SagaStatus.RUNNING), at, at, event.position),
            )
        elif isinstance(message, ev.SagaRetried):
            change = (
                f"UPDATE {t} SET status = CASE WHEN attention_from = 0 THEN ? ELSE"
                " attention_from END, error = '', updated_us = ? WHERE saga_id = ?",
                (int(SagaStatus.RUNNING), at, sid),
            )
        elif isinstance(message, ev.SagaNeedsAttention):
            change = (
                f"UPDATE {t} SET attention_from = status, status = ?, error = ?,"
                " updated_us = ? WHERE saga_id = ?",
                (int(SagaStatus.NEEDS_ATTENTION), message.reason, at, sid),
            )
        elif isinstance(message, ev.CompensationStarted):
            change = (
                _SET_ERROR.format(t=t),
                (int(SagaStatus.COMPENSATING), message.reason, at, sid),
            )
        else:
            status = (
                SagaStatus.COMPLETED
                if isinstance(message, ev.SagaCompleted)
                else SagaStatus.COMPENSATED
            )
            change = (_SET.format(t=t), (int(status), at, sid))
        self._buffers.setdefault(id(tx), {}).setdefault(sid, []).append(change)

    async def flush(self, tx: Any) -> None:
        """Write the buffered changes of `tx`'s batch in a few statements.

        Changes of different sagas commute; those of one saga keep their order.
        So round k takes the k-th change of every saga, grouped by statement
        into one `executemany` each: a batch costs a handful of round trips to
        the database thread or server, however many sagas moved.
        """
        per_saga = self._buffers.pop(id(tx), {})
        rounds = max((len(changes) for changes in per_saga.values()), default=0)
        for k in range(rounds):
            grouped: dict[str, list[tuple[object, ...]]] = {}
            for changes in per_saga.values():
                if k < len(changes):
                    sql, params = changes[k]
                    grouped.setdefault(sql, []).append(params)
            for sql, rows in grouped.items():
                if self._postgres:
                    await tx.executemany(self._sql(sql), rows)
                else:
                    await tx.executemany(sql, rows)

    async def reset(self, tx: Any) -> None:
        self._buffers.pop(id(tx), None)
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
