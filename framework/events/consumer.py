"""Consumers: run a handler over a subscription, and apply each event once.

Delivery is at-least-once (a crash before the ack redelivers), so a handler
with side effects must be idempotent.  `IdempotentHandler` makes that easy
when the handler's changes live in a database: in one transaction it records
`(consumer, event_id)` in a `processed_events` table and applies the event;
a redelivered event finds its row and is skipped, and a crash before the
commit leaves neither the row nor the change.

`db` is anything with `transaction()` yielding an object with
`async execute(sql, params) -> rows changed`: the event stores' own
transactions (`SqliteEventStore.transaction()`, `PostgresEventStore.transaction()`)
so the read model, the ledger and the store share one database.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Generic, Literal, Protocol, TypeVar

from framework.events.bus import Subscription
from gen.events.v1.envelope_pb2 import EventEnvelope

logger = logging.getLogger(__name__)

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class Executes(Protocol):
    """The part of a database transaction the ledger needs."""

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int: ...


TxT = TypeVar("TxT", bound=Executes)
TxT_co = TypeVar("TxT_co", bound=Executes, covariant=True)


class Transactional(Protocol[TxT_co]):
    def transaction(self) -> AbstractAsyncContextManager[TxT_co]: ...


class IdempotentHandler(Generic[TxT]):
    """Applies each event id at most once per consumer, atomically with its changes.

    `apply(tx, envelope)` makes the handler's changes through `tx`;
    `await handler(envelope)` returns True if it applied the event, False if the
    event was already processed.  `paramstyle` is "qmark" for SQLite (`?`) and
    "numeric" for PostgreSQL (`$1`).
    """

    def __init__(
        self,
        db: Transactional[TxT],
        consumer: str,
        apply: Callable[[TxT, EventEnvelope], Awaitable[None]],
        *,
        table: str = "processed_events",
        paramstyle: Literal["qmark", "numeric"] = "qmark",
    ) -> None:
        if not consumer:
            raise ValueError("consumer must name the consumer (e.g. the group name)")
        if not _IDENT.match(table):
            raise ValueError(f"table must be a plain SQL identifier, got {table!r}")
        self._db = db
        self._consumer = consumer
        self._apply = apply
        self._table = table
        marks = ("?", "?", "?") if paramstyle == "qmark" else ("$1", "$2", "$3")
        self._claim = (
            f"INSERT INTO {table} (consumer, event_id, position) VALUES ({', '.join(marks)})"
            " ON CONFLICT (consumer, event_id) DO NOTHING"
        )

    async def setup(self) -> None:
        """Create the ledger table if it does not exist."""
        async with self._db.transaction() as tx:
            await tx.execute(
                f"CREATE TABLE IF NOT EXISTS {self._table} (consumer TEXT NOT NULL,"
                " event_id TEXT NOT NULL, position BIGINT NOT NULL,"
                " PRIMARY KEY (consumer, event_id))"
            )

    async def __call__(self, envelope: EventEnvelope) -> bool:
        async with self._db.transaction() as tx:
            claimed = await tx.execute(
                self._claim, (self._consumer, envelope.event_id, envelope.position)
            )
            if claimed == 0:
                logger.debug("%s: event %s already applied", self._consumer, envelope.event_id)
                return False
            await self._apply(tx, envelope)
            return True


async def consume(
    subscription: Subscription,
    handler: Callable[[EventEnvelope], Awaitable[object]],
    *,
    retry_delay_s: float = 1.0,
    max_count: int = 64,
    fetch_timeout_s: float = 1.0,
) -> None:
    """Run `handler` on every delivery: ack on success, nack (retry later) on failure.

    Runs until cancelled.  A failing handler is logged with its traceback and
    its event is redelivered after `retry_delay_s`; the loop goes on with the
    next events.
    """
    while True:
        for delivery in await subscription.fetch(max_count, fetch_timeout_s):
            try:
                await handler(delivery.envelope)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception(
                    "handler failed on event %s (%s, attempt %s); redelivering in %ss",
                    delivery.envelope.event_id,
                    delivery.envelope.type,
                    delivery.attempt,
                    retry_delay_s,
                )
                await delivery.nack(retry_delay_s)
                continue
            await delivery.ack()
