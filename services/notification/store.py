"""Notifications in the service's own database (SQLite file or PostgreSQL schema).

`record` inserts with the source key unique, so a repeated request or redelivered
event records nothing twice; it works inside a caller's transaction too (the event
consumer records the notification and marks the event processed in one commit).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from framework.events.envelope import from_micros, to_micros
from framework.system.database import ServiceDatabase
from services.notification.domain import Channel, Draft, Notification, PageToken

__all__ = ["SCHEMA", "SqlNotificationStore"]

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS {notifications} (
        notification_id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        channel INTEGER NOT NULL,
        subject TEXT NOT NULL,
        body TEXT NOT NULL,
        sent_at BIGINT NOT NULL,
        source_key TEXT NOT NULL UNIQUE
    )""",
    "CREATE INDEX IF NOT EXISTS notifications_by_user"
    " ON {notifications} (user_id, sent_at, notification_id)",
    """CREATE TABLE IF NOT EXISTS {order_owners} (
        order_id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL
    )""",
)

_COLUMNS = "notification_id, user_id, channel, subject, body, sent_at, source_key"


def _notification(row: Sequence[Any]) -> Notification:
    return Notification(
        notification_id=row[0],
        user_id=row[1],
        channel=Channel(int(row[2])),
        subject=row[3],
        body=row[4],
        sent_at=from_micros(int(row[5])),
        source_key=row[6],
    )


class SqlNotificationStore:
    def __init__(self, db: ServiceDatabase) -> None:
        self.db = db

    async def setup(self) -> None:
        await self.db.script(SCHEMA)

    async def record_in(
        self, tx: Any, draft: Draft, source_key: str, sent_at_micros: int
    ) -> Notification:
        """Record `draft` once per `source_key`; a repeat returns the first notification."""
        notification_id = str(uuid.uuid4())
        await self.db.execute(
            tx,
            f"INSERT INTO {{notifications}} ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (source_key) DO NOTHING",
            notification_id,
            draft.user_id,
            int(draft.channel),
            draft.subject,
            draft.body,
            sent_at_micros,
            source_key,
        )
        row = await self.db.fetchone(
            tx, f"SELECT {_COLUMNS} FROM {{notifications}} WHERE source_key = ?", source_key
        )
        assert row is not None, "the row was inserted or already there"
        return _notification(row)

    async def record(self, draft: Draft, source_key: str, sent_at_micros: int) -> Notification:
        async with self.db.transaction() as tx:
            return await self.record_in(tx, draft, source_key, sent_at_micros)

    async def remember_owner_in(self, tx: Any, order_id: str, user_id: str) -> None:
        await self.db.execute(
            tx,
            "INSERT INTO {order_owners} (order_id, user_id) VALUES (?, ?)"
            " ON CONFLICT (order_id) DO NOTHING",
            order_id,
            user_id,
        )

    async def owner_in(self, tx: Any, order_id: str) -> str | None:
        row = await self.db.fetchone(
            tx, "SELECT user_id FROM {order_owners} WHERE order_id = ?", order_id
        )
        return str(row[0]) if row else None

    async def page(
        self, user_id: str, size: int, after: PageToken | None
    ) -> tuple[list[Notification], PageToken | None]:
        """Newest first, `size` at most, strictly after `after`; and the next page's token."""
        query = f"SELECT {_COLUMNS} FROM {{notifications}} WHERE user_id = ?"
        params: list[object] = [user_id]
        if after is not None:
            query += " AND (sent_at < ? OR (sent_at = ? AND notification_id < ?))"
            params += [after.sent_at_micros, after.sent_at_micros, after.notification_id]
        query += " ORDER BY sent_at DESC, notification_id DESC LIMIT ?"
        params.append(size + 1)
        async with self.db.transaction() as tx:
            rows = await self.db.fetchall(tx, query, *params)
        found = [_notification(r) for r in rows[:size]]
        more = len(rows) > size
        last = found[-1] if found else None
        token = PageToken(to_micros(last.sent_at), last.notification_id) if more and last else None
        return found, token
