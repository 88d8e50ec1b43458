"""Transactional outbox relay: publishing follows from what was stored.

The events table is the outbox (see README.md): an append commits the events
and nothing else has to happen in the same transaction.  `OutboxRelay` reads
`store.read_all(after=cursor)` and hands each batch to a bus; only once the bus
has acknowledged the whole batch does the cursor move, and it is saved
(`store.save_checkpoint("relay:<name>", last position)`) at least every
`checkpoint_interval_s` while catching up and whenever the relay is idle, so
a crash re-publishes at most that much (de-duplicated by the bus).

* A crash after the append and before the publish loses nothing: the cursor is
  still behind the events, the next run publishes them, exactly as stored.
* A crash after the publish and before the cursor is saved invents nothing: the
  same stored envelopes are published again, and the bus drops them as
  duplicates (JetStream `Nats-Msg-Id` = event id, within its duplicate window);
  consumers de-duplicate on the event id in any case (`IdempotentHandler`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass

from framework.clock import Clock, SystemClock
from framework.errors import FrameworkError, UnavailableError
from framework.events.backoff import Backoff
from framework.events.bus import EventBus, StreamResets
from framework.events.consumer_group import CheckpointedStore
from framework.events.envelope import to_envelope

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """Which cursor the relay keeps and how it reads and retries."""

    name: str = "default"
    batch_size: int = 256
    poll_interval_s: float = 0.5
    retry_delay_s: float = 0.2  # first wait after a failure; doubles (jittered) up to the max
    checkpoint_interval_s: float = 1.0
    max_retry_delay_s: float = 5.0
    # when the bus lost its stream (JetStream restarted without its data), publish
    # everything again from position 0: consumers skip what they processed
    replay_on_stream_loss: bool = True

    def __post_init__(self) -> None:
        if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", self.name):
            raise ValueError(f"name must be 1-64 letters, digits, '_', '.', '-': {self.name!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.checkpoint_interval_s < 0:
            raise ValueError(
                f"checkpoint_interval_s must be >= 0 (0: after every batch), "
                f"got {self.checkpoint_interval_s}"
            )
        for name in ("poll_interval_s", "retry_delay_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_retry_delay_s < self.retry_delay_s:
            raise ValueError(
                f"max_retry_delay_s must be >= retry_delay_s ({self.retry_delay_s}), "
                f"got {self.max_retry_delay_s}"
            )


class OutboxRelay:
    """Publishes every stored event to `bus`, in store order, at least once.

    Use `await relay.run_once()` to publish what is pending now, or
    `await relay.start()` / `await relay.close()` (server hooks) to keep
    publishing in the background; only one relay per `name` should run.
    """

    def __init__(
        self,
        store: CheckpointedStore,
        bus: EventBus,
        config: RelayConfig | None = None,
        *,
        clock: Clock | None = None,
    ) -> None:
        self._store = store
        self._bus = bus
        self._config = config or RelayConfig()
        self._clock = clock or SystemClock()
        self._checkpoint = f"relay:{self._config.name}"
        self._task: asyncio.Task[None] | None = None
        self._cursor: int | None = None  # acknowledged by the bus (this relay is the only writer)
        self._saved: int | None = None  # durable in the store
        self._saved_at = 0.0
        self.last_error: BaseException | None = None  # last failed publish, None once one works
        self._resets = bus if isinstance(bus, StreamResets) else None
        self._resets_seen = 0

    async def cursor(self) -> int:
        """Position of the last event the bus acknowledged."""
        if self._cursor is None:
            self._cursor = self._saved = await self._store.load_checkpoint(self._checkpoint)
            self._saved_at = self._clock.monotonic()
        return self._cursor

    async def save(self) -> None:
        """Make the cursor durable now (run_once and close do it; batches in between)."""
        cursor = await self.cursor()
        if cursor != self._saved:
            await self._store.save_checkpoint(self._checkpoint, cursor)
            self._saved = cursor
        self._saved_at = self._clock.monotonic()

    async def lag(self) -> int:
        """How many positions the bus is behind the store."""
        return max(0, await self._store.head_position() - await self.cursor())

    async def check(self, max_lag: int = 10_000) -> None:
        """Health probe: raise when the relay is failing and `max_lag` events behind.

        Use as `Check("outbox-relay", relay.check, required=False)`.
        """
        lag = await self.lag()
        if self.last_error is not None and lag > max_lag:
            raise UnavailableError(
                f"outbox relay {self._config.name!r} is {lag} events behind and failing: "
                f"{self.last_error}; check the bus"
            )

    async def _replay_if_stream_lost(self) -> None:
        """The bus created its stream since we last looked: what we published is gone."""
        if self._resets is None or (resets := self._resets.stream_resets) == self._resets_seen:
            return
        self._resets_seen = resets
        cursor = await self.cursor()
        if cursor == 0 or not self._config.replay_on_stream_loss:
            return
        logger.warning(
            "relay %s: the bus's stream was created anew (its messages are gone); publishing"
            " every event again from position 0 (the cursor was at %s); consumers skip the"
            " events they processed",
            self._config.name,
            cursor,
        )
        self._cursor = 0
        await self.save()  # durable: a relay restarted mid-replay goes on replaying

    async def publish_batch(self) -> int:
        """Publish the next batch after the cursor; return how many events it held."""
        await self._replay_if_stream_lost()
        events = await self._store.read_all(await self.cursor(), self._config.batch_size)
        if not events:
            return 0
        await self._bus.publish([to_envelope(event) for event in events])
        self._cursor = events[-1].position
        if self._clock.monotonic() - self._saved_at >= self._config.checkpoint_interval_s:
            await self.save()
        return len(events)

    async def run_once(self) -> int:
        """Publish everything stored up to now, save the cursor; return how many were published."""
        total = 0
        while True:
            count = await self.publish_batch()
            total += count
            if count < self._config.batch_size:
                await self.save()
                return total

    async def run(self) -> None:
        """Publish until cancelled: catch up, then follow new appends.

        A failing store or bus (connection lost, server restarting, broker
        down) is retried with backoff from the same cursor, for as long as it
        takes; `last_error` holds the failure meanwhile (see `check`).
        """
        config = self._config
        backoff = Backoff(config.retry_delay_s, config.max_retry_delay_s)
        while True:
            try:
                published = await self.run_once()
                self.last_error = None
                backoff.reset()
                if published == 0:
                    cursor = await self.cursor()
                    await self._store.wait_for_events(cursor, config.poll_interval_s)
            except (FrameworkError, OSError) as error:
                self.last_error = error
                delay = backoff.next_delay()
                logger.warning(
                    "relay %s: %s (failure %s); retrying in %.2fs from the same cursor",
                    config.name,
                    error,
                    backoff.attempt,
                    delay,
                )
                await asyncio.sleep(delay)

    async def start(self, *_: object) -> None:
        """Run in the background (also usable as a server `on_started` hook)."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=f"outbox-relay-{self._config.name}")
            self._task.add_done_callback(self._stopped)

    def _stopped(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (error := task.exception()) is not None:
            self.last_error = error
            logger.error(
                "relay %s stopped on an unexpected error; events stay unpublished",
                self._config.name,
                exc_info=error,
            )

    async def close(self, *_: object) -> None:
        """Stop the background run; the cursor stays at the last acknowledged batch."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            try:
                await self.save()
            except (FrameworkError, OSError) as error:
                logger.warning(
                    "relay %s: cursor not saved on close (%s); its last events will be "
                    "published again (de-duplicated)",
                    self._config.name,
                    error,
                )

    on_started = start
    on_stopped = close
