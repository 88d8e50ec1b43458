"""Identity use cases: register, log in, read, update, deactivate.

Collaborators are passed in: a `UserStore`, a `PasswordHasher` (Argon2 in
production, run off the event loop), a `TokenIssuer` (signs access tokens) and a
clock.  Rules that matter here:

- registration is idempotent by key: a retry with the same `idempotency-key`
  returns the user the first attempt created (the key with another email is
  refused); a taken email is ALREADY_EXISTS;
- log-in answers the same UNAUTHENTICATED (`BAD_CREDENTIALS`) for an unknown email,
  a wrong password and a deactivated account, and spends the same hashing work on
  an unknown email, so the answer does not tell which emails are registered.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from framework.auth.bearer import IssuedToken
from framework.clock import Clock, SystemClock
from framework.errors import AlreadyExistsError, NotFoundError, UnauthenticatedError
from services.user import domain
from services.user.domain import CUSTOMER_SCOPES, Caller, User

__all__ = ["LoggedIn", "PasswordHasher", "TokenIssuer", "UserStore", "Users"]

logger = logging.getLogger(__name__)


class UserStore(Protocol):
    async def get(self, user_id: str) -> User | None: ...

    async def by_email(self, email: str) -> User | None: ...

    async def create(self, user: User, idempotency_key: str) -> User:
        """Insert `user`; a used key returns the user it created (AlreadyExistsError
        when the email is taken, or the key was used for another email)."""
        ...

    async def save(self, user: User) -> None: ...


class PasswordHasher(Protocol):
    async def hash(self, password: str) -> str: ...

    async def verify(self, password_hash: str, password: str) -> bool: ...


class TokenIssuer(Protocol):
    def mint(self, subject: str, scopes: Iterable[str], *, ttl_s: float) -> IssuedToken: ...


@dataclass(frozen=True, slots=True)
class LoggedIn:
    token: IssuedToken
    scopes: tuple[str, ...]
    user: User


def _bad_credentials() -> UnauthenticatedError:
    return UnauthenticatedError(
        "email or password is wrong, or the account is deactivated",
        reason="BAD_CREDENTIALS",
        domain=domain.DOMAIN,
    )


class Users:
    """The identity use cases (what the servicer calls)."""

    def __init__(
        self,
        store: UserStore,
        hasher: PasswordHasher,
        issuer: TokenIssuer,
        *,
        token_ttl_s: float = 3600.0,
        clock: Clock | None = None,
    ) -> None:
        if token_ttl_s <= 0:
            raise ValueError(f"token_ttl_s must be > 0, got {token_ttl_s}")
        self.store = store
        self.hasher = hasher
        self.issuer = issuer
        self.token_ttl_s = token_ttl_s
        self.clock = clock or SystemClock()
        self._decoy_hash: str | None = None

    async def register(
        self, email: str, display_name: str, password: str, idempotency_key: str
    ) -> User:
        normalized = domain.normalize_email(email)
        existing = await self.store.by_email(normalized)
        if existing is not None:
            # a retry of this very registration answers as the first attempt did
            return await self.store.create(existing, idempotency_key)
        user = User(
            user_id=str(uuid.uuid4()),
            email=normalized,
            display_name=display_name.strip(),
            password_hash=await self.hasher.hash(password),
            registered_at=self.clock.now(),
        )
        created = await self.store.create(user, idempotency_key)
        if created.user_id == user.user_id:
            logger.info("user registered user_id=%s", user.user_id)
        return created

    async def log_in(self, email: str, password: str) -> LoggedIn:
        user = await self.store.by_email(domain.normalize_email(email))
        if user is None:
            await self.hasher.verify(await self._decoy(), password)  # same work as a real check
            raise _bad_credentials()
        if not await self.hasher.verify(user.password_hash, password):
            logger.info("log-in refused user_id=%s: wrong password", user.user_id)
            raise _bad_credentials()
        if not domain.can_log_in(user):
            logger.info("log-in refused user_id=%s: deactivated", user.user_id)
            raise _bad_credentials()
        token = self.issuer.mint(user.user_id, CUSTOMER_SCOPES, ttl_s=self.token_ttl_s)
        return LoggedIn(token, CUSTOMER_SCOPES, user)

    async def _decoy(self) -> str:
        if self._decoy_hash is None:
            self._decoy_hash = await self.hasher.hash(uuid.uuid4().hex)
        return self._decoy_hash

    async def get(self, caller: Caller, user_id: str) -> User:
        domain.authorize(caller, user_id, "read")
        return await self._load(user_id)

    async def update_profile(self, caller: Caller, user_id: str, display_name: str) -> User:
        domain.authorize(caller, user_id, "change")
        user = domain.update_profile(await self._load(user_id), display_name)
        await self.store.save(user)
        return user

    async def deactivate(self, caller: Caller, user_id: str, reason: str) -> User:
        domain.authorize(caller, user_id, "deactivate")
        user, changed = domain.deactivate(await self._load(user_id), reason, self.clock.now())
        if changed:
            await self.store.save(user)
            logger.info("user deactivated user_id=%s", user_id)
        return user

    async def _load(self, user_id: str) -> User:
        user = await self.store.get(user_id)
        if user is None:
            raise NotFoundError(
                f"user {user_id} does not exist", reason="USER_NOT_FOUND", domain=domain.DOMAIN
            )
        return user


def email_taken(email: str) -> AlreadyExistsError:
    return AlreadyExistsError(
        f"{email} is already registered; log in instead, or use another email",
        reason="EMAIL_TAKEN",
        domain=domain.DOMAIN,
    )


def key_reused(key: str) -> AlreadyExistsError:
    return AlreadyExistsError(
        f"idempotency key {key} was used to register another email; send a new key",
        reason="IDEMPOTENCY_KEY_REUSED",
        domain=domain.DOMAIN,
    )
