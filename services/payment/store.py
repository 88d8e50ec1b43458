"""Payments in the service's own database; several replicas may share it.

Each change is one transaction that reads the payment row (locked on PostgreSQL)
and writes it; a first write of a payment id inserts with ON CONFLICT DO NOTHING,
and a replica that loses that race runs the unit of work again on the winner's row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from framework.events.envelope import from_micros, to_micros
from framework.system.database import ServiceDatabase
from services.payment.domain import Payment, PaymentStatus

__all__ = ["SCHEMA", "SqlPaymentStore"]

T = TypeVar("T")

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS {payments} (
        payment_id TEXT PRIMARY KEY,
        order_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        amount_minor BIGINT NOT NULL,
        currency TEXT NOT NULL,
        status TEXT NOT NULL,
        reason TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL
    )""",
)
_COLUMNS = (
    "payment_id, order_id, user_id, amount_minor, currency, status, reason, created_at, updated_at"
)


def _payment(row: Sequence[Any]) -> Payment:
    return Payment(
        payment_id=row[0],
        order_id=row[1],
        user_id=row[2],
        amount_minor=int(row[3]),
        currency=row[4],
        status=PaymentStatus(row[5]),
        reason=row[6],
        created_at=from_micros(int(row[7])),
        updated_at=from_micros(int(row[8])),
    )


class _LostRaceError(Exception):
    """Another replica inserted this payment id first."""


class SqlPaymentStore:
    def __init__(self, db: ServiceDatabase) -> None:
        self.db = db

    async def setup(self) -> None:
        await self.db.script(SCHEMA)

    async def get(self, payment_id: str) -> Payment | None:
        async with self.db.transaction() as tx:
            row = await self.db.fetchone(
                tx, f"SELECT {_COLUMNS} FROM {{payments}} WHERE payment_id = ?", payment_id
            )
        return _payment(row) if row else None

    async def change(
        self, payment_id: str, work: Callable[[Payment | None], tuple[Payment, bool, T]]
    ) -> T:
        """Run `work(current)` -> (payment, changed, result) and save the payment if changed."""
        for _ in range(3):
            try:
                return await self._change_once(payment_id, work)
            except _LostRaceError:
                continue
        raise RuntimeError(f"payment {payment_id}: lost the insert race three times")

    async def _change_once(
        self, payment_id: str, work: Callable[[Payment | None], tuple[Payment, bool, T]]
    ) -> T:
        db = self.db
        async with db.transaction() as tx:
            row = await db.fetchone(
                tx,
                f"SELECT {_COLUMNS} FROM {{payments}} WHERE payment_id = ?" + db.for_update,
                payment_id,
            )
            current = _payment(row) if row else None
            payment, changed, result = work(current)
            if not changed:
                return result
            values = (
                payment.order_id,
                payment.user_id,
                payment.amount_minor,
                payment.currency,
                payment.status.value,
                payment.reason,
                to_micros(payment.created_at),
                to_micros(payment.updated_at),
            )
            if current is None:
                inserted = await db.execute(
                    tx,
                    f"INSERT INTO {{payments}} ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (payment_id) DO NOTHING",
                    payment.payment_id,
                    *values,
                )
                if inserted == 0:
                    raise _LostRaceError()
            else:
                await db.execute(
                    tx,
                    "UPDATE {payments} SET order_id = ?, user_id = ?, amount_minor = ?,"
                    " currency = ?, status = ?, reason = ?, created_at = ?, updated_at = ?"
                    " WHERE payment_id = ?",
                    *values,
                    payment.payment_id,
                )
            return result

    async def totals(self) -> dict[str, int]:
        """Sum of amounts per status (for invariants: charged == sum of confirmed orders)."""
        async with self.db.transaction() as tx:
            rows = await self.db.fetchall(
                tx, "SELECT status, COALESCE(SUM(amount_minor), 0) FROM {payments} GROUP BY status"
            )
        return {str(r[0]): int(r[1]) for r in rows}
