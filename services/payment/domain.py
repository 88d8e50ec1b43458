"""Payment rules: charge a customer for an order, refund it. No grpc, no I/O.

`ChargePayment` is a saga action and `RefundPayment` its compensation; the pair keeps
the barrier rules a saga participant needs (the `payment_id` names both):

- a repeated charge (same id and request) returns the first outcome: the same
  payment, or the same decline (a random decline is drawn once, never re-rolled);
  the same id with another order or amount is ALREADY_EXISTS (`PAYMENT_MISMATCH`);
- a refund of a payment that was never charged (null compensation) succeeds with
  `refunded=False` and leaves a tombstone;
- a charge arriving after its refund or tombstone (hanging action) is
  FAILED_PRECONDITION (`PAYMENT_CANCELLED`) and takes nothing;
- refunding twice succeeds with `refunded=False` the second time.
"""

from __future__ import annotations

import enum
from collections.abc import Set
from dataclasses import dataclass, replace
from datetime import datetime

from framework.errors import AlreadyExistsError, FailedPreconditionError, PermissionDeniedError

__all__ = [
    "ADMIN_SCOPE",
    "DOMAIN",
    "Caller",
    "ChargeRequest",
    "Decision",
    "Payment",
    "PaymentStatus",
    "authorize",
    "charge",
    "declined",
    "ledger_entries",
    "refund",
]

DOMAIN = "payment.v1"
ADMIN_SCOPE = "payments:admin"


class PaymentStatus(enum.Enum):
    CHARGED = "CHARGED"
    REFUNDED = "REFUNDED"
    FAILED = "FAILED"
    # refunded before any charge arrived (null compensation): refuses a late charge
    TOMBSTONE = "TOMBSTONE"


@dataclass(frozen=True, slots=True)
class ChargeRequest:
    payment_id: str
    order_id: str
    user_id: str
    amount_minor: int
    currency: str


@dataclass(frozen=True, slots=True)
class Payment:
    payment_id: str
    order_id: str
    user_id: str
    amount_minor: int
    currency: str
    status: PaymentStatus
    reason: str
    created_at: datetime
    updated_at: datetime

    def same_request(self, request: ChargeRequest) -> bool:
        return (self.order_id, self.user_id, self.amount_minor, self.currency) == (
            request.order_id,
            request.user_id,
            request.amount_minor,
            request.currency,
        )


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether a new charge is declined, and why (drawn by the application)."""

    declined: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Caller:
    subject: str
    scopes: Set[str] = frozenset()


def authorize(caller: Caller, payment: Payment) -> None:
    if caller.subject == payment.user_id or ADMIN_SCOPE in caller.scopes:
        return
    raise PermissionDeniedError(
        f"payment {payment.payment_id} belongs to another customer",
        reason="NOT_YOUR_PAYMENT",
        domain=DOMAIN,
    )


def declined(payment: Payment) -> FailedPreconditionError:
    return FailedPreconditionError(
        f"payment {payment.payment_id} was declined: {payment.reason}",
        reason="PAYMENT_DECLINED",
        metadata={"payment_id": payment.payment_id},
        domain=DOMAIN,
    )


def charge(
    existing: Payment | None, request: ChargeRequest, decision: Decision, now: datetime
) -> tuple[Payment, bool]:
    """The payment after the charge, and whether it is new (to be saved).

    A declined charge is recorded too (FAILED) and then raised by the caller with
    `declined()`, so a retry answers the same.
    """
    if existing is not None:
        if existing.status in (PaymentStatus.REFUNDED, PaymentStatus.TOMBSTONE):
            raise FailedPreconditionError(
                f"payment {existing.payment_id} was already refunded or cancelled; "
                "a charge arriving after its refund takes nothing",
                reason="PAYMENT_CANCELLED",
                domain=DOMAIN,
            )
        if not existing.same_request(request):
            raise AlreadyExistsError(
                f"payment {existing.payment_id} exists for another order or amount; "
                "a payment id names exactly one charge",
                reason="PAYMENT_MISMATCH",
                domain=DOMAIN,
            )
        return existing, False
    status = PaymentStatus.FAILED if decision.declined else PaymentStatus.CHARGED
    payment = Payment(
        payment_id=request.payment_id,
        order_id=request.order_id,
        user_id=request.user_id,
        amount_minor=request.amount_minor,
        currency=request.currency,
        status=status,
        reason=decision.reason,
        created_at=now,
        updated_at=now,
    )
    return payment, True


def ledger_entries(before: Payment | None, after: Payment) -> list[int]:
    """Money moved by a change, as signed ledger amounts: +amount when a charge is taken,
    -amount when a taken charge is refunded; nothing for declines and tombstones."""
    was = before.status if before is not None else None
    if after.status is PaymentStatus.CHARGED and was is None:
        return [after.amount_minor]
    if after.status is PaymentStatus.REFUNDED and was is PaymentStatus.CHARGED:
        return [-after.amount_minor]
    return []


def refund(
    existing: Payment | None, payment_id: str, reason: str, now: datetime
) -> tuple[Payment, bool, bool]:
    """(payment after, refunded now?, changed (to be saved)?)."""
    if existing is None:
        tombstone = Payment(
            payment_id=payment_id,
            order_id="",
            user_id="",
            amount_minor=0,
            currency="",
            status=PaymentStatus.TOMBSTONE,
            reason=reason or "refunded before any charge",
            created_at=now,
            updated_at=now,
        )
        return tombstone, False, True
    if existing.status is PaymentStatus.CHARGED:
        return (
            replace(existing, status=PaymentStatus.REFUNDED, reason=reason, updated_at=now),
            True,
            True,
        )
    return existing, False, False
