"""Small saga participants for tests and benchmarks, on the framework's barrier.

* `PaymentServicer` (`payment.v1.PaymentService`): accounts with balances;
  ChargePayment debits, RefundPayment credits back; a `decline` predicate
  refuses chosen charges (FAILED_PRECONDITION, reason PAYMENT_DECLINED).  Its
  ledger is SQLite (`SqliteLedger`) or PostgreSQL (`PostgresLedger`), the
  barrier row written in the same transaction as the money.
* `NotificationServicer` (`notification.v1.NotificationService`): records each
  sent notification once per idempotency key; `fail` refuses chosen ones.
* The stock participant is the real inventory service (`services/inventory`).

`order_saga()` is the 3-step definition the tests and `saga_3step` bench run:
reserve stock, charge payment, send the confirmation (the pivot).
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from framework.clock import Clock
from framework.errors import FailedPreconditionError, NotFoundError
from framework.events.dedicated_thread import DedicatedThread
from framework.saga import BarrierCall, ProtoCodec, SagaDefinition, Step, StepContext
from framework.saga.barrier_postgres import PostgresBarrier
from framework.saga.barrier_sqlite import SqliteBarrier
from gen.inventory.v1 import inventory_pb2 as inv
from gen.notification.v1 import notification_pb2 as notif
from gen.notification.v1 import notification_pb2_grpc as notif_grpc
from gen.order.v1 import order_pb2
from gen.payment.v1 import payment_pb2 as pay
from gen.payment.v1 import payment_pb2_grpc as pay_grpc

CHARGE_CODEC = ProtoCodec(pay.ChargePaymentResponse)
REFUND_CODEC = ProtoCodec(pay.RefundPaymentResponse)
NOTIFY_CODEC = ProtoCodec(notif.SendNotificationResponse)

Decline = Callable[[pay.ChargePaymentRequest], bool]


def _declined(request: pay.ChargePaymentRequest, why: str) -> FailedPreconditionError:
    return FailedPreconditionError(
        f"payment {request.payment_id} declined: {why}", reason="PAYMENT_DECLINED"
    )


def _no_refund(request: pay.RefundPaymentRequest) -> pay.RefundPaymentResponse:
    return pay.RefundPaymentResponse(payment=pay.Payment(payment_id=request.payment_id))


class Ledger(Protocol):
    async def charge(
        self, call: BarrierCall, request: pay.ChargePaymentRequest
    ) -> pay.ChargePaymentResponse: ...

    async def refund(
        self, call: BarrierCall, request: pay.RefundPaymentRequest
    ) -> pay.RefundPaymentResponse: ...

    async def open_account(self, user_id: str, balance: int) -> None: ...

    async def balances(self) -> dict[str, int]: ...

    async def payments(self) -> dict[str, tuple[str, int, int]]:
        """payment_id -> (order_id, amount, status)."""
        ...

    async def prune_finished(self, cutoff_us: int) -> int:
        """The barrier's pruning (rows of sagas whose newest row is older than the cutoff)."""
        ...

    async def barrier_rows(self) -> int: ...

    async def close(self) -> None: ...


class SqliteLedger:
    """Accounts and payments in a SQLite file, one dedicated thread, barrier in the same tx."""

    def __init__(
        self, path: str, decline: Decline | None = None, *, clock: Clock | None = None
    ) -> None:
        self.path = path
        self.decline = decline or (lambda _: False)
        self.barrier = SqliteBarrier(clock=clock)
        self._thread = DedicatedThread(f"ledger:{path}")
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS account (user_id TEXT PRIMARY KEY,"
                " balance INTEGER NOT NULL CHECK (balance >= 0))"
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS payment (payment_id TEXT PRIMARY KEY,"
                " order_id TEXT NOT NULL, user_id TEXT NOT NULL, amount INTEGER NOT NULL,"
                " status INTEGER NOT NULL)"
            )
            self.barrier.create_table(db)
            self._db = db
        return self._db

    async def _transact(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        def run() -> Any:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                result = work(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result

        return await self._thread.run(run)

    async def charge(
        self, call: BarrierCall, request: pay.ChargePaymentRequest
    ) -> pay.ChargePaymentResponse:
        def apply(db: sqlite3.Connection) -> pay.ChargePaymentResponse:
            found = db.execute(
                "SELECT status FROM payment WHERE payment_id = ?", (request.payment_id,)
            ).fetchone()
            if found is None:
                if self.decline(request):
                    raise _declined(request, "the card issuer said no")
                moved = db.execute(
                    "UPDATE account SET balance = balance - ? WHERE user_id = ? AND balance >= ?",
                    (request.amount_minor, request.user_id, request.amount_minor),
                ).rowcount
                if moved != 1:
                    raise _declined(request, "insufficient funds or no account")
                db.execute(
                    "INSERT INTO payment VALUES (?, ?, ?, ?, ?)",
                    (
                        request.payment_id,
                        request.order_id,
                        request.user_id,
                        request.amount_minor,
                        pay.PAYMENT_STATUS_CHARGED,
                    ),
                )
            return pay.ChargePaymentResponse(
                payment=pay.Payment(
                    payment_id=request.payment_id,
                    order_id=request.order_id,
                    user_id=request.user_id,
                    amount_minor=request.amount_minor,
                    currency=request.currency,
                    status=pay.PAYMENT_STATUS_CHARGED,
                )
            )

        result: pay.ChargePaymentResponse = await self._transact(
            lambda db: self.barrier.guard(db, call, lambda: apply(db), CHARGE_CODEC)
        )
        return result

    async def refund(
        self, call: BarrierCall, request: pay.RefundPaymentRequest
    ) -> pay.RefundPaymentResponse:
        def apply(db: sqlite3.Connection) -> pay.RefundPaymentResponse:
            row = db.execute(
                "SELECT user_id, amount, status FROM payment WHERE payment_id = ?",
                (request.payment_id,),
            ).fetchone()
            if row is None or row[2] != pay.PAYMENT_STATUS_CHARGED:
                return _no_refund(request)
            db.execute(
                "UPDATE account SET balance = balance + ? WHERE user_id = ?", (row[1], row[0])
            )
            db.execute(
                "UPDATE payment SET status = ? WHERE payment_id = ?",
                (pay.PAYMENT_STATUS_REFUNDED, request.payment_id),
            )
            payment = pay.Payment(payment_id=request.payment_id, status=pay.PAYMENT_STATUS_REFUNDED)
            return pay.RefundPaymentResponse(payment=payment, refunded=True)

        result: pay.RefundPaymentResponse = await self._transact(
            lambda db: self.barrier.guard(
                db, call, lambda: apply(db), REFUND_CODEC, null_result=lambda: _no_refund(request)
            )
        )
        return result

    async def open_account(self, user_id: str, balance: int) -> None:
        await self._transact(
            lambda db: db.execute("INSERT INTO account VALUES (?, ?)", (user_id, balance))
        )

    async def balances(self) -> dict[str, int]:
        rows = await self._transact(
            lambda db: db.execute("SELECT user_id, balance FROM account").fetchall()
        )
        return {r[0]: int(r[1]) for r in rows}

    async def payments(self) -> dict[str, tuple[str, int, int]]:
        rows = await self._transact(
            lambda db: db.execute(
                "SELECT payment_id, order_id, amount, status FROM payment"
            ).fetchall()
        )
        return {r[0]: (r[1], int(r[2]), int(r[3])) for r in rows}

    async def prune_finished(self, cutoff_us: int) -> int:
        deleted: int = await self._transact(lambda db: self.barrier.prune_finished(db, cutoff_us))
        return deleted

    async def barrier_rows(self) -> int:
        sql = f"SELECT COUNT(*) FROM {self.barrier.table}"
        return int(await self._transact(lambda db: db.execute(sql).fetchone()[0]))

    async def close(self) -> None:
        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._thread.run(shut)
        await self._thread.stop()


class PostgresLedger:
    """The same ledger on PostgreSQL (asyncpg), in its own schema."""

    def __init__(
        self, pool: Any, schema: str, decline: Decline | None = None, *, clock: Clock | None = None
    ) -> None:
        self.pool = pool
        self.schema = schema
        self.decline = decline or (lambda _: False)
        self.barrier = PostgresBarrier(schema=schema, clock=clock)

    async def setup(self) -> None:
        s = self.schema
        await self.barrier.create_table(self.pool)
        await self.pool.execute(
            f"CREATE TABLE IF NOT EXISTS {s}.account (user_id TEXT PRIMARY KEY,"
            " balance BIGINT NOT NULL CHECK (balance >= 0));"
            f"CREATE TABLE IF NOT EXISTS {s}.payment (payment_id TEXT PRIMARY KEY,"
            " order_id TEXT NOT NULL, user_id TEXT NOT NULL, amount BIGINT NOT NULL,"
            " status INTEGER NOT NULL)"
        )

    async def charge(
        self, call: BarrierCall, request: pay.ChargePaymentRequest
    ) -> pay.ChargePaymentResponse:
        s = self.schema

        async with self.pool.acquire() as conn, conn.transaction():

            async def apply() -> pay.ChargePaymentResponse:
                found = await conn.fetchval(
                    f"SELECT status FROM {s}.payment WHERE payment_id = $1", request.payment_id
                )
                if found is None:
                    if self.decline(request):
                        raise _declined(request, "the card issuer said no")
                    moved = await conn.execute(
                        f"UPDATE {s}.account SET balance = balance - $1"
                        " WHERE user_id = $2 AND balance >= $1",
                        request.amount_minor,
                        request.user_id,
                    )
                    if moved != "UPDATE 1":
                        raise _declined(request, "insufficient funds or no account")
                    await conn.execute(
                        f"INSERT INTO {s}.payment VALUES ($1, $2, $3, $4, $5)",
                        request.payment_id,
                        request.order_id,
                        request.user_id,
                        request.amount_minor,
                        pay.PAYMENT_STATUS_CHARGED,
                    )
                return pay.ChargePaymentResponse(
                    payment=pay.Payment(
                        payment_id=request.payment_id,
                        order_id=request.order_id,
                        user_id=request.user_id,
                        amount_minor=request.amount_minor,
                        currency=request.currency,
                        status=pay.PAYMENT_STATUS_CHARGED,
                    )
                )

            return await self.barrier.guard(conn, call, apply, CHARGE_CODEC)

    async def refund(
        self, call: BarrierCall, request: pay.RefundPaymentRequest
    ) -> pay.RefundPaymentResponse:
        s = self.schema

        async with self.pool.acquire() as conn, conn.transaction():

            async def apply() -> pay.RefundPaymentResponse:
                row = await conn.fetchrow(
                    f"SELECT user_id, amount, status FROM {s}.payment WHERE payment_id = $1"
                    " FOR UPDATE",
                    request.payment_id,
                )
                if row is None or row[2] != pay.PAYMENT_STATUS_CHARGED:
                    return _no_refund(request)
                await conn.execute(
                    f"UPDATE {s}.account SET balance = balance + $1 WHERE user_id = $2",
                    row[1],
                    row[0],
                )
                await conn.execute(
                    f"UPDATE {s}.payment SET status = $1 WHERE payment_id = $2",
                    pay.PAYMENT_STATUS_REFUNDED,
                    request.payment_id,
                )
                payment = pay.Payment(
                    payment_id=request.payment_id, status=pay.PAYMENT_STATUS_REFUNDED
                )
                return pay.RefundPaymentResponse(payment=payment, refunded=True)

            return await self.barrier.guard(
                conn, call, apply, REFUND_CODEC, null_result=lambda: _no_refund(request)
            )

    async def open_account(self, user_id: str, balance: int) -> None:
        await self.pool.execute(
            f"INSERT INTO {self.schema}.account VALUES ($1, $2)", user_id, balance
        )

    async def balances(self) -> dict[str, int]:
        rows = await self.pool.fetch(f"SELECT user_id, balance FROM {self.schema}.account")
        return {r[0]: int(r[1]) for r in rows}

    async def payments(self) -> dict[str, tuple[str, int, int]]:
        rows = await self.pool.fetch(
            f"SELECT payment_id, order_id, amount, status FROM {self.schema}.payment"
        )
        return {r[0]: (r[1], int(r[2]), int(r[3])) for r in rows}

    async def prune_finished(self, cutoff_us: int) -> int:
        return await self.barrier.prune_finished(self.pool, cutoff_us)

    async def barrier_rows(self) -> int:
        return int(await self.pool.fetchval(f"SELECT COUNT(*) FROM {self.barrier.qualified}"))

    async def close(self) -> None:
        return None


class PaymentServicer(pay_grpc.PaymentServiceServicer):
    """payment.v1.PaymentService on a ledger; proto in, proto out."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.calls = 0
        self.deadlines: list[float | None] = []  # time remaining of each ChargePayment

    async def ChargePayment(
        self, request: pay.ChargePaymentRequest, context: Any
    ) -> pay.ChargePaymentResponse:
        self.calls += 1
        self.deadlines.append(context.time_remaining())
        return await self.ledger.charge(BarrierCall.current(request), request)

    async def RefundPayment(
        self, request: pay.RefundPaymentRequest, context: Any
    ) -> pay.RefundPaymentResponse:
        self.calls += 1
        return await self.ledger.refund(BarrierCall.current(request), request)

    async def GetPayment(
        self, request: pay.GetPaymentRequest, context: Any
    ) -> pay.GetPaymentResponse:
        found = (await self.ledger.payments()).get(request.payment_id)
        if found is None:
            raise NotFoundError(f"no payment {request.payment_id}")
        order_id, amount, status = found
        payment = pay.Payment(
            payment_id=request.payment_id,
            order_id=order_id,
            amount_minor=amount,
            status=status,  # type: ignore[arg-type]
        )
        return pay.GetPaymentResponse(payment=payment)


class NotificationServicer(notif_grpc.NotificationServiceServicer):
    """Sends (records) each notification once per idempotency key; `fail` refuses chosen ones."""

    def __init__(self, path: str, fail: Callable[[notif.SendNotificationRequest], bool]) -> None:
        self.fail = fail
        self.barrier = SqliteBarrier()
        self._thread = DedicatedThread(f"notifications:{path}")
        self.path = path
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS sent (notification_id TEXT PRIMARY KEY,"
                " user_id TEXT NOT NULL, body TEXT NOT NULL)"
            )
            self.barrier.create_table(db)
            self._db = db
        return self._db

    async def SendNotification(
        self, request: notif.SendNotificationRequest, context: Any
    ) -> notif.SendNotificationResponse:
        call = BarrierCall.current(request)

        def send(db: sqlite3.Connection) -> notif.SendNotificationResponse:
            if self.fail(request):
                raise FailedPreconditionError(
                    f"cannot notify {request.user_id}", reason="RECIPIENT_UNREACHABLE"
                )
            notification_id = str(uuid.uuid4())
            row = (notification_id, request.user_id, request.body)
            db.execute("INSERT INTO sent VALUES (?, ?, ?)", row)
            return notif.SendNotificationResponse(
                notification=notif.Notification(
                    notification_id=notification_id, user_id=request.user_id, body=request.body
                )
            )

        def run() -> notif.SendNotificationResponse:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                result = self.barrier.guard(db, call, lambda: send(db), NOTIFY_CODEC)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result

        return await self._thread.run(run)

    async def sent(self) -> list[str]:
        """Bodies of the notifications sent."""
        return [
            r[0]
            for r in await self._thread.run(
                lambda: self._conn().execute("SELECT body FROM sent").fetchall()
            )
        ]

    async def close(self) -> None:
        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._thread.run(shut)
        await self._thread.stop()


# ------------------------------------------------------------------ the order saga


def reserve_request(ctx: StepContext) -> inv.ReserveStockRequest:
    order = ctx.input
    assert isinstance(order, order_pb2.Order)
    return inv.ReserveStockRequest(
        reservation_id=ctx.uuid("reservation"),
        order_id=order.order_id,
        lines=[inv.StockLine(sku=i.sku, quantity=i.quantity) for i in order.items],
    )


def charge_request(ctx: StepContext) -> pay.ChargePaymentRequest:
    order = ctx.input
    assert isinstance(order, order_pb2.Order)
    return pay.ChargePaymentRequest(
        payment_id=ctx.uuid("payment"),
        order_id=order.order_id,
        user_id=order.user_id,
        amount_minor=order.total_minor,
        currency=order.currency,
    )


def notify_request(ctx: StepContext) -> notif.SendNotificationRequest:
    order = ctx.input
    assert isinstance(order, order_pb2.Order)
    charged = ctx.reply("charge")
    assert isinstance(charged, pay.ChargePaymentResponse)
    return notif.SendNotificationRequest(
        user_id=order.user_id,
        channel=notif.CHANNEL_EMAIL,
        subject="Order confirmed",
        body=f"order {order.order_id} confirmed, {charged.payment.amount_minor} charged",
    )


RESERVE = "inventory.v1.InventoryService/ReserveStock"
CHARGE = "payment.v1.PaymentService/ChargePayment"
NOTIFY = "notification.v1.NotificationService/SendNotification"


def order_saga(name: str = "order.confirm", **step_options: Any) -> SagaDefinition:
    """Reserve stock, charge the customer, send the confirmation (the pivot)."""
    return SagaDefinition(
        name,
        input_type=order_pb2.Order,
        steps=[
            Step("reserve", RESERVE, request=reserve_request, **step_options),
            Step("charge", CHARGE, request=charge_request, **step_options),
            Step("notify", NOTIFY, request=notify_request, compensable=False, **step_options),
        ],
        deadline_s=30.0,
    )


def an_order(user_id: str, sku: str, quantity: int, unit_price: int) -> order_pb2.Order:
    """An order as the saga's input."""
    return order_pb2.Order(
        order_id=str(uuid.uuid4()),
        user_id=user_id,
        status=order_pb2.ORDER_STATUS_DRAFT,
        items=[order_pb2.OrderItem(sku=sku, quantity=quantity, unit_price_minor=unit_price)],
        currency="EUR",
        total_minor=quantity * unit_price,
    )
