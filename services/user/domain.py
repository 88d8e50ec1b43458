"""Identity rules: who the customers are and what they may change. No grpc, no I/O.

A user registers with a unique email (compared case-insensitively), a display name
and a password (kept only as a hash made elsewhere).  A deactivated user cannot log
in or change their profile; deactivating again changes nothing.

Access: a customer acts on their own user only; a caller holding `users:admin`
(an operator, or a service acting for any customer) may act on anyone.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass, replace
from datetime import datetime

from framework.errors import FailedPreconditionError, PermissionDeniedError

__all__ = [
    "ADMIN_SCOPE",
    "CUSTOMER_SCOPES",
    "DOMAIN",
    "Caller",
    "User",
    "authorize",
    "deactivate",
    "normalize_email",
    "update_profile",
]

DOMAIN = "user.v1"
ADMIN_SCOPE = "users:admin"
# What a customer's access token lets them do across the system.
CUSTOMER_SCOPES = (
    "users:read",
    "users:write",
    "orders:read",
    "orders:write",
    "notifications:read",
    "inventory:read",
)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: the verified subject and scopes (empty subject: anonymous)."""

    subject: str
    scopes: Set[str] = frozenset()


@dataclass(frozen=True, slots=True)
class User:
    user_id: str
    email: str
    display_name: str
    password_hash: str
    registered_at: datetime
    deactivated_at: datetime | None = None
    deactivation_reason: str = ""

    @property
    def active(self) -> bool:
        return self.deactivated_at is None


def normalize_email(email: str) -> str:
    """The form emails are compared and stored in (trimmed, lower case)."""
    return email.strip().lower()


def authorize(caller: Caller, user_id: str, action: str) -> None:
    """Refuse a caller acting on another user's account without `users:admin`."""
    if caller.subject == user_id or ADMIN_SCOPE in caller.scopes:
        return
    raise PermissionDeniedError(
        f"you may {action} only your own user; {user_id} is someone else's",
        reason="NOT_YOUR_USER",
        domain=DOMAIN,
    )


def _require_active(user: User, action: str) -> None:
    if not user.active:
        raise FailedPreconditionError(
            f"user {user.user_id} is deactivated; a deactivated account cannot {action}",
            reason="USER_DEACTIVATED",
            domain=DOMAIN,
        )


def update_profile(user: User, display_name: str) -> User:
    _require_active(user, "change its profile")
    return replace(user, display_name=display_name.strip())


def deactivate(user: User, reason: str, now: datetime) -> tuple[User, bool]:
    """The deactivated user, and whether this call changed anything."""
    if not user.active:
        return user, False
    return replace(user, deactivated_at=now, deactivation_reason=reason), True


def can_log_in(user: User) -> bool:
    return user.active
