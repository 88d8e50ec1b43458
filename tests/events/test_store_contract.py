"""The event store contract, run on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from framework.errors import ConflictError, InvalidArgumentError
from framework.events.store import EventMetadata, EventStore, NewEvent, Snapshot
from gen.events.v1.testing_pb2 import AccountOpened, AccountState, AmountDeposited
from tests.events.conftest import Backend


def deposits(n: int, start: int = 1) -> list[NewEvent]:
    return [NewEvent.of(AmountDeposited(amount=i)) for i in range(start, start + n)]


async def test_store_satisfies_protocol(store: Any) -> None:
    """Both backends implement the EventStore protocol."""
    assert isinstance(store, EventStore)


async def test_append_then_read_stream_in_version_order(store: Any) -> None:
    """Appended events come back from their stream with versions 1..n and their metadata."""
    meta = EventMetadata(correlation_id="c-1", traceparent="00-ab-cd-01", extra={"k": "v"})
    opened = NewEvent.of(AccountOpened(owner="ann"), meta)
    result = await store.append("acc-1", [opened, *deposits(2)], 0, aggregate_type="Account")
    assert result.version == 3 and len(result.positions) == 3
    events = await store.read_stream("acc-1")
    assert [e.version for e in events] == [1, 2, 3]
    assert [e.position for e in events] == list(result.positions)
    first = events[0]
    assert (first.type, first.aggregate_type, first.event_id) == (
        "events.v1.testing.AccountOpened",
        "Account",
        opened.event_id,
    )
    assert AccountOpened.FromString(first.payload).owner == "ann"
    assert first.metadata.correlation_id == "c-1" and dict(first.metadata.extra) == {"k": "v"}
    assert first.metadata.schema_version == 1
    assert first.recorded_at.tzinfo is not None
    assert [e.version for e in await store.read_stream("acc-1", from_version=3)] == [3]
    assert await store.stream_version("acc-1") == 3
    assert await store.stream_version("nobody") == 0


async def test_stale_expected_version_is_conflict_and_changes_nothing(store: Any) -> None:
    """A stale expected version raises ConflictError naming stream and versions; nothing stored."""
    await store.append("acc-1", deposits(2), 0)
    with pytest.raises(ConflictError) as caught:
        await store.append("acc-1", deposits(1), 1)
    assert caught.value.metadata == {
        "stream_id": "acc-1",
        "expected_version": "1",
        "actual_version": "2",
    }
    assert "acc-1" in caught.value.message
    with pytest.raises(ConflictError):
        await store.append("acc-1", deposits(1), 5)  # ahead of the stream: no gaps
    assert await store.stream_version("acc-1") == 2
    assert await store.append("acc-1", deposits(1), None) is not None  # any version
    assert await store.stream_version("acc-1") == 3


@pytest.mark.parametrize(
    ("stream_id", "events", "expected", "needle"),
    [
        ("", deposits(1), 0, "stream_id is empty"),
        ("acc-1", deposits(1), -1, "expected_version must be >= 0"),
        ("acc-1", [NewEvent("no.such.Event", b"")], 0, "unknown event type 'no.such.Event'"),
        (
            "acc-1",
            [*deposits(1), NewEvent("events.v1.testing.AmountDeposited", b"\xff\xff\xff")],
            0,
            "does not parse as events.v1.testing.AmountDeposited",
        ),
        ("acc-1", [], 0, "has no events"),
    ],
    ids=["empty-stream", "negative-version", "unknown-type", "bad-payload", "no-events"],
)
async def test_bad_input_is_invalid_argument_and_store_unchanged(
    store: Any, stream_id: str, events: list[NewEvent], expected: int, needle: str
) -> None:
    """Bad input raises InvalidArgumentError with a clear message and stores nothing."""
    with pytest.raises(InvalidArgumentError, match=needle):
        await store.append(stream_id, events, expected)
    assert await store.head_position() == 0
    assert await store.read_all() == []


async def test_negative_read_positions_are_invalid(store: Any) -> None:
    """Negative from_version/after_position and a zero limit are refused."""
    with pytest.raises(InvalidArgumentError, match="from_version"):
        await store.read_stream("acc-1", from_version=-1)
    with pytest.raises(InvalidArgumentError, match="after_position"):
        await store.read_all(after_position=-1)
    with pytest.raises(InvalidArgumentError, match="limit"):
        await store.read_all(limit=0)


async def test_eight_concurrent_writers_one_winner_per_version(backend: Backend) -> None:
    """8 writers on separate connections race per expected version: one wins, 7 conflict."""
    stores = [await backend.open() for _ in range(8)]
    rounds = 6
    for version in range(rounds):

        async def write(i: int, store: Any, version: int = version) -> str:
            try:
                await store.append("hot", [NewEvent.of(AmountDeposited(amount=i))], version)
            except ConflictError:
                return "conflict"
            return "won"

        outcomes = await asyncio.gather(*(write(i, s) for i, s in enumerate(stores)))
        assert sorted(outcomes) == ["conflict"] * 7 + ["won"]
    events = await stores[0].read_stream("hot")
    assert [e.version for e in events] == list(range(1, rounds + 1))


async def test_global_positions_strictly_increase_without_skips(backend: Backend) -> None:
    """Concurrent batches on many streams: positions unique, increasing, none skipped by a tail."""
    stores = [await backend.open() for _ in range(4)]
    tail_seen: list[int] = []
    done = asyncio.Event()

    async def writer(w: int, store: Any) -> None:
        for b in range(10):
            await store.append(f"s-{w}-{b}", deposits(5), 0)

    async def tail() -> None:
        cursor = 0
        while True:
            finished = done.is_set()
            page = await stores[0].read_all(cursor, 50)
            for event in page:
                assert event.position > cursor
                tail_seen.append(event.position)
                cursor = event.position
            if finished and not page:
                return
            await stores[0].wait_for_events(cursor, 0.01)

    tail_task = asyncio.create_task(tail())
    await asyncio.gather(*(writer(w, s) for w, s in enumerate(stores)))
    done.set()
    await asyncio.wait_for(tail_task, 60)
    everything = [e.position for e in await stores[0].read_all(0, 10_000)]
    assert len(everything) == 4 * 10 * 5
    assert everything == sorted(set(everything))
    assert tail_seen == everything  # the live tail missed no late commit


async def test_read_all_pages_by_position(store: Any) -> None:
    """read_all returns events after a position, at most `limit`, and head_position tracks it."""
    await store.append("a", deposits(3), 0)
    await store.append("b", deposits(3), 0)
    first = await store.read_all(0, 4)
    rest = await store.read_all(first[-1].position, 100)
    assert len(first) == 4 and len(rest) == 2
    assert await store.head_position() == rest[-1].position


async def test_wait_for_events_wakes_on_append(store: Any) -> None:
    """wait_for_events returns True once an append lands and False after a quiet timeout."""
    assert await store.wait_for_events(0, 0.01) is False
    waiter = asyncio.create_task(store.wait_for_events(0, 5.0))
    await asyncio.sleep(0)
    await store.append("a", deposits(1), 0)
    assert await asyncio.wait_for(waiter, 5.0) is True


async def test_snapshots_keep_the_latest(store: Any) -> None:
    """save_snapshot keeps the newest version; an older one never replaces it."""
    assert await store.load_snapshot("acc-1") is None
    state = AccountState(owner="ann", balance=10, open=True)
    await store.save_snapshot(Snapshot("acc-1", 5, "t.State", state.SerializeToString()))
    await store.save_snapshot(Snapshot("acc-1", 3, "t.State", b"old"))
    snap = await store.load_snapshot("acc-1")
    assert snap is not None and snap.version == 5
    assert AccountState.FromString(snap.state).balance == 10
    await store.save_snapshot(Snapshot("acc-1", 9, "t.State", b""))
    newer = await store.load_snapshot("acc-1")
    assert newer is not None and newer.version == 9


async def test_checkpoints_are_durable_across_reopen(backend: Backend) -> None:
    """A saved checkpoint is read back by another store on the same database."""
    first = await backend.open()
    assert await first.load_checkpoint("relay") == 0
    await first.save_checkpoint("relay", 42)
    second = await backend.open()
    assert await second.load_checkpoint("relay") == 42
