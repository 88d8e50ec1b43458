"""The read side (CQRS): a customer's orders as a table, fed by the order events.

`OrderListProjection` runs under the framework's `ProjectionRunner`: each batch of
events and the projection's checkpoint commit in one transaction of the order
service's database, so the list is never ahead of or behind its checkpoint after
a crash.  `SqlOrderReadModel` answers `ListOrders` (newest first, keyset pages)
and finds the orders whose confirmation is still running (for the reconciler).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from framework.errors import InvalidArgumentError
from framework.events.envelope import from_micros, to_micros
from framework.events.store import RecordedEvent
from framework.system.database import ServiceDatabase
from gen.order.v1 import events_pb2 as ev
from services.order.domain import DOMAIN, Line, Status

__all__ = ["SCHEMA", "OrderListProjection", "OrderView", "PageToken", "SqlOrderReadModel"]

NAME = "order-list"
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS {order_list} (
        order_id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        status TEXT NOT NULL,
        currency TEXT NOT NULL,
        lines TEXT NOT NULL,
        total_minor BIGINT NOT NULL,
        cancel_reason TEXT NOT NULL,
        saga_id TEXT NOT NULL,
        version BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS order_list_by_user ON {order_list} (user_id, created_at, order_id)",
    "CREATE INDEX IF NOT EXISTS order_list_by_status ON {order_list} (status)",
)
_COLUMNS = (
    "order_id, user_id, status, currency, lines, total_minor, cancel_reason, saga_id, version,"
    " created_at, updated_at"
)


@dataclass(frozen=True, slots=True)
class OrderView:
    """An order as the read model holds it."""

    order_id: str
    user_id: str
    status: str
    currency: str
    lines: tuple[Line, ...]
    total_minor: int
    cancel_reason: str
    saga_id: str
    version: int
    created_at: datetime
    updated_at: datetime


def _view(row: Sequence[Any]) -> OrderView:
    return OrderView(
        order_id=row[0],
        user_id=row[1],
        status=row[2],
        currency=row[3],
        lines=tuple(Line(*item) for item in json.loads(row[4])),
        total_minor=int(row[5]),
        cancel_reason=row[6],
        saga_id=row[7],
        version=int(row[8]),
        created_at=from_micros(int(row[9])),
        updated_at=from_micros(int(row[10])),
    )


@dataclass(frozen=True, slots=True)
class PageToken:
    created_at_micros: int
    order_id: str

    def encode(self) -> str:
        raw = f"{self.created_at_micros}:{self.order_id}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> PageToken:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
            micros, _, order_id = raw.partition(":")
            return cls(int(micros), order_id)
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise InvalidArgumentError(
                "page_token is not one this service returned; start again without it",
                reason="BAD_PAGE_TOKEN",
                domain=DOMAIN,
            ) from None


class OrderListProjection:
    """Applies order events to the `order_list` table (inside the runner's transaction)."""

    name = NAME

    def __init__(self, db: ServiceDatabase) -> None:
        self.db = db

    async def reset(self, tx: Any) -> None:
        await self.db.execute(tx, "DELETE FROM {order_list}")

    async def apply(self, tx: Any, event: RecordedEvent) -> None:
        db = self.db
        micros = to_micros(event.recorded_at)
        if event.type == ev.OrderCreated.DESCRIPTOR.full_name:
            created = ev.OrderCreated.FromString(event.payload)
            await db.execute(
                tx,
                f"INSERT INTO {{order_list}} ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (order_id) DO NOTHING",
                created.order_id,
                created.user_id,
                Status.DRAFT,
                created.currency,
                "[]",
                0,
                "",
                "",
                event.version,
                created.created_at.ToMicroseconds(),
                micros,
            )
            return
        row = await db.fetchone(
            tx, "SELECT lines, total_minor FROM {order_list} WHERE order_id = ?", event.stream_id
        )
        if row is None:
            return  # an order created before this read model existed and not replayed: skip
        if event.type == ev.OrderItemAdded.DESCRIPTOR.full_name:
            added = ev.OrderItemAdded.FromString(event.payload)
            lines = json.loads(row[0])
            lines.append([added.line_id, added.sku, added.quantity, added.unit_price_minor])
            await db.execute(
                tx,
                "UPDATE {order_list} SET lines = ?, total_minor = ?, version = ?, updated_at = ?"
                " WHERE order_id = ?",
                json.dumps(lines),
                int(row[1]) + added.quantity * added.unit_price_minor,
                event.version,
                micros,
                event.stream_id,
            )
        elif event.type == ev.OrderConfirmationStarted.DESCRIPTOR.full_name:
            started = ev.OrderConfirmationStarted.FromString(event.payload)
            await self._status(tx, event, Status.CONFIRMING, saga_id=started.saga_id)
        elif event.type == ev.OrderConfirmed.DESCRIPTOR.full_name:
            await self._status(tx, event, Status.CONFIRMED)
        elif event.type == ev.OrderCancelled.DESCRIPTOR.full_name:
            cancelled = ev.OrderCancelled.FromString(event.payload)
            await self._status(tx, event, Status.CANCELLED, reason=cancelled.reason)

    async def _status(
        self, tx: Any, event: RecordedEvent, status: str, *, saga_id: str = "", reason: str = ""
    ) -> None:
        when = to_micros(event.recorded_at)
        if saga_id:
            await self.db.execute(
                tx,
                "UPDATE {order_list} SET status = ?, saga_id = ?, version = ?, updated_at = ?"
                " WHERE order_id = ?",
                status,
                saga_id,
                event.version,
                when,
                event.stream_id,
            )
            return
        await self.db.execute(
            tx,
            "UPDATE {order_list} SET status = ?, cancel_reason = ?, version = ?, updated_at = ?"
            " WHERE order_id = ?",
            status,
            reason,
            event.version,
            when,
            event.stream_id,
        )


class SqlOrderReadModel:
    """Queries on the `order_list` table."""

    def __init__(self, db: ServiceDatabase) -> None:
        self.db = db

    async def setup(self) -> None:
        await self.db.script(SCHEMA)

    async def page(
        self, user_id: str, size: int, after: PageToken | None
    ) -> tuple[list[OrderView], PageToken | None]:
        query = f"SELECT {_COLUMNS} FROM {{order_list}} WHERE user_id = ?"
        params: list[object] = [user_id]
        if after is not None:
            query += " AND (created_at < ? OR (created_at = ? AND order_id < ?))"
            params += [after.created_at_micros, after.created_at_micros, after.order_id]
        query += " ORDER BY created_at DESC, order_id DESC LIMIT ?"
        params.append(size + 1)
        async with self.db.transaction() as tx:
            rows = await self.db.fetchall(tx, query, *params)
        found = [_view(r) for r in rows[:size]]
        last = found[-1] if found and len(rows) > size else None
        token = PageToken(to_micros(last.created_at), last.order_id) if last else None
        return found, token

    async def confirming(self, limit: int = 100) -> list[OrderView]:
        """Orders whose confirmation saga has not been seen to end."""
        async with self.db.transaction() as tx:
            rows = await self.db.fetchall(
                tx,
                f"SELECT {_COLUMNS} FROM {{order_list}} WHERE status = ?"
                " ORDER BY updated_at LIMIT ?",
                Status.CONFIRMING,
                limit,
            )
        return [_view(r) for r in rows]
