"""Notification use cases: send one, list a customer's, and react to order events.

`handle_order_event(tx, envelope)` runs inside the consumer's transaction (the
framework's `IdempotentHandler` marks the event processed in the same commit):
`OrderCreated` teaches which customer owns an order; `OrderConfirmed` and
`OrderCancelled` record a notification to that customer.  An order event that
arrives before its `OrderCreated` fails, so the bus delivers it again later.
"""

from __future__ import annotations

import logging
from typing import Any

from framework.clock import Clock, SystemClock
from framework.errors import FailedPreconditionError
from framework.events.envelope import to_micros
from gen.events.v1.envelope_pb2 import EventEnvelope
from gen.order.v1 import events_pb2 as order_events
from services.notification import domain
from services.notification.domain import Caller, Draft, Notification, PageToken
from services.notification.store import SqlNotificationStore

__all__ = ["DEFAULT_PAGE_SIZE", "ORDER_EVENT_TYPES", "Notifications"]

logger = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 20
ORDER_EVENT_TYPES = tuple(
    m.DESCRIPTOR.full_name
    for m in (order_events.OrderCreated, order_events.OrderConfirmed, order_events.OrderCancelled)
)


class Notifications:
    def __init__(self, store: SqlNotificationStore, *, clock: Clock | None = None) -> None:
        self.store = store
        self.clock = clock or SystemClock()

    async def send(self, draft: Draft, idempotency_key: str) -> Notification:
        """Record a notification once per key (a repeat returns the first)."""
        sent = await self.store.record(draft, f"key:{idempotency_key}", to_micros(self.clock.now()))
        logger.info("notification %s to %s: %s", sent.notification_id, sent.user_id, sent.subject)
        return sent

    async def list(
        self, caller: Caller, user_id: str, page_size: int, page_token: str
    ) -> tuple[list[Notification], str]:
        domain.authorize(caller, user_id)
        after = PageToken.decode(page_token) if page_token else None
        found, following = await self.store.page(user_id, page_size or DEFAULT_PAGE_SIZE, after)
        return found, following.encode() if following else ""

    async def handle_order_event(self, tx: Any, envelope: EventEnvelope) -> None:
        store = self.store
        if envelope.type == order_events.OrderCreated.DESCRIPTOR.full_name:
            created = order_events.OrderCreated.FromString(envelope.payload)
            await store.remember_owner_in(tx, created.order_id, created.user_id)
            return
        draft: Draft
        if envelope.type == order_events.OrderConfirmed.DESCRIPTOR.full_name:
            confirmed = order_events.OrderConfirmed.FromString(envelope.payload)
            owner = await self._owner(tx, confirmed.order_id)
            draft = domain.order_confirmed(
                owner, confirmed.order_id, confirmed.total_minor, confirmed.currency
            )
        elif envelope.type == order_events.OrderCancelled.DESCRIPTOR.full_name:
            cancelled = order_events.OrderCancelled.FromString(envelope.payload)
            owner = await self._owner(tx, cancelled.order_id)
            draft = domain.order_cancelled(owner, cancelled.order_id, cancelled.reason)
        else:
            return  # a type this consumer does not react to
        sent = await store.record_in(
            tx, draft, f"event:{envelope.event_id}", to_micros(self.clock.now())
        )
        logger.info("notification %s to %s: %s", sent.notification_id, owner, draft.subject)

    async def _owner(self, tx: Any, order_id: str) -> str:
        owner = await self.store.owner_in(tx, order_id)
        if owner is None:
            raise FailedPreconditionError(
                f"order {order_id} is not known yet (its OrderCreated has not arrived); "
                "the event will be delivered again",
                reason="ORDER_NOT_KNOWN_YET",
                domain=domain.DOMAIN,
            )
        return owner
