"""Payment rules: charge a customer for an order, refund it. No grpc, no I/O.

`ChargePayment` is a saga action and `RefundPayment` its compensation.  The saga
mechanics (a repeated call answering the first result, a refund arriving before
its charge, a charge arriving after its refund) are the framework's participant
barrier, recorded by the application layer in the same transaction.  The business
rules on a payment id hold whatever the idempotency key:

- a repeated charge (same id and request) returns the first outcome: the same
  payment, or the same decline (a random decline is drawn once, never re-rolled);
  the same id with another order or amount is ALREADY_EXISTS (`PAYMENT_MISMATCH`);
- a refunded payment cannot be charged again: FAILED_PRECONDITION
  (`PAYMENT_CANCELLED`), nothing taken;
- refunding what was not charged (never charged, declined, refunded already)
  changes nothing and says `refunded=False`.
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
        if existing.status is PaymentStatus.REFUNDED:
            raise FailedPreconditionError(
                f"payment {existing.payment_id} was already refunded; "
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
    -amount when a taken charge is refunded; nothing for declines."""
    was = before.status if before is not None else None
    if after.status is PaymentStatus.CHARGED and was is None:
        return [after.amount_minor]
    if after.status is PaymentStatus.REFUNDED and was is PaymentStatus.CHARGED:
        return [-after.amount_minor]
    return []


def refund(existing: Payment | None, reason: str, now: datetime) -> tuple[Payment | None, bool]:
    """(payment after, refunded now?): only a CHARGED payment is refunded; anything else
    (no payment, declined, refunded already) is returned unchanged with False."""
    if existing is not None and existing.status is PaymentStatus.CHARGED:
        return replace(existing, status=PaymentStatus.REFUNDED, reason=reason, updated_at=now), True
    return existing, False
