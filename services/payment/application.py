"""Payment use cases: charge (saga action), refund (its compensation), read.

A new charge is declined when its amount is above `decline_above_minor` (a card
limit, so demos can fail a payment on purpose) or, with probability
`failure_rate`, at random (for chaos runs).  The decision is drawn once and
stored with the payment, so a retried charge answers the same.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from framework.clock import Clock, SystemClock
from framework.errors import NotFoundError
from services.payment import domain
from services.payment.domain import Caller, ChargeRequest, Decision, Payment
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

    async def charge(self, request: ChargeRequest) -> Payment:
        now = self.clock.now()

        def work(current: Payment | None) -> tuple[Payment, bool, tuple[Payment, bool]]:
            decision = self._decide(request) if current is None else Decision(False)
            payment, new = domain.charge(current, request, decision, now)
            return payment, new, (payment, new)

        payment, new = await self.store.change(request.payment_id, work)
        logger.info(
            "charge payment_id=%s order_id=%s amount=%s status=%s replay=%s",
            payment.payment_id,
            payment.order_id,
            payment.amount_minor,
            payment.status.value,
            not new,
        )
        if payment.status is domain.PaymentStatus.FAILED:
            raise domain.declined(payment)
        return payment

    async def refund(self, payment_id: str, reason: str) -> tuple[Payment, bool]:
        now = self.clock.now()

        def work(current: Payment | None) -> tuple[Payment, bool, tuple[Payment, bool]]:
            payment, refunded, changed = domain.refund(current, payment_id, reason, now)
            return payment, changed, (payment, refunded)

        payment, refunded = await self.store.change(payment_id, work)
        logger.info(
            "refund payment_id=%s refunded=%s status=%s",
            payment_id,
            refunded,
            payment.status.value,
        )
        return payment, refunded

    async def get(self, caller: Caller, payment_id: str) -> Payment:
        payment = await self.store.get(payment_id)
        if payment is None or payment.status is domain.PaymentStatus.TOMBSTONE:
            raise NotFoundError(
                f"payment {payment_id} does not exist",
                reason="PAYMENT_NOT_FOUND",
                domain=domain.DOMAIN,
            )
        domain.authorize(caller, payment)
        return payment
