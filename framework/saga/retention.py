"""Bounded retention of a participant's barrier rows: prune finished sagas periodically.

    pruner = BarrierPruner(barrier.prune_finished, BarrierRetention(horizon_s=7 * 86400))
    pruner.start()              # a background task; `await pruner.stop()` at shutdown
                                # (or pass it as a server hook: started and stopped with it)
    await pruner.prune_once()   # or an explicit call (operators, tests)

Each round deletes, in batches of `batch` sagas, the rows of sagas whose newest
row is older than `now - horizon_s`.  **The horizon must exceed the longest
time a saga can still call this participant after its first call here**: the
orchestrator's saga deadline plus its compensation retry budget, plus the time
an operator may take to retry a saga left needing attention.  A saga still in
flight within the horizon keeps every row (the guarantees against late
duplicates and compensation-before-action hold); a call arriving after its
saga was pruned is not recognised (a duplicate action would run again, a
compensation would be taken for a null one).  A failing round (database down)
is logged and retried with backoff until stopped.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

from framework.clock import Clock, SystemClock
from framework.errors import UnavailableError
from framework.events.backoff import Backoff
from framework.saga.barrier import micros

__all__ = ["BarrierPruner", "BarrierRetention"]

logger = logging.getLogger(__name__)

Prune = Callable[[int, int], Awaitable[int]]
"""`prune_finished(cutoff_us, limit) -> rows deleted` of a barrier."""


@dataclass(frozen=True, slots=True)
class BarrierRetention:
    """Keep a saga's rows `horizon_s` after its newest one; prune every `interval_s`."""

    horizon_s: float = 7 * 86400.0
    interval_s: float = 3600.0
    batch: int = 1000

    def __post_init__(self) -> None:
        if self.horizon_s <= 0:
            raise ValueError(f"horizon_s must be > 0, got {self.horizon_s}")
        if self.interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {self.interval_s}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")


class BarrierPruner:
    """Runs `prune` for sagas finished longer than the horizon ago, periodically or on call."""

    def __init__(
        self, prune: Prune, retention: BarrierRetention, *, clock: Clock | None = None
    ) -> None:
        self.prune = prune
        self.retention = retention
        self.clock = clock or SystemClock()
        self.pruned = 0  # rows deleted since start
        self._task: asyncio.Task[None] | None = None

    async def prune_once(self) -> int:
        """One round: delete in batches until a batch finds nothing; rows deleted."""
        cutoff = micros(self.clock.now() - timedelta(seconds=self.retention.horizon_s))
        total = 0
        while True:
            deleted = await self.prune(cutoff, self.retention.batch)
            total += deleted
            if deleted == 0:
                break
        self.pruned += total
        if total:
            logger.info("barrier pruned rows=%s horizon_s=%s", total, self.retention.horizon_s)
        return total

    def start(self) -> None:
        """Start the periodic rounds (the first one at once)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="barrier-pruner")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # stop() itself was cancelled: pass it on

    async def on_started(self, server: object) -> None:
        """Server hook: prune while the server runs."""
        self.start()

    async def on_stopped(self, server: object) -> None:
        """Server hook: stop pruning (before the database closes: list it first)."""
        await self.stop()

    async def _run(self) -> None:
        backoff = Backoff(1.0, self.retention.interval_s)
        while True:
            try:
                await self.prune_once()
            except (UnavailableError, OSError, sqlite3.Error) as error:
                delay = backoff.next_delay()
                logger.warning("barrier pruning failed (%s); retrying in %.1fs", error, delay)
                await self.clock.sleep(delay)
                continue
            backoff.reset()
            await self.clock.sleep(self.retention.interval_s)
