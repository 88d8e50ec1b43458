"""NATS JetStream adapter of the event bus, against the real server on 127.0.0.1:4222."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from framework.errors import FailedPreconditionError, UnavailableError
from framework.events.bus import Delivery, Subscription
from framework.events.nats import JetStreamBus, JetStreamConfig
from gen.events.v1.envelope_pb2 import EventEnvelope
from gen.events.v1.testing_pb2 import AccountOpened, AmountDeposited

pytestmark = pytest.mark.nats


def _envelopes(count: int, stream_id: str = "acc-1") -> list[EventEnvelope]:
    out = []
    for i in range(1, count + 1):
        message = AccountOpened(owner="ann") if i == 1 else AmountDeposited(amount=i)
        out.append(
            EventEnvelope(
                event_id=str(uuid.uuid4()),
                type=message.DESCRIPTOR.full_name,
                aggregate_type="Account",
                stream_id=stream_id,
                version=i,
                position=i,
                payload=message.SerializeToString(),
            )
        )
    return out


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[JetStreamBus]:
    """A bus on a stream and subject prefix owned by this test, deleted afterwards."""
    tag = uuid.uuid4().hex[:12]
    config = JetStreamConfig(
        stream=f"T_{tag}", subject_prefix=f"t{tag}", ack_wait_s=1.0, memory_storage=True
    )
    bus = await JetStreamBus.connect(nats_url, config)
    try:
        yield bus
    finally:
        await bus.delete_stream()
        await bus.close()


async def _drain(sub: Subscription, want: int, sink: list[Delivery]) -> None:
    """Fetch and ack until `want` deliveries landed in `sink` (shared), bounded."""
    for _ in range(200):
        if len(sink) >= want:
            return
        for delivery in await sub.fetch(max_count=4, timeout_s=0.2):
            sink.append(delivery)
            await delivery.ack()


async def test_each_group_gets_every_event(bus: JetStreamBus) -> None:
    """Two consumer groups each receive all published events, in stored order."""
    events = _envelopes(10)
    await bus.publish(events)
    a = await bus.subscribe("billing")
    b = await bus.subscribe("shipping")
    got_a: list[Delivery] = []
    got_b: list[Delivery] = []
    await asyncio.gather(_drain(a, 10, got_a), _drain(b, 10, got_b))
    await a.close()
    await b.close()
    ids = [e.event_id for e in events]
    assert [d.envelope.event_id for d in got_a] == ids
    assert [d.envelope.event_id for d in got_b] == ids
    assert got_a[3].envelope == events[3]


async def test_members_of_one_group_share_events(bus: JetStreamBus, nats_url: str) -> None:
    """Two members of one group (own connections) each get some events; together all, once."""
    events = _envelopes(40)
    other = await JetStreamBus.connect(nats_url, bus.config)  # as another process would
    m1 = await bus.subscribe("workers")
    m2 = await other.subscribe("workers")
    await bus.publish(events)
    got: list[Delivery] = []
    got1: list[str] = []
    got2: list[str] = []

    async def member(sub: Subscription, mine: list[str]) -> None:
        for _ in range(200):
            if len(got) >= 40:
                return
            for delivery in await sub.fetch(max_count=2, timeout_s=0.2):
                mine.append(delivery.envelope.event_id)
                got.append(delivery)
                await delivery.ack()
            await asyncio.sleep(0)  # let the other member fetch too

    await asyncio.gather(member(m1, got1), member(m2, got2))
    await m1.close()
    await m2.close()
    await other.close()
    assert got1 and got2
    assert set(got1) | set(got2) == {e.event_id for e in events}
    assert len(got1) + len(got2) == 40


async def test_republish_is_deduplicated(bus: JetStreamBus) -> None:
    """Publishing the same events again (a relay after a crash) stores them once."""
    events = _envelopes(5)
    await bus.publish(events[:3])
    await bus.publish(events)
    sub = await bus.subscribe("audit")
    got: list[Delivery] = []
    await _drain(sub, 5, got)
    extra = await sub.fetch(timeout_s=0.3)
    await sub.close()
    assert [d.envelope.event_id for d in got] == [e.event_id for e in events]
    assert extra == []


async def test_nack_redelivers(bus: JetStreamBus) -> None:
    """A nacked delivery comes back with a higher attempt number."""
    await bus.publish(_envelopes(1))
    sub = await bus.subscribe("retry")
    first = (await sub.fetch(timeout_s=2.0))[0]
    await first.nack()
    again: list[Delivery] = []
    for _ in range(50):
        again = await sub.fetch(timeout_s=0.2)
        if again:
            break
    await again[0].ack()
    await sub.close()
    assert again[0].envelope.event_id == first.envelope.event_id
    assert (first.attempt, again[0].attempt) == (1, 2)


async def test_unacked_is_redelivered_after_ack_wait(bus: JetStreamBus) -> None:
    """A member that never acks (crashed) loses the event to redelivery after ack_wait."""
    await bus.publish(_envelopes(1))
    stuck = await bus.subscribe("g")  # takes the event and never answers
    taken = await stuck.fetch(timeout_s=2.0)
    other = await bus.subscribe("g")
    again: list[Delivery] = []
    for _ in range(40):
        again = await other.fetch(timeout_s=0.2)
        if again:
            break
    await again[0].ack()
    await other.close()
    await stuck.close()
    assert again[0].envelope.event_id == taken[0].envelope.event_id
    assert again[0].attempt == 2


async def test_closing_member_hands_back_unacked_at_once(bus: JetStreamBus) -> None:
    """Deliveries a member holds when it closes are nak'ed and go to the next member."""
    await bus.publish(_envelopes(3))
    quitter = await bus.subscribe("g")
    taken: list[Delivery] = []
    await _drain_no_ack(quitter, 3, taken)
    await quitter.close()
    stayer = await bus.subscribe("g")
    got: list[Delivery] = []
    await _drain(stayer, 3, got)
    await stayer.close()
    assert sorted(d.envelope.version for d in got) == [1, 2, 3]
    assert all(d.attempt == 2 for d in got)


async def _drain_no_ack(sub: Subscription, want: int, sink: list[Delivery]) -> None:
    for _ in range(50):
        if len(sink) >= want:
            return
        sink += await sub.fetch(max_count=want - len(sink), timeout_s=0.2)


async def test_event_type_filter(bus: JetStreamBus) -> None:
    """A group subscribed to one type only sees that type; another filter on it is refused."""
    await bus.publish(_envelopes(4))
    sub = await bus.subscribe("deposits", event_types=["events.v1.testing.AmountDeposited"])
    got: list[Delivery] = []
    await _drain(sub, 3, got)
    await sub.close()
    assert [d.envelope.version for d in got] == [2, 3, 4]
    with pytest.raises(FailedPreconditionError):
        await bus.subscribe("deposits", event_types=["events.v1.testing.AccountOpened"])
    both = ["events.v1.testing.AccountOpened", "events.v1.testing.AmountDeposited"]
    sub = await bus.subscribe("two-types", event_types=both)
    await sub.close()
    with pytest.raises(FailedPreconditionError):
        await bus.subscribe("two-types")


async def test_existing_stream_with_other_subjects_is_refused(
    bus: JetStreamBus, nats_url: str
) -> None:
    """Reusing a stream name with another subject prefix fails with a clear error."""
    clash = JetStreamConfig(
        stream=bus.config.stream, subject_prefix=bus.config.subject_prefix + "x"
    )
    with pytest.raises(FailedPreconditionError, match="subject_prefix"):
        await JetStreamBus.connect(nats_url, clash)


async def test_lost_connection_is_unavailable(bus: JetStreamBus, nats_url: str) -> None:
    """Publishing or fetching over a closed NATS connection raises UnavailableError."""
    other = await JetStreamBus.connect(nats_url, bus.config)
    sub = await other.subscribe("g")
    await other.close()
    with pytest.raises(UnavailableError):
        await other.publish(_envelopes(1))
    with pytest.raises(UnavailableError):
        await sub.fetch(timeout_s=0.2)
