"""The participant barrier on PostgreSQL (asyncpg), inside the participant's transaction.

    barrier = PostgresBarrier(schema="payments")
    await barrier.create_table(pool_or_conn)               # once, at start-up

    async with pool.acquire() as conn, conn.transaction():
        reply = await barrier.guard(
            conn, BarrierCall.current(request),
            lambda: charge(conn, request),                 # async; runs only on the first call
            ProtoCodec(ChargePaymentResponse),
            null_result=lambda: ...,                       # compensations only
        )

Semantics are in `framework.saga.barrier`.  Under READ COMMITTED an insert
that meets an uncommitted row with the same `(branch, op)` waits for that
transaction: an action and its compensation racing on one branch are
serialized by the primary key, and the later one sees the earlier's outcome.
It takes asyncpg connections (duck-typed: the module imports no driver).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

from framework.saga.barrier import (
    BarrierCall,
    Decision,
    Entry,
    Op,
    ResultCodec,
    StoredRow,
    check_identifier,
    replayed,
)

__all__ = ["PostgresBarrier"]

T = TypeVar("T")


class PostgresBarrier:
    """Barrier rows in `schema.table` of the participant's own PostgreSQL database."""

    def __init__(self, schema: str = "public", table: str = "saga_barrier") -> None:
        check_identifier(schema, "schema")
        check_identifier(table, "table")
        self.schema, self.table = schema, table
        qualified = f'"{schema}"."{table}"'
        self.qualified = qualified
        self._insert = (
            f"INSERT INTO {qualified} (branch, op, written_by, fingerprint, created_at)"
            " VALUES ($1, $2, $3, $4, now()) ON CONFLICT (branch, op) DO NOTHING"
        )
        self._select = (
            f"SELECT written_by, fingerprint, result FROM {qualified} WHERE branch=$1 AND op=$2"
        )
        self._record = f"UPDATE {qualified} SET result = $1 WHERE branch = $2 AND op = $3"

    async def create_table(self, executor: Any) -> None:
        """Create the schema and table if missing; `executor` is a pool or a connection."""
        await executor.execute(
            f'CREATE SCHEMA IF NOT EXISTS "{self.schema}";'
            f"CREATE TABLE IF NOT EXISTS {self.qualified} ("
            " branch TEXT NOT NULL, op TEXT NOT NULL, written_by TEXT NOT NULL,"
            " fingerprint BYTEA NOT NULL, result BYTEA, created_at TIMESTAMPTZ NOT NULL,"
            " PRIMARY KEY (branch, op))"
        )

    async def _insert_row(self, conn: Any, branch: str, op: Op, by: Op, fp: bytes) -> bool:
        status: str = await conn.execute(self._insert, branch, op.value, by.value, fp)
        return status.endswith(" 1")  # "INSERT 0 1" inserted, "INSERT 0 0" conflict

    async def _row(self, conn: Any, branch: str, op: Op) -> StoredRow | None:
        row = await conn.fetchrow(self._select, branch, op.value)
        if row is None:
            return None
        result = row[2]
        return StoredRow(row[0], bytes(row[1]), None if result is None else bytes(result))

    async def enter(self, conn: Any, call: BarrierCall) -> Entry:
        """Record the call in the open transaction and decide (see `Decision`).

        Raises FailedPreconditionError for a hanging action and AlreadyExistsError
        for a key reused with another request; roll the transaction back then.
        """
        if not conn.is_in_transaction():
            raise RuntimeError("PostgresBarrier.enter needs an open transaction")
        if call.op is Op.COMPENSATION:
            null = await self._insert_row(conn, call.branch, Op.ACTION, Op.COMPENSATION, b"")
            fresh = await self._insert_row(
                conn, call.branch, Op.COMPENSATION, Op.COMPENSATION, call.fingerprint
            )
            if not fresh:
                row = await self._row(conn, call.branch, Op.COMPENSATION)
                return replayed(call, Op.COMPENSATION, row)
            return Entry(call, Decision.NULL_COMPENSATION if null else Decision.PROCEED)
        if await self._insert_row(conn, call.branch, call.op, call.op, call.fingerprint):
            return Entry(call, Decision.PROCEED)
        return replayed(call, call.op, await self._row(conn, call.branch, call.op))

    async def record(self, conn: Any, entry: Entry, result: bytes) -> None:
        """Store the answer of a PROCEED / NULL_COMPENSATION call for its replays."""
        await conn.execute(self._record, result, entry.call.branch, entry.call.op.value)

    async def guard(
        self,
        conn: Any,
        call: BarrierCall,
        work: Callable[[], Awaitable[T]],
        codec: ResultCodec[T],
        *,
        null_result: Callable[[], T] | None = None,
    ) -> T:
        """Run `await work()` once per key inside the open transaction; replays answer the first.

        `null_result()` answers a compensation whose action never ran (required
        for compensations; `work` is not called then).
        """
        entry = await self.enter(conn, call)
        if entry.decision is Decision.REPLAY:
            return codec.decode(entry.result)
        if entry.decision is Decision.NULL_COMPENSATION:
            if null_result is None:
                raise TypeError("guard() of a compensation needs null_result=")
            value = null_result()
        else:
            value = await work()
        await self.record(conn, entry, codec.encode(value))
        return value

    async def prune_before(self, executor: Any, cutoff: datetime) -> int:
        """Delete rows written before `cutoff` (timezone-aware); rows deleted."""
        status: str = await executor.execute(
            f"DELETE FROM {self.qualified} WHERE created_at < $1", cutoff
        )
        return int(status.rsplit(" ", 1)[-1])
