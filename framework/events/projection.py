"""Projections (the CQRS read side): feed stored events to a read model from a checkpoint.

The runner reads `read_all(after=checkpoint)` in batches and, for each batch,
opens one transaction on the store's own database in which the projection
updates its read model *and* the checkpoint moves, so a crash leaves both
before or both after the batch.  Events at or below the checkpoint are
skipped (re-read inside the transaction), which makes a replay idempotent.
`catch_up()` runs to the head, `run(stop)` then follows live appends (woken
at once by appends through the same store, otherwise by bounded polling), and
`rebuild()` resets the read model and replays from position 0.

A projection is written for one backend's transaction type: the SQLite store
hands it a `SqliteTransaction`, the PostgreSQL store an asyncpg connection.

Tracing: each `apply` runs inside a CONSUMER span continuing the trace recorded
in the event's metadata (`framework.telemetry.tracing.continue_trace`, named
`project <type>`, attributes `projection.name`, `event.position`,
`event.stream_id`).  Live events (`run()` after the catch-up, `step()`) are
handled as *children* of the span that recorded them: the read model moving is
part of the request that caused it, and one trace then shows the RPC and its
read-side effect.  Catch-up and rebuild use `link_only=True`: they replay
history long after the requests, where joining each old trace would stretch it
over hours (or hang a rebuild's thousands of spans on requests long finished),
so each span starts its own trace and only *links* to the producer.
`trace=False` skips the spans (a large offline rebuild without telemetry).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar, cast

from framework.errors import UnavailableError
from framework.events.backoff import Backoff
from framework.events.store import RecordedEvent

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

logger = logging.getLogger(__name__)

TxT = TypeVar("TxT")
TxC = TypeVar("TxC", contravariant=True)


class Projection(Protocol[TxC]):
    """A read model fed by events; `name` keys its checkpoint."""

    @property
    def name(self) -> str: ...

    async def apply(self, tx: TxC, event: RecordedEvent) -> None:
        """Update the read model for one event, inside the runner's transaction."""
        ...

    async def reset(self, tx: TxC) -> None:
        """Empty the read model (for a rebuild), inside the runner's transaction."""
        ...


class BatchProjection(Projection[TxC], Protocol[TxC]):
    """A projection that can also apply a page of events at once (catch-up, rebuild).

    `apply_batch(tx, events)` must leave the read model as `apply` called on
    each event in order would; it may use `executemany` (SQLite) or one
    statement over arrays (PostgreSQL) instead of a statement per event.
    Live events still go through `apply`, one at a time.
    """

    async def apply_batch(self, tx: TxC, events: Sequence[RecordedEvent]) -> None:
        """Update the read model for `events` (position order), in the runner's transaction."""
        ...


class ProjectionHost(Protocol[TxT]):
    """What a store offers projections sharing its database (both backends implement it)."""

    def transaction(self) -> AbstractAsyncContextManager[TxT]: ...

    async def checkpoint_in(self, tx: TxT, name: str) -> int: ...

    async def set_checkpoint_in(self, tx: TxT, name: str, position: int) -> None: ...

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]: ...

    async def head_position(self) -> int: ...

    async def wait_for_events(self, after_position: int, timeout_s: float) -> bool: ...


@dataclass(frozen=True, slots=True)
class ProjectionConfig:
    """`batch_size` events per transaction; live mode polls at least every `idle_wait_s`."""

    batch_size: int = 500
    idle_wait_s: float = 0.5
    # `run()` retries a failing store after retry_delay_s, doubling (jittered) up to the max
    retry_delay_s: float = 0.1
    max_retry_delay_s: float = 5.0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("idle_wait_s", "retry_delay_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_retry_delay_s < self.retry_delay_s:
            raise ValueError(
                f"max_retry_delay_s must be >= retry_delay_s ({self.retry_delay_s}), "
                f"got {self.max_retry_delay_s}"
            )


class ProjectionRunner(Generic[TxT]):
    """Feeds one projection from its checkpoint; see the module docstring."""

    def __init__(
        self,
        host: ProjectionHost[TxT],
        projection: Projection[TxT],
        config: ProjectionConfig | None = None,
        *,
        trace: bool = True,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.host = host
        self.projection = projection
        self.config = config or ProjectionConfig()
        self.position = 0
        self.trace = trace
        self.tracer_provider = tracer_provider
        # set once `run()` has caught up and follows live appends
        self.live = asyncio.Event()
        self.last_error: BaseException | None = None  # while `run()` is retrying a failure
        apply_batch = getattr(projection, "apply_batch", None)
        self._batch: BatchProjection[TxT] | None = (
            cast("BatchProjection[TxT]", projection) if callable(apply_batch) else None
        )

    async def step(self, *, link_only: bool = False) -> int:
        """Apply the next batch after the checkpoint in one transaction; events applied.

        Each event's span is a child of its producer's, or with `link_only`
        (catch-up, rebuild) a new trace linking to it; see the module docstring.
        """
        events = await self.host.read_all(self.position, self.config.batch_size)
        if not events:
            return 0
        return await self._apply_page(events, link_only)

    async def _apply_page(self, events: Sequence[RecordedEvent], link_only: bool) -> int:
        """One transaction: the events past the checkpoint, then the checkpoint itself.

        Catch-up and rebuild (`link_only`) hand a `BatchProjection` the whole
        page at once; live steps apply event by event.
        """
        name = self.projection.name
        async with self.host.transaction() as tx:
            checkpoint = await self.host.checkpoint_in(tx, name)
            if events[0].position > checkpoint:
                todo = events
            else:
                todo = [e for e in events if e.position > checkpoint]
            if link_only and self._batch is not None and todo:
                await self._apply_batch(tx, todo)
            else:
                for event in todo:
                    await self._apply(tx, event, link_only)
            last = max(checkpoint, events[-1].position)
            await self.host.set_checkpoint_in(tx, name, last)
        self.position = last
        return len(todo)

    async def _apply_batch(self, tx: TxT, events: Sequence[RecordedEvent]) -> None:
        assert self._batch is not None
        if not self.trace:
            await self._batch.apply_batch(tx, events)
            return
        from framework.telemetry.tracing import continue_trace

        with continue_trace(
            events[0].metadata,  # one span per page, linked to its first event's producer
            f"project batch {self.projection.name}",
            tracer_provider=self.tracer_provider,
            link_only=True,
            attributes={
                "projection.name": self.projection.name,
                "projection.batch_size": len(events),
                "event.position": events[0].position,
                "event.last_position": events[-1].position,
            },
        ):
            await self._batch.apply_batch(tx, events)

    async def _apply(self, tx: TxT, event: RecordedEvent, link_only: bool) -> None:
        if not self.trace:
            await self.projection.apply(tx, event)
            return
        # Imported here so `import framework.events` does not load the tracing SDK.
        from framework.telemetry.tracing import continue_trace

        with continue_trace(
            event.metadata,
            f"project {event.type}",
            tracer_provider=self.tracer_provider,
            link_only=link_only,
            attributes={
                "projection.name": self.projection.name,
                "event.position": event.position,
                "event.stream_id": event.stream_id,
                "messaging.message.id": event.event_id,
            },
        ):
            await self.projection.apply(tx, event)

    async def load_position(self) -> int:
        """Refresh the in-memory position from the stored checkpoint."""
        async with self.host.transaction() as tx:
            self.position = await self.host.checkpoint_in(tx, self.projection.name)
        return self.position

    async def catch_up(self) -> int:
        """Apply everything up to the head as it was when called; events applied.

        Pages of `batch_size` events, one transaction each (checkpoint with it),
        whole pages to a `BatchProjection`; the next page is read while the
        current one is applied.
        """
        await self.load_position()
        head = await self.host.head_position()
        size = self.config.batch_size
        page = await self.host.read_all(self.position, size) if self.position < head else []
        total = 0
        while page:
            ahead: asyncio.Future[list[RecordedEvent]] | None = None
            if page[-1].position < head:
                ahead = asyncio.ensure_future(self.host.read_all(page[-1].position, size))
            try:
                total += await self._apply_page(page, link_only=True)
            except BaseException:
                if ahead is not None:
                    ahead.cancel()
                    await asyncio.gather(ahead, return_exceptions=True)
                raise
            page = await ahead if ahead is not None else []
        return total

    async def run(self, stop: asyncio.Event) -> None:
        """Catch up (spans linked only), then follow new events (child spans) until `stop`.

        A failing store (`UnavailableError`: connection lost, database
        restarting) is retried with backoff until `stop`; the batch that failed
        did not commit, and the next one starts from the stored checkpoint, so
        nothing is skipped or applied twice.  `last_error` holds the failure
        meanwhile.  Anything else (a bug in the projection) ends the run.
        """
        config = self.config
        backoff = Backoff(config.retry_delay_s, config.max_retry_delay_s)
        caught_up = False
        while not stop.is_set():
            try:
                if not caught_up:
                    await self.catch_up()
                    caught_up = True
                    self.live.set()
                elif await self.host.wait_for_events(self.position, config.idle_wait_s):
                    await self.step()
                self.last_error = None
                backoff.reset()
            except (UnavailableError, OSError) as error:
                self.last_error = error
                delay = backoff.next_delay()
                logger.warning(
                    "projection %s: %s; retrying in %.2fs from its checkpoint",
                    self.projection.name,
                    error,
                    delay,
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await stop.wait()

    async def rebuild(self) -> int:
        """Reset the read model and its checkpoint together, then replay from zero."""
        async with self.host.transaction() as tx:
            await self.projection.reset(tx)
            await self.host.set_checkpoint_in(tx, self.projection.name, 0)
        self.position = 0
        logger.info("projection %s reset; replaying from position 0", self.projection.name)
        return await self.catch_up()
