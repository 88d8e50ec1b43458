"""Aggregates and the repository: rebuild by events, invariants, expected version, snapshots."""

from __future__ import annotations

from typing import Any

import pytest

from framework.errors import ConflictError, FailedPreconditionError, InternalError, NotFoundError
from framework.events.aggregate import Aggregate, Repository, applies
from framework.events.store import Snapshot
from gen.events.v1.testing_pb2 import AccountOpened, AccountState, AmountDeposited
from tests.events.account import Account


def test_handler_table_is_built_once_per_class() -> None:
    """@applies handlers are found by message full name, inherited handlers included."""

    class Premium(Account):
        @applies(AmountDeposited)
        def _bonus(self, event: AmountDeposited) -> None:
            self.balance += event.amount * 2

    assert set(Account._handlers) == {
        "events.v1.testing.AccountOpened",
        "events.v1.testing.AmountDeposited",
        "events.v1.testing.AmountWithdrawn",
    }
    premium = Premium("p-1")
    premium.open("ann")
    premium.deposit(5)
    assert premium.balance == 10 and Premium.aggregate_type == "Premium"


def test_invariant_refuses_before_emitting() -> None:
    """A command breaking an invariant raises FailedPreconditionError and emits nothing."""
    account = Account("acc-1")
    account.open("ann")
    account.deposit(10)
    with pytest.raises(FailedPreconditionError, match="balance 10 is below 11"):
        account.withdraw(11)
    assert len(account.pending_events) == 2 and account.balance == 10 and account.version == 2


def test_event_without_handler_is_an_error() -> None:
    """Emitting an event type the aggregate has no handler for raises InternalError."""

    class Bare(Aggregate):
        pass

    with pytest.raises(InternalError, match="no @applies handler"):
        Bare("b-1").emit(AccountOpened(owner="x"))


async def test_repository_round_trip_and_conflict(store: Any) -> None:
    """Saved events rebuild the same state; a stale copy's save is a ConflictError."""
    repo = Repository(store, Account)
    account = Account("acc-1")
    account.open("ann")
    account.deposit(30)
    result = await repo.save(account)
    assert result is not None and result.version == 2 and account.pending_events == ()
    first, second = await repo.load("acc-1"), await repo.load("acc-1")
    assert (first.owner, first.balance, first.version) == ("ann", 30, 2)
    first.withdraw(5)
    await repo.save(first)
    second.withdraw(20)
    with pytest.raises(ConflictError):
        await repo.save(second)
    assert (await repo.load("acc-1")).balance == 25
    with pytest.raises(NotFoundError, match="Account 'ghost' does not exist"):
        await repo.load("ghost")
    assert await repo.save(first) is None  # nothing pending


async def test_repository_loads_from_snapshot_then_later_events(store: Any) -> None:
    """With snapshot_every=3 the repository snapshots and loads snapshot + newer events."""
    repo = Repository(store, Account, snapshot_every=3)
    account = Account("acc-1")
    account.open("ann")
    for amount in (1, 2, 3, 4):
        account.deposit(amount)
        await repo.save(account)
    snapshot = await store.load_snapshot("acc-1")
    assert snapshot is not None and snapshot.version == 3
    loaded = await repo.load("acc-1")
    assert (loaded.balance, loaded.version) == (10, 5)
    # The snapshot really is used: a (doctored) snapshot at v4 wins over replaying v1..v4.
    doctored = AccountState(owner="ann", balance=1000, open=True).SerializeToString()
    await store.save_snapshot(Snapshot("acc-1", 4, snapshot.type, doctored))
    assert (await repo.load("acc-1")).balance == 1000 + 4
