"""SQLite store of the inventory (stdlib sqlite3): one connection on one dedicated thread.

Every unit of work runs in `BEGIN IMMEDIATE ... COMMIT` on the store's thread,
so a reservation of several lines is saved entirely or not at all, and units
of work never interleave.  The participant barrier's rows (`saga_barrier`,
`framework.saga.barrier_sqlite`) live in the same database and are written in
the same transaction as the stock they guard.  `path` ":memory:" keeps
everything in memory (tests).
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import TypeVar

from framework.events.dedicated_thread import DedicatedThread
from framework.saga.barrier import BarrierCall, ResultCodec
from framework.saga.barrier_sqlite import SqliteBarrier
from services.inventory.application import Transaction, stock_from, stock_json
from services.inventory.domain import Line, Reservation, ReservationState, Stock

__all__ = ["SqliteInventoryStore"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS stock (
    sku TEXT PRIMARY KEY,
    on_hand INTEGER NOT NULL CHECK (on_hand >= 0),
    reserved INTEGER NOT NULL CHECK (reserved >= 0 AND reserved <= on_hand),
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS reservation (
    reservation_id TEXT PRIMARY KEY,
    order_id TEXT NOT NULL,
    state TEXT NOT NULL,
    lines TEXT NOT NULL,
    stocks_after TEXT NOT NULL,
    reason TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
"""

BARRIER = SqliteBarrier("saga_barrier")


class _Tx:
    """The `Transaction` a unit of work sees; valid only inside `transact`."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def guard(
        self,
        call: BarrierCall,
        work: Callable[[], T],
        codec: ResultCodec[T],
        *,
        null_result: Callable[[], T] | None = None,
    ) -> T:
        return BARRIER.guard(self._db, call, work, codec, null_result=null_result)

    def stocks(self, skus: Sequence[str]) -> dict[str, Stock]:
        if not skus:
            return {}
        marks = ",".join("?" * len(skus))
        rows = self._db.execute(
            f"SELECT sku, on_hand, reserved, updated_at FROM stock WHERE sku IN ({marks})",
            tuple(skus),
        ).fetchall()
        return {
            sku: Stock(sku, on_hand, reserved, datetime.fromisoformat(updated))
            for sku, on_hand, reserved, updated in rows
        }

    def reservation(self, reservation_id: str) -> Reservation | None:
        row = self._db.execute(
            "SELECT order_id, state, lines, stocks_after, reason, updated_at"
            " FROM reservation WHERE reservation_id = ?",
            (reservation_id,),
        ).fetchone()
        if row is None:
            return None
        order_id, state, lines, stocks_after, reason, updated = row
        return Reservation(
            reservation_id=reservation_id,
            order_id=order_id,
            lines=tuple(Line(sku, qty) for sku, qty in json.loads(lines)),
            state=ReservationState(state),
            updated_at=datetime.fromisoformat(updated),
            stocks_after=tuple(stock_from(s) for s in json.loads(stocks_after)),
            reason=reason,
        )

    def save_stocks(self, stocks: Iterable[Stock]) -> None:
        self._db.executemany(
            "INSERT INTO stock (sku, on_hand, reserved, updated_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (sku) DO UPDATE SET on_hand = excluded.on_hand,"
            " reserved = excluded.reserved, updated_at = excluded.updated_at",
            [(s.sku, s.on_hand, s.reserved, s.updated_at.isoformat()) for s in stocks],
        )

    def save_reservation(self, reservation: Reservation) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO reservation"
            " (reservation_id, order_id, state, lines, stocks_after, reason, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                reservation.reservation_id,
                reservation.order_id,
                reservation.state.value,
                json.dumps([[line.sku, line.quantity] for line in reservation.lines]),
                json.dumps([stock_json(s) for s in reservation.stocks_after]),
                reservation.reason,
                reservation.updated_at.isoformat(),
            ),
        )


class SqliteInventoryStore:
    """`InventoryStore` on a SQLite file (WAL) or ":memory:"."""

    def __init__(self, path: str) -> None:
        if not path:
            raise ValueError("SqliteInventoryStore path must not be empty (use ':memory:')")
        self.path = path
        self._thread = DedicatedThread(f"inventory-sqlite:{path}")
        self._db: sqlite3.Connection | None = None
        self._closed = False

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            if self.path != ":memory:":
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            BARRIER.create_table(db)
            self._db = db
        return self._db

    async def open(self) -> None:
        """Create the file and tables now (otherwise done on first use)."""
        await self._thread.run(self._connection)

    async def transact(self, work: Callable[[Transaction], T]) -> T:
        """Run `work(tx)` in one transaction on the store's thread; roll back if it raises."""

        def run() -> T:
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
            try:
                result = work(_Tx(db))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result

        return await self._thread.run(run)

    async def ping(self) -> None:
        """Raise if the database cannot answer a query (the health check)."""
        await self._thread.run(lambda: self._connection().execute("SELECT 1").fetchone())

    async def close(self) -> None:
        """Close the connection and end the thread; closing again does nothing."""
        if self._closed:
            return
        self._closed = True

        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._thread.run(shut)
        await self._thread.stop()
        logger.debug("inventory store %s closed", self.path)
