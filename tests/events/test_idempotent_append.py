"""Appends are idempotent by event id: a retry stores nothing twice; a reused id is a conflict."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from framework.errors import ConflictError, InvalidArgumentError
from framework.events.aggregate import Repository
from framework.events.projection import ProjectionRunner
from framework.events.service import EventStoreServicer
from framework.events.store import NewEvent, new_event_id
from framework.testing import serve
from gen.events.v1 import store_pb2
from gen.events.v1.store_pb2_grpc import EventStoreServiceStub
from gen.events.v1.testing_pb2 import AccountOpened, AmountDeposited
from tests.events.account import Account
from tests.events.conftest import Backend
from tests.events.test_projection import Balances


def _batch(*amounts: int) -> list[NewEvent]:
    return [NewEvent.of(AmountDeposited(amount=a)) for a in amounts]


async def test_a_retried_batch_is_stored_once(store: Any) -> None:
    """The same ids at the same versions again: the first result, nothing written."""
    opened = [NewEvent.of(AccountOpened(owner="ann"))]
    await store.append("acc-1", opened, 0)
    batch = _batch(1, 2, 3)
    first = await store.append("acc-1", batch, 1)
    again = await store.append("acc-1", batch, 1)  # same expected version
    anywhere = await store.append("acc-1", batch, None)  # "append at the end"
    await store.append("acc-1", _batch(4), 4)  # the stream moves on
    later = await store.append("acc-1", batch, 1)  # still the same place
    assert again == anywhere == later == first
    assert first.version == 4
    stored = await store.read_all()
    assert [e.event_id for e in stored[1:4]] == [e.event_id for e in batch]
    assert len(stored) == 5
    assert await store.head_position() == stored[-1].position


async def test_a_retried_first_append_of_a_stream_is_stored_once(store: Any) -> None:
    """expected_version=0 retried after the stream was created by that very append."""
    batch = [NewEvent.of(AccountOpened(owner="ann")), *_batch(5)]
    first = await store.append("acc-1", batch, 0)
    assert await store.append("acc-1", batch, 0) == first
    assert [e.version for e in await store.read_stream("acc-1")] == [1, 2]


@pytest.mark.parametrize(
    "where",
    ["other stream", "other version", "part of the batch", "reordered"],
)
async def test_an_id_stored_elsewhere_is_a_conflict(store: Any, where: str) -> None:
    """An id already stored at another place is ABORTED (DUPLICATE_EVENT_ID); nothing is written."""
    batch = _batch(1, 2)
    await store.append("acc-1", batch, 0)
    head = await store.head_position()
    attempt: tuple[str, list[NewEvent], int | None] = {
        "other stream": ("acc-2", batch, 0),
        "other version": ("acc-1", batch, 1),
        "part of the batch": ("acc-1", [*batch, *_batch(3)], 0),
        "reordered": ("acc-1", [batch[1], batch[0]], 0),
    }[where]
    with pytest.raises(ConflictError) as caught:
        await store.append(*attempt)
    assert caught.value.reason == "DUPLICATE_EVENT_ID"
    assert caught.value.metadata["event_id"] in {e.event_id for e in batch}
    assert await store.head_position() == head


async def test_an_id_twice_in_one_batch_is_refused(store: Any) -> None:
    """A batch naming one id twice is INVALID_ARGUMENT before anything is written."""
    event = NewEvent.of(AmountDeposited(amount=1))
    with pytest.raises(InvalidArgumentError, match="appears twice"):
        await store.append("acc-1", [event, event], 0)
    assert await store.head_position() == 0


async def test_a_cancelled_append_retried_is_projected_once(backend: Backend) -> None:
    """An append whose caller gave up, retried with the same events, is stored and applied once."""
    store = await backend.open()
    balances = Balances(backend, "balances_retry")
    async with store.transaction() as tx:
        await balances.create(tx)
    batch = [NewEvent.of(AccountOpened(owner="ann")), *_batch(10, 20)]
    task = asyncio.create_task(store.append("acc-1", batch, 0))
    task.cancel()  # the caller gives up; whether the append ran is unknown to it
    await asyncio.gather(task, return_exceptions=True)
    for _ in range(3):  # it retries, maybe more than once (a retry policy, a user)
        result = await store.append("acc-1", batch, 0)
    assert result.version == 3
    runner = ProjectionRunner(store, balances, trace=False)
    await runner.catch_up()
    assert await balances.rows(store) == {"acc-1": 30}
    assert len(await store.read_all()) == 3


async def test_a_repository_save_retried_after_an_unknown_outcome_is_stored_once(
    store: Any,
) -> None:
    """Saving the same aggregate twice (as after a timeout) writes its events once."""
    repo = Repository(store, Account)
    account = Account("acc-1")
    account.open("ann")
    account.deposit(5)
    pending = account.pending_events
    first = await store.append("acc-1", list(pending), 0)
    await repo.save(account)  # the retry: the same pending events, same ids
    loaded = await repo.load("acc-1")
    assert (loaded.version, loaded.balance) == (first.version, 5)
    assert len(await store.read_all()) == 2


async def test_append_retried_over_grpc_is_stored_once(store: Any) -> None:
    """An Append RPC resent with the same event ids returns the first reply; stored once."""
    request = store_pb2.AppendRequest(
        stream_id="acc-1",
        expected_version=0,
        events=[
            store_pb2.ProposedEvent(
                event_id="5f0c6c1e-6f1b-4a8e-9d0c-000000000001",
                type="events.v1.testing.AccountOpened",
                payload=AccountOpened(owner="ann").SerializeToString(),
            )
        ],
    )
    async with serve(EventStoreServicer(store)) as t:
        stub = t.stub(EventStoreServiceStub)
        first = await stub.Append(request)
        second = await stub.Append(request)
    assert second == first
    assert len(await store.read_all()) == 1


def test_new_event_ids_are_time_ordered_uuid7() -> None:
    """Default event ids are RFC 9562 version 7 UUIDs whose time prefix never goes back."""
    ids = [new_event_id() for _ in range(2000)]
    parsed = [uuid.UUID(i) for i in ids]
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in parsed)
    assert all(str(u) == i for u, i in zip(parsed, ids, strict=True))
    prefixes = [i[:13] for i in ids]  # 48-bit millisecond timestamp
    assert prefixes == sorted(prefixes)
    assert len(set(ids)) == len(ids)
    assert NewEvent.of(AccountOpened()).event_id[14] == "7"
