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
`created_us` comes from the participant's clock (like `SqliteBarrier`), so
pruning (`prune_finished`) and its tests see one time line.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from framework.clock import Clock, SystemClock
from framework.saga.barrier import (
    BarrierCall,
    Entry,
    Op,
    ResultCodec,
    StoredRow,
    check_identifier,
    decide,
    guard_rows,
    micros,
    prune_statement,
)

__all__ = ["PostgresBarrier"]

T = TypeVar("T")


class PostgresBarrier:
    """Barrier rows in `schema.table` of the participant's own PostgreSQL database."""

    def __init__(
        self, schema: str = "public", table: str = "saga_barrier", *, clock: Clock | None = None
    ) -> None:
        check_identifier(schema, "schema")
        check_identifier(table, "table")
        self.schema, self.table = schema, table
        self.clock = clock or SystemClock()
        qualified = f'"{schema}"."{table}"'
        self.qualified = qualified
        self._insert = (
            f"INSERT INTO {qualified} (branch, op, saga, written_by, fingerprint, created_us)"
            " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (branch, op) DO NOTHING"
        )
        self._select = (
            f"SELECT written_by, fingerprint, result FROM {qualified} WHERE branch=$1 AND op=$2"
        )
        self._record = f"UPDATE {qualified} SET result = $1 WHERE branch = $2 AND op = $3"
        self._prune = prune_statement(qualified, "$1", "$2")

    async def create_table(self, executor: Any) -> None:
        """Create the schema, table and pruning index if missing; `executor`: pool or connection."""
        await executor.execute(
            f'CREATE SCHEMA IF NOT EXISTS "{self.schema}";'
            f"CREATE TABLE IF NOT EXISTS {self.qualified} ("
            " branch TEXT NOT NULL, op TEXT NOT NULL, saga TEXT NOT NULL,"
            " written_by TEXT NOT NULL, fingerprint BYTEA NOT NULL, result BYTEA,"
            " created_us BIGINT NOT NULL, PRIMARY KEY (branch, op));"
            f'CREATE INDEX IF NOT EXISTS "{self.table}_by_saga"'
            f" ON {self.qualified} (saga, created_us)"
        )

    def rows(self, conn: Any) -> _Rows:
        if not conn.is_in_transaction():
            raise RuntimeError("PostgresBarrier needs an open transaction")
        return _Rows(self, conn)

    async def enter(self, conn: Any, call: BarrierCall) -> Entry:
        """Record the call in the open transaction and decide (see `Decision`).

        Raises FailedPreconditionError for a hanging action and AlreadyExistsError
        for a key reused with another request; roll the transaction back then.
        """
        return await decide(self.rows(conn), call)

    async def record(self, conn: Any, entry: Entry, result: bytes) -> None:
        """Store the answer of a PROCEED / NULL_COMPENSATION call for its replays."""
        await self.rows(conn).record(entry, result)

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
        return await guard_rows(self.rows(conn), call, work, codec, null_result)

    async def prune_finished(self, executor: Any, cutoff_us: int, limit: int = 1000) -> int:
        """Delete the rows of up to `limit` sagas whose newest row is older than `cutoff_us`
        (microseconds since the epoch); rows deleted.  A saga with any row at or after the
        cutoff keeps all its rows (see `framework.saga.barrier` for choosing the horizon)."""
        status: str = await executor.execute(self._prune, cutoff_us, limit)
        return int(status.rsplit(" ", 1)[-1])


class _Rows:
    """`RowAccess` on one asyncpg connection inside its transaction."""

    __slots__ = ("barrier", "conn")

    def __init__(self, barrier: PostgresBarrier, conn: Any) -> None:
        self.barrier, self.conn = barrier, conn

    async def insert(self, call: BarrierCall, op: Op, written_by: Op, fingerprint: bytes) -> bool:
        now_us = micros(self.barrier.clock.now())
        status: str = await self.conn.execute(
            self.barrier._insert,
            call.branch,
            op.value,
            call.saga,
            written_by.value,
            fingerprint,
            now_us,
        )
        return status.endswith(" 1")  # "INSERT 0 1" inserted, "INSERT 0 0" conflict

    async def read(self, branch: str, op: Op) -> StoredRow | None:
        row = await self.conn.fetchrow(self.barrier._select, branch, op.value)
        if row is None:
            return None
        result = row[2]
        return StoredRow(row[0], bytes(row[1]), None if result is None else bytes(result))

    async def record(self, entry: Entry, result: bytes) -> None:
        call = entry.call
        await self.conn.execute(self.barrier._record, result, call.branch, call.op.value)
