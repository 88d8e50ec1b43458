"""The inventory in the service's own database (`ServiceDatabase`: SQLite or PostgreSQL).

Every unit of work is one transaction (SQLite: `BEGIN IMMEDIATE`, so units of
work never interleave; PostgreSQL: READ COMMITTED with row locks), so a
reservation of several lines is saved entirely or not at all.  The participant
barrier's rows (`saga_barrier`, `framework.system.barrier.DatabaseBarrier`) live
in the same database and are written in the same transaction as the stock they
guard.

On PostgreSQL several transactions run at once, so the store locks what a unit
of work reads before deciding: stock rows `FOR UPDATE` in SKU order (two
reservations of the same SKUs wait for each other instead of deadlocking or
overselling), and the reservation row `FOR UPDATE`; a reserve reads the
reservation only after it holds the stock locks, so a concurrent reserve of the
same reservation id sees the winner's row; `ensure_stocks` creates missing rows
before they are locked (two first `AddStock`s of one SKU both count).
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from framework.clock import Clock
from framework.events.typeregistry import EventTypeRegistry
from framework.saga.barrier import BarrierCall, ResultCodec
from framework.system.barrier import DatabaseBarrier
from framework.system.database import ServiceDatabase
from gen.inventory.v1 import events_pb2
from services.inventory.application import Transaction, stock_from, stock_json
from services.inventory.domain import Line, Reservation, ReservationState, Stock

__all__ = ["SCHEMA", "SqlInventoryStore", "SqliteInventoryStore", "inventory_types"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS {stock} (
        sku TEXT PRIMARY KEY,
        on_hand BIGINT NOT NULL CHECK (on_hand >= 0),
        reserved BIGINT NOT NULL CHECK (reserved >= 0 AND reserved <= on_hand),
        updated_at TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS {reservation} (
        reservation_id TEXT PRIMARY KEY,
        order_id TEXT NOT NULL,
        state TEXT NOT NULL,
        lines TEXT NOT NULL,
        stocks_after TEXT NOT NULL,
        reason TEXT NOT NULL,
        updated_at TEXT NOT NULL
    )""",
)


def inventory_types() -> EventTypeRegistry:
    """The event types of the inventory's database (its outbox)."""
    return EventTypeRegistry.from_modules(events_pb2)


class _Tx:
    """The `Transaction` a unit of work sees; valid only inside `transact`."""

    __slots__ = ("_store", "_tx")

    def __init__(self, store: SqlInventoryStore, tx: Any) -> None:
        self._store, self._tx = store, tx

    @property
    def _db(self) -> ServiceDatabase:
        return self._store.db

    async def guard(
        self,
        call: BarrierCall,
        work: Callable[[], Awaitable[T]],
        codec: ResultCodec[T],
        *,
        null_result: Callable[[], T] | None = None,
    ) -> T:
        return await self._store.barrier.guard(self._tx, call, work, codec, null_result=null_result)

    async def ensure_stocks(self, skus: Sequence[str], now: datetime) -> None:
        for sku in sorted(set(skus)):
            await self._db.execute(
                self._tx,
                "INSERT INTO {stock} (sku, on_hand, reserved, updated_at) VALUES (?, 0, 0, ?)"
                " ON CONFLICT (sku) DO NOTHING",
                sku,
                now.isoformat(),
            )

    async def stocks(self, skus: Sequence[str]) -> dict[str, Stock]:
        if not skus:
            return {}
        wanted = sorted(set(skus))
        marks = ", ".join("?" * len(wanted))
        rows = await self._db.fetchall(
            self._tx,
            f"SELECT sku, on_hand, reserved, updated_at FROM {{stock}} WHERE sku IN ({marks})"
            " ORDER BY sku" + self._db.for_update,
            *wanted,
        )
        return {
            sku: Stock(sku, int(on_hand), int(reserved), datetime.fromisoformat(updated))
            for sku, on_hand, reserved, updated in rows
        }

    async def reservation(self, reservation_id: str) -> Reservation | None:
        row = await self._db.fetchone(
            self._tx,
            "SELECT order_id, state, lines, stocks_after, reason, updated_at"
            " FROM {reservation} WHERE reservation_id = ?" + self._db.for_update,
            reservation_id,
        )
        if row is None:
            return None
        order_id, state, lines, stocks_after, reason, updated = row
        return Reservation(
            reservation_id=reservation_id,
            order_id=order_id,
            lines=tuple(Line(sku, int(qty)) for sku, qty in json.loads(lines)),
            state=ReservationState(state),
            updated_at=datetime.fromisoformat(updated),
            stocks_after=tuple(stock_from(s) for s in json.loads(stocks_after)),
            reason=reason,
        )

    async def save_stocks(self, stocks: Iterable[Stock]) -> None:
        for s in stocks:
            await self._db.execute(
                self._tx,
                "INSERT INTO {stock} (sku, on_hand, reserved, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (sku) DO UPDATE SET on_hand = excluded.on_hand,"
                " reserved = excluded.reserved, updated_at = excluded.updated_at",
                s.sku,
                s.on_hand,
                s.reserved,
                s.updated_at.isoformat(),
            )

    async def save_reservation(self, reservation: Reservation) -> None:
        await self._db.execute(
            self._tx,
            "INSERT INTO {reservation}"
            " (reservation_id, order_id, state, lines, stocks_after, reason, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (reservation_id) DO UPDATE SET"
            " order_id = excluded.order_id, state = excluded.state, lines = excluded.lines,"
            " stocks_after = excluded.stocks_after, reason = excluded.reason,"
            " updated_at = excluded.updated_at",
            reservation.reservation_id,
            reservation.order_id,
            reservation.state.value,
            json.dumps([[line.sku, line.quantity] for line in reservation.lines]),
            json.dumps([stock_json(s) for s in reservation.stocks_after]),
            reservation.reason,
            reservation.updated_at.isoformat(),
        )


class SqlInventoryStore:
    """`InventoryStore` on the service's `ServiceDatabase` (either backend)."""

    def __init__(self, db: ServiceDatabase, *, clock: Clock | None = None) -> None:
        self.db = db
        self.barrier = DatabaseBarrier(db, clock=clock)

    async def setup(self) -> None:
        """Create the tables (and the barrier's) if they do not exist."""
        await self.db.script(SCHEMA)
        await self.barrier.setup()

    async def transact(self, work: Callable[[Transaction], Awaitable[T]]) -> T:
        """Run `await work(tx)` in one transaction; everything rolls back if it raises."""
        async with self.db.transaction() as tx:
            return await work(_Tx(self, tx))

    async def ping(self) -> None:
        """Raise if the database cannot answer a query (the health check)."""
        await self.db.ping()

    async def close(self) -> None:
        await self.db.close()


class SqliteInventoryStore(SqlInventoryStore):
    """The store on a SQLite file, opened on first use (standalone service, tests).

    `path` ":memory:" puts the database in a temporary directory removed on close.
    """

    def __init__(self, path: str, *, clock: Clock | None = None) -> None:
        if not path:
            raise ValueError("SqliteInventoryStore path must not be empty (use ':memory:')")
        self.path = path
        self._clock = clock
        self._temporary: tempfile.TemporaryDirectory[str] | None = None
        self._opening = asyncio.Lock()
        self._opened = False
        self._closed = False

    async def open(self) -> None:
        """Create the file and tables now (otherwise done on first use)."""
        async with self._opening:
            if self._opened:
                return
            if self._closed:
                raise RuntimeError(f"inventory store {self.path} is closed")
            path = self.path
            if path == ":memory:":
                self._temporary = tempfile.TemporaryDirectory(prefix="inventory-")
                path = str(Path(self._temporary.name) / "inventory.sqlite3")
            db = await ServiceDatabase.open(f"sqlite:{path}", inventory_types())
            super().__init__(db, clock=self._clock)
            await self.setup()
            self._opened = True

    async def transact(self, work: Callable[[Transaction], Awaitable[T]]) -> T:
        await self.open()
        return await super().transact(work)

    async def ping(self) -> None:
        await self.open()
        await super().ping()

    async def close(self) -> None:
        """Close the database; closing again does nothing."""
        if self._closed:
            return
        self._closed = True
        if self._opened:
            await super().close()
        if self._temporary is not None:
            self._temporary.cleanup()
        logger.debug("inventory store %s closed", self.path)
