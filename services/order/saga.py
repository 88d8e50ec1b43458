"""The order saga: reserve the stock, charge the customer, then tell them.

Loaded by the saga orchestrator (the manifest's `sagas.definitions` names
`services.order.saga:definitions`).  The compensations come from the contracts
(`ReleaseStock` undoes `ReserveStock`, `RefundPayment` undoes `ChargePayment`); the
notification is the pivot: once the customer was told, the saga no longer turns back.
Every id is derived from the order (`services.order.confirmation`), so the order
service names the same reservation and payment without asking.
"""

from __future__ import annotations

from framework.saga import Retry, SagaDefinition, Step, StepContext
from gen.inventory.v1 import inventory_pb2
from gen.notification.v1 import notification_pb2
from gen.order.v1 import saga_pb2
from gen.payment.v1 import payment_pb2
from services.order import confirmation

__all__ = ["CONFIRM", "definitions"]


def _input(ctx: StepContext) -> saga_pb2.OrderConfirmation:
    message = ctx.input
    assert isinstance(message, saga_pb2.OrderConfirmation)
    return message


def reserve(ctx: StepContext) -> inventory_pb2.ReserveStockRequest:
    order = _input(ctx)
    return inventory_pb2.ReserveStockRequest(
        reservation_id=confirmation.reservation_id(order.order_id),
        order_id=order.order_id,
        lines=[
            inventory_pb2.StockLine(sku=line.sku, quantity=line.quantity) for line in order.lines
        ],
    )


def charge(ctx: StepContext) -> payment_pb2.ChargePaymentRequest:
    order = _input(ctx)
    return payment_pb2.ChargePaymentRequest(
        payment_id=confirmation.payment_id(order.order_id),
        order_id=order.order_id,
        user_id=order.user_id,
        amount_minor=order.total_minor,
        currency=order.currency,
    )


def notify(ctx: StepContext) -> notification_pb2.SendNotificationRequest:
    order = _input(ctx)
    amount = f"{order.total_minor // 100}.{order.total_minor % 100:02d} {order.currency}"
    return notification_pb2.SendNotificationRequest(
        user_id=order.user_id,
        channel=notification_pb2.CHANNEL_EMAIL,
        subject=f"Payment received for order {order.order_id[:8]}",
        body=f"We received {amount} for order {order.order_id}; your items are reserved.",
    )


CONFIRM = SagaDefinition(
    confirmation.DEFINITION,
    input_type=saga_pb2.OrderConfirmation,
    steps=[
        Step("reserve", "inventory.v1.InventoryService/ReserveStock", request=reserve),
        Step(
            "charge",
            "payment.v1.PaymentService/ChargePayment",
            request=charge,
            retry=Retry(max_attempts=5, initial_backoff_s=0.1, max_backoff_s=1.0),
        ),
        Step(
            "notify",
            "notification.v1.NotificationService/SendNotification",
            request=notify,
            compensable=False,
        ),
    ],
    deadline_s=30,
)


def definitions() -> list[SagaDefinition]:
    """What the orchestrator runs for the ordering context."""
    return [CONFIRM]
