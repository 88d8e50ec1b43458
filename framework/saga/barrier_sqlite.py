"""The participant barrier on SQLite (stdlib sqlite3), inside the participant's transaction.

Synchronous on purpose: a SQLite participant runs its unit of work on one
thread (as `services/inventory` does), and the barrier's statements must run
in that same transaction, on that same connection, between its `BEGIN` and
`COMMIT`:

    barrier = SqliteBarrier()
    barrier.create_table(conn)                     # once, at start-up

    def work(conn) -> ReserveStockResponse:        # inside BEGIN IMMEDIATE ... COMMIT
        return barrier.guard(
            conn, call,                            # call = BarrierCall.current(request)
            lambda: do_the_reservation(conn),      # runs only on the first call
            ProtoCodec(ReserveStockResponse),
            null_result=lambda: ...,               # compensations only: the no-op answer
        )

Semantics are in `framework.saga.barrier`.  The SQLite writer lock (take it
with `BEGIN IMMEDIATE`) serializes an action and its compensation.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TypeVar

from framework.clock import Clock, SystemClock
from framework.saga.barrier import (
    BarrierCall,
    Decision,
    Entry,
    Op,
    ResultCodec,
    StoredRow,
    check_identifier,
    micros,
    prune_statement,
    replayed,
)

__all__ = ["SqliteBarrier"]

T = TypeVar("T")


class SqliteBarrier:
    """Barrier rows in table `table` of the participant's own SQLite database."""

    def __init__(self, table: str = "saga_barrier", *, clock: Clock | None = None) -> None:
        check_identifier(table, "table")
        self.table = table
        self.clock = clock or SystemClock()
        self._insert = (
            f"INSERT INTO {table} (branch, op, saga, written_by, fingerprint, created_us)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (branch, op) DO NOTHING"
        )
        self._prune = prune_statement(table, "?", "?")
        self._select = (
            f"SELECT written_by, fingerprint, result FROM {table} WHERE branch = ? AND op = ?"
        )
        self._record = f"UPDATE {table} SET result = ? WHERE branch = ? AND op = ?"

    def create_table(self, conn: sqlite3.Connection) -> None:
        """Create the barrier table (and its pruning index) if they do not exist."""
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {self.table} ("
            " branch TEXT NOT NULL, op TEXT NOT NULL, saga TEXT NOT NULL,"
            " written_by TEXT NOT NULL, fingerprint BLOB NOT NULL, result BLOB,"
            " created_us INTEGER NOT NULL, PRIMARY KEY (branch, op))"
        )
        conn.execute(
            f"CREATE INDEX IF NOT EXISTS {self.table}_by_saga ON {self.table} (saga, created_us)"
        )

    def _insert_row(
        self, conn: sqlite3.Connection, call: BarrierCall, op: Op, by: Op, fp: bytes
    ) -> bool:
        now_us = micros(self.clock.now())
        row = (call.branch, op.value, call.saga, by.value, fp, now_us)
        return conn.execute(self._insert, row).rowcount == 1

    def _row(self, conn: sqlite3.Connection, branch: str, op: Op) -> StoredRow | None:
        row = conn.execute(self._select, (branch, op.value)).fetchone()
        return None if row is None else StoredRow(row[0], bytes(row[1]), row[2])

    def enter(self, conn: sqlite3.Connection, call: BarrierCall) -> Entry:
        """Record the call in the open transaction and decide (see `Decision`).

        Raises FailedPreconditionError for a hanging action and AlreadyExistsError
        for a key reused with another request; the caller's transaction should
        then roll back (nothing was done).
        """
        if not conn.in_transaction:
            raise RuntimeError("SqliteBarrier.enter needs an open transaction (BEGIN IMMEDIATE)")
        if call.op is Op.COMPENSATION:
            # Claim the action's row first: success means the action never ran.
            branch = call.branch
            null = self._insert_row(conn, call, Op.ACTION, Op.COMPENSATION, b"")
            comp = Op.COMPENSATION
            fresh = self._insert_row(conn, call, comp, comp, call.fingerprint)
            if not fresh:
                return replayed(call, Op.COMPENSATION, self._row(conn, branch, Op.COMPENSATION))
            return Entry(call, Decision.NULL_COMPENSATION if null else Decision.PROCEED)
        if self._insert_row(conn, call, call.op, call.op, call.fingerprint):
            return Entry(call, Decision.PROCEED)
        return replayed(call, call.op, self._row(conn, call.branch, call.op))

    def record(self, conn: sqlite3.Connection, entry: Entry, result: bytes) -> None:
        """Store the answer of a PROCEED / NULL_COMPENSATION call for its replays."""
        conn.execute(self._record, (result, entry.call.branch, entry.call.op.value))

    def guard(
        self,
        conn: sqlite3.Connection,
        call: BarrierCall,
        work: Callable[[], T],
        codec: ResultCodec[T],
        *,
        null_result: Callable[[], T] | None = None,
    ) -> T:
        """Run `work()` once per key inside the open transaction; replays answer the first result.

        `null_result()` answers a compensation whose action never ran (required
        for compensations; `work` is not called then).
        """
        entry = self.enter(conn, call)
        if entry.decision is Decision.REPLAY:
            return codec.decode(entry.result)
        if entry.decision is Decision.NULL_COMPENSATION:
            if null_result is None:
                raise TypeError("guard() of a compensation needs null_result=")
            value = null_result()
        else:
            value = work()
        self.record(conn, entry, codec.encode(value))
        return value

    def prune_finished(self, conn: sqlite3.Connection, cutoff_us: int, limit: int = 1000) -> int:
        """Delete the rows of up to `limit` sagas whose newest row is older than `cutoff_us`
        (microseconds since the epoch); rows deleted.  A saga with any row at or after the
        cutoff keeps all its rows (see `framework.saga.barrier` for choosing the horizon)."""
        return conn.execute(self._prune, (cutoff_us, limit)).rowcount
