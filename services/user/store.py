"""Users in the service's own database (SQLite file or PostgreSQL schema).

The email's uniqueness is the database's (a UNIQUE column), so two concurrent
registrations of one email cannot both succeed; an idempotency key is recorded in
the same transaction as the user it created.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from framework.events.envelope import from_micros, to_micros
from framework.system.database import ServiceDatabase
from services.user.application import email_taken, key_reused
from services.user.domain import User

__all__ = ["SCHEMA", "SqlUserStore"]

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS {users} (
        user_id TEXT PRIMARY KEY,
        email TEXT NOT NULL UNIQUE,
        display_name TEXT NOT NULL,
        password_hash TEXT NOT NULL,
        registered_at BIGINT NOT NULL,
        deactivated_at BIGINT,
        deactivation_reason TEXT NOT NULL DEFAULT ''
    )""",
    """CREATE TABLE IF NOT EXISTS {registrations} (
        idempotency_key TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        email TEXT NOT NULL
    )""",
)

_COLUMNS = (
    "user_id, email, display_name, password_hash, registered_at, deactivated_at,"
    " deactivation_reason"
)


def _user(row: Sequence[Any]) -> User:
    return User(
        user_id=row[0],
        email=row[1],
        display_name=row[2],
        password_hash=row[3],
        registered_at=from_micros(int(row[4])),
        deactivated_at=from_micros(int(row[5])) if row[5] is not None else None,
        deactivation_reason=row[6],
    )


def _micros(moment: datetime | None) -> int | None:
    return to_micros(moment) if moment is not None else None


class SqlUserStore:
    """`UserStore` on a `ServiceDatabase`."""

    def __init__(self, db: ServiceDatabase) -> None:
        self.db = db

    async def setup(self) -> None:
        await self.db.script(SCHEMA)

    async def get(self, user_id: str) -> User | None:
        async with self.db.transaction() as tx:
            row = await self.db.fetchone(
                tx, f"SELECT {_COLUMNS} FROM {{users}} WHERE user_id = ?", user_id
            )
        return _user(row) if row else None

    async def by_email(self, email: str) -> User | None:
        async with self.db.transaction() as tx:
            row = await self.db.fetchone(
                tx, f"SELECT {_COLUMNS} FROM {{users}} WHERE email = ?", email
            )
        return _user(row) if row else None

    async def create(self, user: User, idempotency_key: str) -> User:
        db = self.db
        async with db.transaction() as tx:
            known = await self._registered(tx, idempotency_key, user.email)
            if known is not None:
                return known
            inserted = await db.execute(
                tx,
                f"INSERT INTO {{users}} ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (email) DO NOTHING",
                user.user_id,
                user.email,
                user.display_name,
                user.password_hash,
                to_micros(user.registered_at),
                _micros(user.deactivated_at),
                user.deactivation_reason,
            )
            if inserted == 0:
                # a concurrent retry with this key may have committed meanwhile (PostgreSQL)
                known = await self._registered(tx, idempotency_key, user.email)
                if known is not None:
                    return known
                raise email_taken(user.email)
            claimed = await db.execute(
                tx,
                "INSERT INTO {registrations} (idempotency_key, user_id, email) VALUES (?, ?, ?)"
                " ON CONFLICT (idempotency_key) DO NOTHING",
                idempotency_key,
                user.user_id,
                user.email,
            )
            if claimed == 0:  # the key was taken meanwhile by another email: roll back
                raise key_reused(idempotency_key)
        return user

    async def _registered(self, tx: Any, key: str, email: str) -> User | None:
        """The user `key` registered (None if unused); refuses the key used for another email."""
        seen = await self.db.fetchone(
            tx, "SELECT user_id, email FROM {registrations} WHERE idempotency_key = ?", key
        )
        if seen is None:
            return None
        if seen[1] != email:
            raise key_reused(key)
        row = await self.db.fetchone(
            tx, f"SELECT {_COLUMNS} FROM {{users}} WHERE user_id = ?", seen[0]
        )
        return _user(row) if row else None

    async def save(self, user: User) -> None:
        async with self.db.transaction() as tx:
            await self.db.execute(
                tx,
                "UPDATE {users} SET display_name = ?, deactivated_at = ?, deactivation_reason = ?"
                " WHERE user_id = ?",
                user.display_name,
                _micros(user.deactivated_at),
                user.deactivation_reason,
                user.user_id,
            )
