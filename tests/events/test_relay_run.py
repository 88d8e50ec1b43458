"""Outbox relay in the background: catch-up, live appends, retry from the same cursor."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from framework.clock import ManualClock
from framework.errors import UnavailableError
from framework.events.envelope import to_envelope
from framework.events.relay import OutboxRelay, RelayConfig
from framework.events.store import NewEvent
from gen.events.v1.envelope_pb2 import EventEnvelope
from gen.events.v1.testing_pb2 import AccountOpened, AmountDeposited


class FlakyBus:
    """Accepts publishes into a list; refuses the first `failures` of them."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.refused = 0
        self.accepted: list[EventEnvelope] = []

    async def publish(self, envelopes: Sequence[EventEnvelope]) -> None:
        if self.refused < self.failures:
            self.refused += 1
            raise UnavailableError("broker down (test)")
        self.accepted.extend(envelopes)

    async def subscribe(self, group: str, *, event_types: Any = ()) -> Any:
        raise NotImplementedError

    async def close(self) -> None:
        return None


async def _append(store: Any, stream: str, deposits: int) -> None:
    events = [NewEvent.of(AccountOpened(owner=stream))]
    events += [NewEvent.of(AmountDeposited(amount=i)) for i in range(1, deposits + 1)]
    await store.append(stream, events, 0, aggregate_type="Account")


async def _until(predicate: Any) -> None:
    for _ in range(3000):  # bounded: at most ~60 s
        if await predicate():
            return
        await asyncio.sleep(0.02)


async def test_background_relay_retries_and_follows_appends(store: Any) -> None:
    """A failing bus is retried from the same cursor; later appends follow in store order."""
    await _append(store, "a", 2)
    bus = FlakyBus(failures=2)
    relay = OutboxRelay(
        store, bus, RelayConfig(name="bg", batch_size=2, poll_interval_s=0.05, retry_delay_s=0.01)
    )
    await relay.start()
    try:

        async def caught_up() -> bool:
            return await relay.cursor() == await store.head_position()

        await _until(caught_up)
        first = list(bus.accepted)
        await _append(store, "b", 1)
        await _until(caught_up)
    finally:
        await relay.close()
    stored = await store.read_all(0, 100)
    assert bus.refused == 2
    assert len(first) == 3
    assert bus.accepted == [to_envelope(e) for e in stored]
    assert await relay.cursor() == stored[-1].position == 5


async def test_relay_config_is_validated() -> None:
    """A bad relay name or batch size is refused with a message naming the field."""
    with pytest.raises(ValueError, match="name"):
        RelayConfig(name="no spaces")
    with pytest.raises(ValueError, match="batch_size"):
        RelayConfig(batch_size=0)


async def test_failing_relay_reports_lag_to_its_health_check(store: Any) -> None:
    """While the bus refuses everything, lag grows and check() fails; nothing is skipped."""
    await _append(store, "a", 2)
    bus = FlakyBus(failures=10**9)
    relay = OutboxRelay(store, bus, RelayConfig(poll_interval_s=0.05, retry_delay_s=0.01))
    await relay.check(max_lag=0)  # not failing yet: healthy
    await relay.start()
    try:

        async def failing() -> bool:
            return relay.last_error is not None

        await _until(failing)
        with pytest.raises(UnavailableError, match="3 events behind"):
            await relay.check(max_lag=2)
        await relay.check(max_lag=3)  # within the tolerated lag
    finally:
        await relay.close()
    assert await relay.lag() == 3
    assert await relay.cursor() == 0
    assert bus.accepted == []


class BrokenBus(FlakyBus):
    """A bus with a bug: raises something the relay does not expect."""

    async def publish(self, envelopes: Sequence[EventEnvelope]) -> None:
        raise RuntimeError("bug in the bus (test)")


async def test_relay_stopped_by_a_bug_is_reported(store: Any) -> None:
    """An unexpected error stops the relay loudly: last_error is set and check() fails."""
    await _append(store, "a", 1)
    relay = OutboxRelay(store, BrokenBus(0), RelayConfig(poll_interval_s=0.05))
    await relay.start()
    try:

        async def stopped() -> bool:
            return relay.last_error is not None

        await _until(stopped)
    finally:
        await relay.close()
    assert isinstance(relay.last_error, RuntimeError)
    with pytest.raises(UnavailableError, match="bug in the bus"):
        await relay.check(max_lag=0)


async def test_cursor_is_saved_per_interval_and_when_idle(store: Any) -> None:
    """Batches in between only move the in-memory cursor; the interval or run_once saves it."""
    await _append(store, "a", 4)  # positions 1..5
    bus = FlakyBus(failures=0)
    clock = ManualClock()
    relay = OutboxRelay(
        store, bus, RelayConfig(name="i", batch_size=2, checkpoint_interval_s=10.0), clock=clock
    )
    await relay.publish_batch()
    await relay.publish_batch()
    saved_early = await store.load_checkpoint("relay:i")
    clock.advance(10.0)
    await relay.publish_batch()
    saved_late = await store.load_checkpoint("relay:i")
    await _append(store, "b", 0)  # position 6
    await relay.run_once()
    assert (saved_early, saved_late) == (0, 5)
    assert await store.load_checkpoint("relay:i") == await relay.cursor() == 6
    assert [e.position for e in bus.accepted] == [1, 2, 3, 4, 5, 6]
