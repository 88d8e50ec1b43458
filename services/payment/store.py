"""Payments in the service's own database; several replicas may share it.

Each change is one transaction (`guarded`) that records the call in the
participant barrier (`framework.system.barrier.DatabaseBarrier`, table
`saga_barrier`), reads the payment row (locked on PostgreSQL) and writes it, with
the money it moved as ledger entries (`payment_ledger`: +amount for a charge
taken, -amount for a refund), so the ledger of a payment always adds up to what
its status says.  A first write of a payment id inserts with ON CONFLICT DO
NOTHING, and a replica that loses that race (two calls with different keys for
one payment id) runs the whole unit of work again, barrier included, on the
winner's row.

`refund_entries=2` is a deliberate bug for chaos runs (`PAYMENT_BUG_REFUND_TWICE=1`):
each refund is entered twice, which the `payment-balances` invariant must catch.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from framework.clock import Clock
from framework.events.envelope import from_micros, to_micros
from framework.saga.barrier import BarrierCall, ResultCodec
from framework.system.barrier import DatabaseBarrier
from framework.system.database import ServiceDatabase
from services.payment.domain import Payment, PaymentStatus, ledger_entries

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
    """CREATE TABLE IF NOT EXISTS {payment_ledger} (
        entry_id TEXT PRIMARY KEY,
        payment_id TEXT NOT NULL,
        order_id TEXT NOT NULL,
        amount_minor BIGINT NOT NULL,
        recorded_at BIGINT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS payment_ledger_by_payment ON {payment_ledger} (payment_id)",
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
    def __init__(
        self, db: ServiceDatabase, *, refund_entries: int = 1, clock: Clock | None = None
    ) -> None:
        if refund_entries not in (1, 2):
            raise ValueError(
                f"refund_entries must be 1 (or 2: the chaos bug), got {refund_entries}"
            )
        self.db = db
        self.refund_entries = refund_entries
        self.barrier = DatabaseBarrier(db, clock=clock)

    async def setup(self) -> None:
        await self.db.script(SCHEMA)
        await self.barrier.setup()

    async def get(self, payment_id: str) -> Payment | None:
        async with self.db.transaction() as tx:
            return await self.load(tx, payment_id, lock=False)

    async def guarded(
        self,
        call: BarrierCall,
        work: Callable[[Any], Awaitable[T]],
        codec: ResultCodec[T],
        *,
        null_result: Callable[[], T] | None = None,
    ) -> T:
        """`work(tx)` once per idempotency key, in one transaction with its barrier row.

        A unit of work that lost a first-insert race to another replica runs again.
        """
        for _ in range(3):
            try:
                async with self.db.transaction() as tx:
                    return await self.barrier.guard(
                        tx, call, lambda: work(tx), codec, null_result=null_result
                    )
            except _LostRaceError:
                continue
        raise RuntimeError(f"{call.key}: lost the payment insert race three times")

    async def load(self, tx: Any, payment_id: str, *, lock: bool = True) -> Payment | None:
        """The payment (row-locked on PostgreSQL when `lock`), or None."""
        row = await self.db.fetchone(
            tx,
            f"SELECT {_COLUMNS} FROM {{payments}} WHERE payment_id = ?"
            + (self.db.for_update if lock else ""),
            payment_id,
        )
        return _payment(row) if row else None

    async def save(self, tx: Any, current: Payment | None, payment: Payment) -> None:
        """Write `payment` (read as `current` in `tx`) and the money it moved to the ledger."""
        db = self.db
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
        for amount in ledger_entries(current, payment):
            for _ in range(self.refund_entries if amount < 0 else 1):
                await db.execute(
                    tx,
                    "INSERT INTO {payment_ledger}"
                    " (entry_id, payment_id, order_id, amount_minor, recorded_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    str(uuid.uuid4()),
                    payment.payment_id,
                    payment.order_id,
                    amount,
                    to_micros(payment.updated_at),
                )

    async def totals(self) -> dict[str, int]:
        """Sum of amounts per status (for invariants: charged == sum of confirmed orders)."""
        async with self.db.transaction() as tx:
            rows = await self.db.fetchall(
                tx, "SELECT status, COALESCE(SUM(amount_minor), 0) FROM {payments} GROUP BY status"
            )
        return {str(r[0]): int(r[1]) for r in rows}

    async def ledger_balance(self, payment_id: str) -> int:
        """What the ledger says a payment holds now (its entries summed)."""
        async with self.db.transaction() as tx:
            row = await self.db.fetchone(
                tx,
                "SELECT COALESCE(SUM(amount_minor), 0) FROM {payment_ledger} WHERE payment_id = ?",
                payment_id,
            )
        return int(row[0]) if row else 0
