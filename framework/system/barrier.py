"""The participant barrier on a service's own database (`ServiceDatabase`), either backend.

The rules are `framework.saga.barrier`'s (one implementation: `decide` and
`guard_rows`); this module only says how a barrier row is inserted, read,
recorded and pruned in the `ServiceDatabase` dialect, so one service runs the
same barrier on SQLite and on PostgreSQL, inside the transaction of its
business change:

    barrier = DatabaseBarrier(db)
    await barrier.setup()                                   # once, at start-up

    async with db.transaction() as tx:
        reply = await barrier.guard(
            tx, BarrierCall.of(key, digest),
            lambda: charge(tx, request),                    # async; runs on the first call only
            codec, null_result=lambda: ...,                 # compensations only
        )

Pruning (`prune_finished`, or a `framework.saga.retention.BarrierPruner`
calling it) deletes the rows of sagas whose newest row is older than the
cutoff; see `framework.saga.barrier` for the horizon's rule.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from framework.clock import Clock, SystemClock
from framework.saga.barrier import (
    BarrierCall,
    Entry,
    Op,
    ResultCodec,
    StoredRow,
    check_identifier,
    guard_rows,
    micros,
    prune_statement,
)
from framework.saga.retention import BarrierPruner, BarrierRetention
from framework.system.database import ServiceDatabase

__all__ = ["HORIZON_ENV", "INTERVAL_ENV", "DatabaseBarrier", "retention_from_env"]

HORIZON_ENV = "SERVICE_BARRIER_HORIZON_S"
INTERVAL_ENV = "SERVICE_BARRIER_PRUNE_INTERVAL_S"


def retention_from_env(env: Mapping[str, str]) -> BarrierRetention:
    """`SERVICE_BARRIER_HORIZON_S` (default 7 days) and `SERVICE_BARRIER_PRUNE_INTERVAL_S`
    (default 1 hour); ValueError naming the variable when one is not a positive number."""
    default = BarrierRetention()
    values: dict[str, float] = {}
    for name, field, fallback in (
        (HORIZON_ENV, "horizon_s", default.horizon_s),
        (INTERVAL_ENV, "interval_s", default.interval_s),
    ):
        text = env.get(name, "").strip()
        try:
            values[field] = float(text) if text else fallback
        except ValueError:
            raise ValueError(f"{name} must be a number of seconds, got {text!r}") from None
    try:
        return BarrierRetention(horizon_s=values["horizon_s"], interval_s=values["interval_s"])
    except ValueError as error:
        raise ValueError(f"{HORIZON_ENV}/{INTERVAL_ENV}: {error}") from None


T = TypeVar("T")


class DatabaseBarrier:
    """Barrier rows in table `table` of `db` (schema-qualified on PostgreSQL)."""

    def __init__(
        self, db: ServiceDatabase, table: str = "saga_barrier", *, clock: Clock | None = None
    ) -> None:
        check_identifier(table, "table")
        self.db = db
        self.table = table
        self.clock = clock or SystemClock()
        name = "{" + table + "}"
        self._schema = (
            f"CREATE TABLE IF NOT EXISTS {name} ("
            " branch TEXT NOT NULL, op TEXT NOT NULL, saga TEXT NOT NULL,"
            " written_by TEXT NOT NULL, fingerprint {blob} NOT NULL, result {blob},"
            " created_us BIGINT NOT NULL, PRIMARY KEY (branch, op))",
            f"CREATE INDEX IF NOT EXISTS {table}_by_saga ON {name} (saga, created_us)",
        )
        self._insert = (
            f"INSERT INTO {name} (branch, op, saga, written_by, fingerprint, created_us)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (branch, op) DO NOTHING"
        )
        self._select = (
            f"SELECT written_by, fingerprint, result FROM {name} WHERE branch = ? AND op = ?"
        )
        self._record = f"UPDATE {name} SET result = ? WHERE branch = ? AND op = ?"
        self._prune = prune_statement(name, "?", "?")
        self._count = f"SELECT COUNT(*) FROM {name}"

    async def setup(self) -> None:
        """Create the table and its pruning index if they do not exist."""
        await self.db.script(self._schema)

    async def guard(
        self,
        tx: Any,
        call: BarrierCall,
        work: Callable[[], Awaitable[T]],
        codec: ResultCodec[T],
        *,
        null_result: Callable[[], T] | None = None,
    ) -> T:
        """Run `await work()` once per key inside `tx` (a `db.transaction()`); a replay answers
        the first result, a null compensation `null_result()`; a hanging action and a reused
        key raise (roll `tx` back then)."""
        return await guard_rows(_Rows(self, tx), call, work, codec, null_result)

    async def prune_finished(self, cutoff_us: int, limit: int = 1000) -> int:
        """Delete the rows of up to `limit` sagas whose newest row is older than `cutoff_us`
        (microseconds since the epoch), in one transaction; rows deleted."""
        async with self.db.transaction() as tx:
            return await self.db.execute(tx, self._prune, cutoff_us, limit)

    def pruner(self, retention: BarrierRetention) -> BarrierPruner:
        """A pruner of this barrier on its clock (pass it as a server hook, or call it)."""
        return BarrierPruner(self.prune_finished, retention, clock=self.clock)

    async def count(self) -> int:
        """Rows in the table (for tests and operators)."""
        async with self.db.transaction() as tx:
            row = await self.db.fetchone(tx, self._count)
        return int(row[0]) if row else 0


class _Rows:
    """`RowAccess` inside one `ServiceDatabase` transaction."""

    __slots__ = ("barrier", "tx")

    def __init__(self, barrier: DatabaseBarrier, tx: Any) -> None:
        self.barrier, self.tx = barrier, tx

    async def insert(self, call: BarrierCall, op: Op, written_by: Op, fingerprint: bytes) -> bool:
        barrier = self.barrier
        now_us = micros(barrier.clock.now())
        inserted = await barrier.db.execute(
            self.tx,
            barrier._insert,
            call.branch,
            op.value,
            call.saga,
            written_by.value,
            fingerprint,
            now_us,
        )
        return inserted == 1

    async def read(self, branch: str, op: Op) -> StoredRow | None:
        row = await self.barrier.db.fetchone(self.tx, self.barrier._select, branch, op.value)
        if row is None:
            return None
        result = row[2]
        return StoredRow(row[0], bytes(row[1]), None if result is None else bytes(result))

    async def record(self, entry: Entry, result: bytes) -> None:
        call = entry.call
        await self.barrier.db.execute(
            self.tx, self.barrier._record, result, call.branch, call.op.value
        )
