"""Upcasters: old schema versions are read as the current one; stored rows never change."""

from __future__ import annotations

import pytest

from framework.events.store import NewEvent
from framework.events.upcast import Upcasters
from gen.events.v1.testing_pb2 import AmountDeposited, AmountWithdrawn
from tests.events.conftest import Backend

DEPOSITED = "events.v1.testing.AmountDeposited"
WITHDRAWN = "events.v1.testing.AmountWithdrawn"


def cents() -> Upcasters:
    """v1 of AmountDeposited held whole units; v2 holds cents."""
    upcasters = Upcasters()
    upcasters.add(AmountDeposited, 1, lambda old: AmountDeposited(amount=old.amount * 100))
    return upcasters


async def test_old_events_are_upcast_on_read(backend: Backend) -> None:
    """Events written at v1 read back at v2 (converted); new ones are written at v2."""
    old_store = await backend.open()
    await old_store.append("acc-1", [NewEvent.of(AmountDeposited(amount=3))], 0)
    store = await backend.open(upcasters=cents())
    await store.append("acc-1", [NewEvent.of(AmountDeposited(amount=250))], 1)
    events = await store.read_stream("acc-1")
    assert [AmountDeposited.FromString(e.payload).amount for e in events] == [300, 250]
    assert [e.metadata.schema_version for e in events] == [2, 2]
    # The stored v1 row is untouched: a reader without upcasters still sees it as written.
    raw = await old_store.read_all()
    assert [AmountDeposited.FromString(e.payload).amount for e in raw] == [3, 250]
    assert [e.metadata.schema_version for e in raw] == [1, 2]


def test_chain_applies_in_order_and_may_rename() -> None:
    """Upcasters chain v1 -> v2 -> v3, and a step may change the type name."""
    upcasters = Upcasters()
    upcasters.add_raw("old.Deposit", 1, lambda p: (DEPOSITED, p), to_version=2)
    upcasters.add(AmountDeposited, 2, lambda old: AmountDeposited(amount=old.amount + 1))
    payload = AmountDeposited(amount=1).SerializeToString()
    type_, new_payload, version = upcasters.upcast("old.Deposit", payload, 1)
    assert (type_, version) == (DEPOSITED, 3)
    assert AmountDeposited.FromString(new_payload).amount == 2
    assert upcasters.current_version(DEPOSITED) == 3
    assert upcasters.current_version("events.v1.testing.AmountWithdrawn") == 1
    unchanged = AmountWithdrawn(amount=1).SerializeToString()
    assert upcasters.upcast("x.Y", unchanged, 1) == ("x.Y", unchanged, 1)


def test_duplicate_upcaster_is_refused() -> None:
    """Registering two upcasters for the same type and version is a ValueError."""
    upcasters = cents()
    with pytest.raises(ValueError, match="already registered"):
        upcasters.add(AmountDeposited, 1, lambda old: old)


def test_a_rename_lands_on_the_target_types_first_version() -> None:
    """A renamed event starts at version 1 of its new type, so that type's upcasters all run."""
    upcasters = Upcasters()
    upcasters.add_raw("old.Deposit", 1, lambda p: ("old.Deposit", p))  # old.Deposit v1 -> v2
    upcasters.add_raw("old.Deposit", 2, lambda p: (DEPOSITED, p))  # renamed at its v2
    upcasters.add(AmountDeposited, 1, lambda old: AmountDeposited(amount=old.amount * 100))
    payload = AmountDeposited(amount=3).SerializeToString()
    type_, new_payload, version = upcasters.upcast("old.Deposit", payload, 1)
    assert (type_, version) == (DEPOSITED, 2)
    assert AmountDeposited.FromString(new_payload).amount == 300
    assert version == upcasters.current_version(DEPOSITED)


def test_a_rename_with_to_version_skips_the_earlier_upcasters() -> None:
    """`to_version` says which version of the target a renaming step produces."""
    upcasters = Upcasters()
    upcasters.add(
        AmountWithdrawn, 1, lambda old: AmountDeposited(amount=-old.amount * 100), to_version=2
    )
    upcasters.add(AmountDeposited, 1, lambda old: AmountDeposited(amount=old.amount * 100))
    payload = AmountWithdrawn(amount=2).SerializeToString()
    type_, new_payload, version = upcasters.upcast(WITHDRAWN, payload, 1)
    assert (type_, version) == (DEPOSITED, 2)
    assert AmountDeposited.FromString(new_payload).amount == -200
    with pytest.raises(ValueError, match="to_version"):
        upcasters.add_raw("x.Y", 1, lambda p: ("x.Z", p), to_version=0)


async def test_renamed_events_read_back_at_the_target_version(backend: Backend) -> None:
    """Through the store: a stored old-type event reads as the new type, fully upcast."""
    old_store = await backend.open()
    await old_store.append("acc-1", [NewEvent.of(AmountWithdrawn(amount=3))], 0)
    upcasters = Upcasters()
    upcasters.add(AmountWithdrawn, 1, lambda old: AmountDeposited(amount=-old.amount))
    upcasters.add(AmountDeposited, 1, lambda old: AmountDeposited(amount=old.amount * 100))
    store = await backend.open(upcasters=upcasters)
    [event] = await store.read_stream("acc-1")
    assert event.type == DEPOSITED
    assert event.metadata.schema_version == 2
    assert AmountDeposited.FromString(event.payload).amount == -300
