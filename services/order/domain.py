"""The Order aggregate: a customer's order as the events it went through. No grpc, no I/O.

    DRAFT --add item--> DRAFT --confirm--> CONFIRMING --saga completed--> CONFIRMED
      |                                        |
      +--cancel--> CANCELLED <--saga compensated+

Commands check the rules and emit events (`framework.events.Aggregate`); the
repository saves them with the version the order was loaded at, so two writers
never both win.  Repeats are harmless: adding a line whose id was already added,
starting a confirmation already started, confirming or cancelling twice, each
changes nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Set
from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

from framework.errors import FailedPreconditionError, PermissionDeniedError
from framework.events.aggregate import Aggregate, applies
from gen.order.v1 import events_pb2 as ev

__all__ = [
    "ADMIN_SCOPE",
    "DOMAIN",
    "Caller",
    "Line",
    "Order",
    "Status",
    "authorize",
    "line_id",
    "order_id_for",
]

DOMAIN = "order.v1"
ADMIN_SCOPE = "orders:admin"
_NAMESPACE = uuid.UUID("4a3f1c9e-8a7b-4c62-9d0e-6f5a2b1c7d30")


class Status:
    DRAFT = "DRAFT"
    CONFIRMING = "CONFIRMING"
    CONFIRMED = "CONFIRMED"
    CANCELLED = "CANCELLED"


@dataclass(frozen=True, slots=True)
class Caller:
    subject: str
    scopes: Set[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Line:
    line_id: str
    sku: str
    quantity: int
    unit_price_minor: int


def order_id_for(user_id: str, idempotency_key: str) -> str:
    """The order a CreateOrder with this key creates: a retry finds the same one."""
    return str(uuid.uuid5(_NAMESPACE, f"order:{user_id}:{idempotency_key}"))


def line_id(order_id: str, idempotency_key: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"line:{order_id}:{idempotency_key}"))


def authorize(caller: Caller, user_id: str) -> None:
    """A customer acts on their own orders; `orders:admin` on anyone's."""
    if caller.subject == user_id or ADMIN_SCOPE in caller.scopes:
        return
    raise PermissionDeniedError(
        "this order belongs to another customer", reason="NOT_YOUR_ORDER", domain=DOMAIN
    )


def _stamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


class Order(Aggregate):
    """One order's state, rebuilt from its events."""

    aggregate_type = "order"

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.user_id = ""
        self.currency = ""
        self.status = ""
        self.lines: list[Line] = []
        self.cancel_reason = ""
        self.saga_id = ""
        self.reservation_id = ""
        self.payment_id = ""
        self.created_at: datetime | None = None
        self.updated_at: datetime | None = None

    @property
    def total_minor(self) -> int:
        return sum(line.quantity * line.unit_price_minor for line in self.lines)

    def _refuse(self, message: str, reason: str) -> FailedPreconditionError:
        return FailedPreconditionError(
            f"order {self.id} is {self.status.lower()}: {message}",
            reason=reason,
            metadata={"order_id": self.id, "status": self.status},
            domain=DOMAIN,
        )

    # ------------------------------------------------------------ commands
    def create(self, user_id: str, currency: str, now: datetime) -> None:
        if self.version:
            return  # created by an earlier attempt with the same key
        self.emit(
            ev.OrderCreated(
                order_id=self.id, user_id=user_id, currency=currency, created_at=_stamp(now)
            )
        )

    def add_item(
        self, line: str, sku: str, quantity: int, unit_price_minor: int, now: datetime
    ) -> None:
        if any(existing.line_id == line for existing in self.lines):
            return  # this request was applied already
        if self.status != Status.DRAFT:
            raise self._refuse("items can be added to draft orders only", "ORDER_NOT_DRAFT")
        self.emit(
            ev.OrderItemAdded(
                order_id=self.id,
                sku=sku,
                quantity=quantity,
                unit_price_minor=unit_price_minor,
                added_at=_stamp(now),
                line_id=line,
            )
        )

    def start_confirmation(self, saga_id: str, now: datetime) -> bool:
        """Move to CONFIRMING; False when confirmation already started (or ended)."""
        if self.status in (Status.CONFIRMING, Status.CONFIRMED):
            return False
        if self.status != Status.DRAFT:
            raise self._refuse("only a draft order can be confirmed", "ORDER_NOT_DRAFT")
        if not self.lines:
            raise self._refuse("add at least one item before confirming", "ORDER_EMPTY")
        self.emit(
            ev.OrderConfirmationStarted(
                order_id=self.id,
                saga_id=saga_id,
                total_minor=self.total_minor,
                currency=self.currency,
                started_at=_stamp(now),
            )
        )
        return True

    def complete_confirmation(self, reservation_id: str, payment_id: str, now: datetime) -> None:
        """The saga completed: CONFIRMED (again: no change)."""
        if self.status == Status.CONFIRMED:
            return
        if self.status != Status.CONFIRMING:
            raise self._refuse("no confirmation is running", "ORDER_NOT_CONFIRMING")
        self.emit(
            ev.OrderConfirmed(
                order_id=self.id,
                total_minor=self.total_minor,
                currency=self.currency,
                reservation_id=reservation_id,
                payment_id=payment_id,
                confirmed_at=_stamp(now),
            )
        )

    def fail_confirmation(self, reason: str, now: datetime) -> None:
        """The saga compensated: CANCELLED with its reason (again: no change)."""
        if self.status == Status.CANCELLED:
            return
        if self.status != Status.CONFIRMING:
            raise self._refuse("no confirmation is running", "ORDER_NOT_CONFIRMING")
        self.emit(ev.OrderCancelled(order_id=self.id, reason=reason, cancelled_at=_stamp(now)))

    def cancel(self, reason: str, now: datetime) -> None:
        """The customer cancels a draft (again: no change)."""
        if self.status == Status.CANCELLED:
            return
        if self.status != Status.DRAFT:
            raise self._refuse(
                "only a draft order can be cancelled; a confirmation is running or done",
                "ORDER_NOT_DRAFT",
            )
        self.emit(
            ev.OrderCancelled(
                order_id=self.id,
                reason=reason or "cancelled by the customer",
                cancelled_at=_stamp(now),
            )
        )

    # ------------------------------------------------------------ events
    @applies(ev.OrderCreated)
    def _created(self, event: ev.OrderCreated) -> None:
        self.user_id, self.currency, self.status = event.user_id, event.currency, Status.DRAFT
        self.created_at = self.updated_at = event.created_at.ToDatetime(tzinfo=UTC)

    @applies(ev.OrderItemAdded)
    def _item_added(self, event: ev.OrderItemAdded) -> None:
        self.lines.append(Line(event.line_id, event.sku, event.quantity, event.unit_price_minor))
        self.updated_at = event.added_at.ToDatetime(tzinfo=UTC)

    @applies(ev.OrderConfirmationStarted)
    def _confirmation_started(self, event: ev.OrderConfirmationStarted) -> None:
        self.status, self.saga_id = Status.CONFIRMING, event.saga_id
        self.updated_at = event.started_at.ToDatetime(tzinfo=UTC)

    @applies(ev.OrderConfirmed)
    def _confirmed(self, event: ev.OrderConfirmed) -> None:
        self.status = Status.CONFIRMED
        self.reservation_id, self.payment_id = event.reservation_id, event.payment_id
        self.updated_at = event.confirmed_at.ToDatetime(tzinfo=UTC)

    @applies(ev.OrderCancelled)
    def _cancelled(self, event: ev.OrderCancelled) -> None:
        self.status, self.cancel_reason = Status.CANCELLED, event.reason
        self.updated_at = event.cancelled_at.ToDatetime(tzinfo=UTC)
