"""Consumers: run a handler over a subscription, and apply each event once.

Delivery is at-least-once (a crash before the ack redelivers), so a handler
with side effects must be idempotent.  `IdempotentHandler` makes that easy
when the handler's changes live in a database: in one transaction it records
`(consumer, event_id)` in a `processed_events` table and applies the event;
a redelivered event finds its row and is skipped, and a crash before the
commit leaves neither the row nor the change.

`db` is anything with `transaction()`: the event stores' own transactions
(`SqliteEventStore.transaction()`, `PostgresEventStore.transaction()`), so the
read model, the ledger and the store can share one database.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Generic, Literal, Protocol, TypeVar

from opentelemetry.trace import TracerProvider

from framework.errors import UnavailableError
from framework.events.backoff import Backoff
from framework.events.bus import Subscription
from framework.telemetry.tracing import continue_trace
from gen.events.v1.envelope_pb2 import EventEnvelope

logger = logging.getLogger(__name__)

_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$")

TxT = TypeVar("TxT")
TxT_co = TypeVar("TxT_co", covariant=True)


class Transactional(Protocol[TxT_co]):
    """A database that opens transactions (`store.transaction()`)."""

    def transaction(self) -> AbstractAsyncContextManager[TxT_co]: ...


class IdempotentHandler(Generic[TxT]):
    """Applies each event id at most once per consumer, atomically with its changes.

    `apply(tx, envelope)` makes the handler's changes through `tx`;
    `await handler(envelope)` returns True if it applied the event, False if the
    event was already processed.  `paramstyle="qmark"` is for SQLite
    transactions (`SqliteTransaction.execute(sql, params) -> rows changed`),
    `"asyncpg"` for PostgreSQL (an asyncpg connection, `$1` placeholders).
    `table` may be schema-qualified (`schema.processed_events`).  Do not append
    to the same SQLite store from inside `apply` (its transaction holds the store).
    """

    def __init__(
        self,
        db: Transactional[TxT],
        consumer: str,
        apply: Callable[[TxT, EventEnvelope], Awaitable[None]],
        *,
        table: str = "processed_events",
        paramstyle: Literal["qmark", "asyncpg"] = "qmark",
    ) -> None:
        if not consumer:
            raise ValueError("consumer must name the consumer (e.g. the group name)")
        if not _TABLE.match(table):
            raise ValueError(f"table must be a plain SQL identifier (or schema.name): {table!r}")
        self._db = db
        self._consumer = consumer
        self._apply = apply
        self._table = table
        self._asyncpg = paramstyle == "asyncpg"
        # One statement claims the event: no row yet for its id, and its position
        # above the consumer's pruned floor (the row with event_id '', see prune()).
        if self._asyncpg:
            floor = f"(SELECT position FROM {table} WHERE consumer = $1 AND event_id = '')"
            self._claim = (
                f"INSERT INTO {table} (consumer, event_id, position)"
                f" SELECT $1::TEXT, $2::TEXT, $3::BIGINT WHERE $3 > COALESCE({floor}, 0)"
                " ON CONFLICT (consumer, event_id) DO NOTHING"
            )
        else:
            floor = f"(SELECT position FROM {table} WHERE consumer = ?1 AND event_id = '')"
            self._claim = (
                f"INSERT INTO {table} (consumer, event_id, position)"
                f" SELECT ?1, ?2, ?3 WHERE ?3 > COALESCE({floor}, 0)"
                " ON CONFLICT (consumer, event_id) DO NOTHING"
            )

    async def _execute(self, tx: TxT, sql: str, params: Sequence[object] = ()) -> int:
        """Run one statement; the number of rows it changed."""
        conn: Any = tx
        if self._asyncpg:
            status: str = await conn.execute(sql, *params)
            last = status.rsplit(" ", 1)[-1]
            return int(last) if last.isdigit() else 0
        return int(await conn.execute(sql, params))

    async def setup(self) -> None:
        """Create the ledger table if it does not exist."""
        async with self._db.transaction() as tx:
            await self._execute(
                tx,
                f"CREATE TABLE IF NOT EXISTS {self._table} (consumer TEXT NOT NULL,"
                " event_id TEXT NOT NULL, position BIGINT NOT NULL,"
                " PRIMARY KEY (consumer, event_id))",
            )

    async def prune(self, through_position: int) -> int:
        """Forget this consumer's ledger rows at or below `through_position`; rows removed.

        The ledger grows by a row per event.  Pruning keeps one row instead: a
        floor, and from then on every event at or below it counts as applied
        (skipped), so a redelivery of an old event still is not applied twice.
        Pass a position this consumer has handled everything up to, e.g. a
        `StoreBus` group's `bus.position(group)`, or what the relay had
        published before the group last had nothing pending.  The floor never
        moves down.
        """
        if through_position < 0:
            raise ValueError(f"through_position must be >= 0, got {through_position}")
        table = self._table
        if self._asyncpg:
            delete = (
                f"DELETE FROM {table} WHERE consumer = $1 AND event_id <> '' AND position <= $2"
            )
            mark = (
                f"INSERT INTO {table} AS t (consumer, event_id, position) VALUES ($1, '', $2)"
                " ON CONFLICT (consumer, event_id) DO UPDATE SET position = excluded.position"
                " WHERE t.position < excluded.position"
            )
        else:
            delete = f"DELETE FROM {table} WHERE consumer = ? AND event_id <> '' AND position <= ?"
            mark = (
                f"INSERT INTO {table} AS t (consumer, event_id, position) VALUES (?, '', ?)"
                " ON CONFLICT (consumer, event_id) DO UPDATE SET position = excluded.position"
                " WHERE t.position < excluded.position"
            )
        params = (self._consumer, through_position)
        async with self._db.transaction() as tx:
            removed = await self._execute(tx, delete, params)
            await self._execute(tx, mark, params)
        logger.info(
            "%s: pruned %s processed-event rows through position %s",
            self._consumer,
            removed,
            through_position,
        )
        return removed

    async def __call__(self, envelope: EventEnvelope) -> bool:
        async with self._db.transaction() as tx:
            params = (self._consumer, envelope.event_id, envelope.position)
            if await self._execute(tx, self._claim, params) == 0:
                logger.debug("%s: event %s already applied", self._consumer, envelope.event_id)
                return False
            await self._apply(tx, envelope)
            return True


DeadLetter = Callable[[EventEnvelope, Exception], Awaitable[None]]


async def consume(
    subscription: Subscription,
    handler: Callable[[EventEnvelope], Awaitable[object]],
    *,
    retry_delay_s: float = 1.0,
    max_attempts: int = 0,
    dead_letter: DeadLetter | None = None,
    max_count: int = 64,
    fetch_timeout_s: float = 1.0,
    trace: bool = True,
    tracer_provider: TracerProvider | None = None,
    reconnect_delay_s: float = 0.1,
    max_reconnect_delay_s: float = 5.0,
) -> None:
    """Run `handler` on every delivery: ack on success, nack (retry later) on failure.

    Runs until cancelled.  A failing handler is logged with its traceback and
    its event is redelivered after `retry_delay_s`; the loop goes on with the
    next events.  With `max_attempts` > 0, an event that fails that many times
    is handed to `dead_letter(envelope, error)` (logged if None) and acked, so a
    poison event cannot hold its group back forever.  With `trace`, each
    handling runs in a CONSUMER span continuing the trace the event was
    recorded in (`framework.telemetry.tracing.continue_trace` on the envelope metadata).

    A failing bus does not end the loop: a `fetch` that fails with
    `UnavailableError` (broker or store unreachable, connection lost) is
    retried after `reconnect_delay_s`, doubling (jittered) up to
    `max_reconnect_delay_s`; an `ack`/`nack` that cannot reach the bus is
    logged, and the event comes again (the handler is idempotent).
    """
    if max_attempts < 0:
        raise ValueError(f"max_attempts must be >= 0 (0: retry forever), got {max_attempts}")
    backoff = Backoff(reconnect_delay_s, max_reconnect_delay_s)
    while True:
        try:
            deliveries = await subscription.fetch(max_count, fetch_timeout_s)
            backoff.reset()
        except (UnavailableError, OSError) as error:
            delay = backoff.next_delay()
            logger.warning("consumer: fetch failed (%s); retrying in %.2fs", error, delay)
            await asyncio.sleep(delay)
            continue
        for delivery in deliveries:
            envelope = delivery.envelope
            try:
                if trace:
                    with continue_trace(
                        envelope.metadata,
                        f"process {envelope.type}",
                        tracer_provider=tracer_provider,
                        attributes={
                            "messaging.message.id": envelope.event_id,
                            "event.stream_id": envelope.stream_id,
                            "event.position": envelope.position,
                            "event.attempt": delivery.attempt,
                        },
                    ):
                        await handler(envelope)
                else:
                    await handler(envelope)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if max_attempts and delivery.attempt >= max_attempts:
                    logger.exception(
                        "handler failed on event %s (%s) %s times; dead-lettering it",
                        envelope.event_id,
                        envelope.type,
                        delivery.attempt,
                    )
                    if dead_letter is not None:
                        await dead_letter(envelope, error)
                    await _settle(delivery.ack(), "ack", envelope)
                    continue
                logger.exception(
                    "handler failed on event %s (%s, attempt %s); redelivering in %ss",
                    envelope.event_id,
                    envelope.type,
                    delivery.attempt,
                    retry_delay_s,
                )
                await _settle(delivery.nack(retry_delay_s), "nack", envelope)
                continue
            await _settle(delivery.ack(), "ack", envelope)


async def _settle(answer: Awaitable[None], what: str, envelope: EventEnvelope) -> None:
    """Send an ack/nack; if the bus cannot take it, the event simply comes again."""
    try:
        await answer
    except (UnavailableError, OSError) as error:
        logger.warning(
            "consumer: %s of event %s failed (%s); it will be delivered again",
            what,
            envelope.event_id,
            error,
        )
