"""BarrierPruner's loop on a ManualClock: cutoff, batches, retry after a failing round, stop."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from framework.clock import ManualClock
from framework.errors import UnavailableError
from framework.saga.barrier import micros
from framework.saga.retention import BarrierPruner, BarrierRetention

T0 = datetime(2026, 3, 1, tzinfo=UTC)


class Rows:
    """A stand-in barrier table: `pending` rows to delete, failing the first `fail` rounds."""

    def __init__(self, pending: int, fail: int = 0) -> None:
        self.pending = pending
        self.fail = fail
        self.calls: list[tuple[int, int]] = []

    async def prune(self, cutoff_us: int, limit: int) -> int:
        self.calls.append((cutoff_us, limit))
        if self.fail:
            self.fail -= 1
            raise UnavailableError("database down")
        deleted = min(self.pending, limit)
        self.pending -= deleted
        return deleted


async def _until(check: object, tries: int = 6000) -> None:
    for _ in range(tries):
        if callable(check) and check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met")


async def test_a_round_prunes_in_batches_up_to_the_horizon() -> None:
    """prune_once asks for rows older than now - horizon, batch by batch until none is left."""
    clock = ManualClock(T0)
    rows = Rows(pending=25)
    pruner = BarrierPruner(rows.prune, BarrierRetention(horizon_s=3600, batch=10), clock=clock)
    assert await pruner.prune_once() == 25
    cutoff = micros(T0 - timedelta(hours=1))
    assert rows.calls == [(cutoff, 10)] * 4  # 10, 10, 5, then 0
    assert pruner.pruned == 25


async def test_a_failing_round_is_retried_and_the_loop_stops_cleanly() -> None:
    """The periodic loop survives a database outage (retried after a backoff) and stops."""
    clock = ManualClock(T0)
    rows = Rows(pending=3, fail=1)
    pruner = BarrierPruner(rows.prune, BarrierRetention(horizon_s=60, interval_s=600), clock=clock)
    pruner.start()
    try:
        await _until(lambda: len(rows.calls) == 1)  # the first round failed
        clock.advance(1.0)  # the backoff's first delay is at most 1 s
        await _until(lambda: pruner.pruned == 3)
        clock.advance(600)  # the next round: nothing left
        await _until(lambda: len(rows.calls) == 4)
    finally:
        await pruner.stop()
    assert pruner._task is None


def test_retention_is_validated() -> None:
    """A horizon, interval or batch that cannot work is refused with the field's name."""
    for bad, field in (({"horizon_s": 0}, "horizon_s"), ({"interval_s": -1}, "interval_s")):
        with pytest.raises(ValueError, match=field):
            BarrierRetention(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch"):
        BarrierRetention(batch=0)
