"""Payment use cases: charge (saga action), refund (its compensation), read.

A new charge is declined when its amount is above `decline_above_minor` (a card
limit, so demos can fail a payment on purpose) or, with probability
`failure_rate`, at random (for chaos runs).  The decision is drawn once and
stored with the payment, so a retried charge answers the same.

Charge and refund go through the framework's participant barrier, keyed by the
call's `idempotency-key` (the saga orchestrator sends
`saga:<saga_id>/<step>/action|compensation`), recorded in the transaction of the
payment change:

- a call repeated with the same key answers the first call's result (the same
  payment, or the same decline) and moves no money; the same key with another
  request is ALREADY_EXISTS (`IDEMPOTENCY_KEY_REUSED`);
- a refund whose charge never ran (null compensation) answers `refunded=False`
  and records nothing; the charge arriving after it (hanging action) is
  FAILED_PRECONDITION (`ACTION_AFTER_COMPENSATION`) and takes nothing.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from framework.clock import Clock, SystemClock
from framework.errors import NotFoundError
from framework.saga.barrier import BarrierCall
from services.payment import domain
from services.payment.domain import Caller, ChargeRequest, Decision, Payment, PaymentStatus
from services.payment.store import SqlPaymentStore

__all__ = ["PaymentConfig", "Payments"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PaymentConfig:
    """Declines: above `decline_above_minor` (0: no limit), and `failure_rate` at random."""

    failure_rate: float = 0.0
    decline_above_minor: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.failure_rate <= 1.0:
            raise ValueError(f"failure_rate must be within 0..1, got {self.failure_rate}")
        if self.decline_above_minor < 0:
            raise ValueError(f"decline_above_minor must be >= 0, got {self.decline_above_minor}")


class Payments:
    def __init__(
        self,
        store: SqlPaymentStore,
        config: PaymentConfig | None = None,
        *,
        rng: random.Random | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.store = store
        self.config = config or PaymentConfig()
        self.rng = rng or random.Random()
        self.clock = clock or SystemClock()

    def _decide(self, request: ChargeRequest) -> Decision:
        limit = self.config.decline_above_minor
        if limit and request.amount_minor > limit:
            return Decision(True, f"amount {request.amount_minor} is above the card limit {limit}")
        if self.config.failure_rate and self.rng.random() < self.config.failure_rate:
            return Decision(True, "declined by the card issuer")
        return Decision(False)

    async def charge(self, request: ChargeRequest, idempotency_key: str) -> Payment:
        """Charge once per key and per payment id; a declined charge raises PAYMENT_DECLINED
        (recorded, so a retry is declined the same way)."""
        now = self.clock.now()
        call = BarrierCall.of(
            idempotency_key,
            _digest(
                "ChargePayment",
                request.payment_id,
                request.order_id,
                request.user_id,
                request.amount_minor,
                request.currency,
            ),
        )

        async def work(tx: Any) -> Payment:
            current = await self.store.load(tx, request.payment_id)
            decision = self._decide(request) if current is None else Decision(False)
            payment, new = domain.charge(current, request, decision, now)
            if new:
                await self.store.save(tx, current, payment)
            return payment

        payment = await self.store.guarded(call, work, PAYMENT_CODEC)
        logger.info(
            "charge payment_id=%s order_id=%s amount=%s status=%s key=%s",
            payment.payment_id,
            payment.order_id,
            payment.amount_minor,
            payment.status.value,
            idempotency_key,
        )
        if payment.status is PaymentStatus.FAILED:
            raise domain.declined(payment)
        return payment

    async def refund(
        self, payment_id: str, reason: str, idempotency_key: str
    ) -> tuple[Payment | None, bool]:
        """Refund a charged payment: (payment or None when there is none, refunded now?)."""
        now = self.clock.now()
        call = BarrierCall.of(idempotency_key, _digest("RefundPayment", payment_id, reason))

        async def work(tx: Any) -> tuple[Payment | None, bool]:
            current = await self.store.load(tx, payment_id)
            payment, refunded = domain.refund(current, reason, now)
            if refunded and payment is not None:
                await self.store.save(tx, current, payment)
            return payment, refunded

        payment, refunded = await self.store.guarded(
            call, work, REFUND_CODEC, null_result=lambda: (None, False)
        )
        logger.info(
            "refund payment_id=%s refunded=%s key=%s", payment_id, refunded, idempotency_key
        )
        return payment, refunded

    async def get(self, caller: Caller, payment_id: str) -> Payment:
        payment = await self.store.get(payment_id)
        if payment is None:
            raise NotFoundError(
                f"payment {payment_id} does not exist",
                reason="PAYMENT_NOT_FOUND",
                domain=domain.DOMAIN,
            )
        domain.authorize(caller, payment)
        return payment


def _digest(*parts: object) -> bytes:
    """What the barrier fingerprints: the use case and its arguments."""
    return "\x1f".join(str(part) for part in parts).encode()


def _payment_json(p: Payment) -> dict[str, Any]:
    return {
        "payment_id": p.payment_id,
        "order_id": p.order_id,
        "user_id": p.user_id,
        "amount_minor": p.amount_minor,
        "currency": p.currency,
        "status": p.status.value,
        "reason": p.reason,
        "created_at": p.created_at.isoformat(),
        "updated_at": p.updated_at.isoformat(),
    }


def _payment_from(raw: dict[str, Any]) -> Payment:
    return Payment(
        payment_id=raw["payment_id"],
        order_id=raw["order_id"],
        user_id=raw["user_id"],
        amount_minor=int(raw["amount_minor"]),
        currency=raw["currency"],
        status=PaymentStatus(raw["status"]),
        reason=raw["reason"],
        created_at=datetime.fromisoformat(raw["created_at"]),
        updated_at=datetime.fromisoformat(raw["updated_at"]),
    )


class _PaymentCodec:
    def encode(self, value: Payment) -> bytes:
        return json.dumps(_payment_json(value)).encode()

    def decode(self, data: bytes) -> Payment:
        return _payment_from(json.loads(data))


class _RefundCodec:
    def encode(self, value: tuple[Payment | None, bool]) -> bytes:
        payment, refunded = value
        body = {"payment": None if payment is None else _payment_json(payment)}
        return json.dumps({**body, "refunded": refunded}).encode()

    def decode(self, data: bytes) -> tuple[Payment | None, bool]:
        raw = json.loads(data)
        payment = None if raw["payment"] is None else _payment_from(raw["payment"])
        return payment, bool(raw["refunded"])


PAYMENT_CODEC = _PaymentCodec()
REFUND_CODEC = _RefundCodec()
