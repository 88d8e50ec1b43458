"""What confirming an order asks of the other services, shared by the order service and
the saga definition: the saga id and the ids of its steps are derived from the order,
so a retry, a restart or a reconciliation always names the same saga, reservation
and payment.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from gen.order.v1 import saga_pb2
from services.order.domain import Line

__all__ = ["DEFINITION", "confirmation_input", "payment_id", "reservation_id", "saga_id"]

DEFINITION = "order.confirm"
_NAMESPACE = uuid.UUID("0b6c8f2e-4f7d-4b9a-a1c3-5e2d9f8a7b61")


def saga_id(order_id: str) -> str:
    return f"order-{order_id}"


def reservation_id(order_id: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"reservation:{order_id}"))


def payment_id(order_id: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"payment:{order_id}"))


def confirmation_input(
    order_id: str, user_id: str, lines: Iterable[Line], currency: str
) -> saga_pb2.OrderConfirmation:
    """The saga input: one line per SKU (quantities summed), the total, the customer."""
    quantities: dict[str, int] = {}
    total = 0
    for line in lines:
        quantities[line.sku] = quantities.get(line.sku, 0) + line.quantity
        total += line.quantity * line.unit_price_minor
    return saga_pb2.OrderConfirmation(
        order_id=order_id,
        user_id=user_id,
        lines=[
            saga_pb2.ConfirmationLine(sku=sku, quantity=qty)
            for sku, qty in sorted(quantities.items())
        ],
        total_minor=total,
        currency=currency,
    )
