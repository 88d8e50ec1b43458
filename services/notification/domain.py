"""Notification rules: what a customer is told when their order changes. No grpc, no I/O.

Notifications come from two places: a direct `SendNotification` (e.g. the order
saga's last step) and order events consumed from the bus.  Each has a source key
(the caller's idempotency key, or `event:<event id>`) so a repeat records nothing new.
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Set
from dataclasses import dataclass
from datetime import datetime

from framework.errors import InvalidArgumentError, PermissionDeniedError

__all__ = [
    "ADMIN_SCOPE",
    "DOMAIN",
    "Caller",
    "Channel",
    "Draft",
    "Notification",
    "PageToken",
    "authorize",
    "order_cancelled",
    "order_confirmed",
]

DOMAIN = "notification.v1"
ADMIN_SCOPE = "notifications:admin"


class Channel(enum.IntEnum):
    EMAIL = 1
    SMS = 2


@dataclass(frozen=True, slots=True)
class Caller:
    subject: str
    scopes: Set[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Draft:
    """A notification to record (not yet sent)."""

    user_id: str
    channel: Channel
    subject: str
    body: str


@dataclass(frozen=True, slots=True)
class Notification:
    notification_id: str
    user_id: str
    channel: Channel
    subject: str
    body: str
    sent_at: datetime
    source_key: str


def authorize(caller: Caller, user_id: str) -> None:
    """A customer reads only their own notifications; `notifications:admin` reads anyone's."""
    if caller.subject == user_id or ADMIN_SCOPE in caller.scopes:
        return
    raise PermissionDeniedError(
        f"you may list only your own notifications; {user_id} is someone else",
        reason="NOT_YOUR_NOTIFICATIONS",
        domain=DOMAIN,
    )


def _money(minor: int, currency: str) -> str:
    return f"{minor // 100}.{minor % 100:02d} {currency}"


def order_confirmed(user_id: str, order_id: str, total_minor: int, currency: str) -> Draft:
    return Draft(
        user_id,
        Channel.EMAIL,
        f"Order {order_id[:8]} confirmed",
        f"Your order {order_id} is confirmed: {_money(total_minor, currency)} was charged "
        "and your items are reserved.",
    )


def order_cancelled(user_id: str, order_id: str, reason: str) -> Draft:
    return Draft(
        user_id,
        Channel.EMAIL,
        f"Order {order_id[:8]} cancelled",
        f"Your order {order_id} was cancelled: {reason or 'no reason given'}. "
        "Nothing was charged and no stock is held for it.",
    )


@dataclass(frozen=True, slots=True)
class PageToken:
    """Where the next page of a newest-first listing starts (keyset, opaque to clients)."""

    sent_at_micros: int
    notification_id: str

    def encode(self) -> str:
        raw = f"{self.sent_at_micros}:{self.notification_id}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> PageToken:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
            micros, _, notification_id = raw.partition(":")
            return cls(int(micros), notification_id)
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise InvalidArgumentError(
                "page_token is not one this service returned; start again without it",
                reason="BAD_PAGE_TOKEN",
                domain=DOMAIN,
            ) from None
