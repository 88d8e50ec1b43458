"""Pure inventory rules: stock arithmetic, all-or-nothing reservations, the saga barrier."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from framework.errors import AlreadyExistsError, FailedPreconditionError, InvalidArgumentError
from services.inventory.domain import (
    Line,
    ReservationState,
    Stock,
    add_stock,
    merge_lines,
    release,
    reserve,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
RID = "00000000-0000-4000-8000-000000000001"
OID = "00000000-0000-4000-8000-000000000002"


def _stocks(**on_hand: int) -> dict[str, Stock]:
    return {sku: Stock(sku, qty, 0, NOW) for sku, qty in on_hand.items()}


def test_add_stock_starts_at_zero_and_accumulates() -> None:
    """A new SKU starts empty; additions accumulate on hand."""
    first = add_stock(None, "A", 5, NOW)
    second = add_stock(first, "A", 3, NOW)
    assert (second.on_hand, second.reserved, second.available) == (8, 0, 8)


def test_add_stock_rejects_non_positive_quantity() -> None:
    """Adding zero units is an invalid argument."""
    with pytest.raises(InvalidArgumentError):
        add_stock(None, "A", 0, NOW)


def test_merge_lines_sums_repeated_skus() -> None:
    """Two lines for one SKU become one line with the summed quantity."""
    assert merge_lines([Line("B", 1), Line("A", 2), Line("B", 3)]) == (Line("A", 2), Line("B", 4))


def test_reserve_holds_every_line() -> None:
    """A reservation that fits holds each line's units and records the stock after."""
    outcome = reserve(None, _stocks(A=5, B=2), RID, OID, [Line("A", 2), Line("B", 2)], NOW)
    held = {s.sku: (s.reserved, s.available) for s in outcome.changed}
    assert held == {"A": (2, 3), "B": (2, 0)}
    assert outcome.reservation.state is ReservationState.HELD
    assert outcome.reservation.stocks_after == outcome.changed
    assert not outcome.replay


def test_reserve_short_on_one_line_holds_nothing() -> None:
    """One short line refuses the whole reservation, naming the short SKU."""
    with pytest.raises(FailedPreconditionError) as caught:
        reserve(None, _stocks(A=5, B=1), RID, OID, [Line("A", 2), Line("B", 2)], NOW)
    assert caught.value.reason == "INSUFFICIENT_STOCK"
    assert caught.value.metadata["skus"] == "B"


def test_reserve_unknown_sku_is_short() -> None:
    """A SKU never stocked has nothing available."""
    with pytest.raises(FailedPreconditionError, match="C \\(1 requested, 0 available\\)"):
        reserve(None, _stocks(A=5), RID, OID, [Line("C", 1)], NOW)


def test_repeated_reserve_replays_the_original() -> None:
    """The same reservation id and request returns the original, holding nothing more."""
    first = reserve(None, _stocks(A=5), RID, OID, [Line("A", 2)], NOW)
    again = reserve(first.reservation, _stocks(A=5), RID, OID, [Line("A", 2)], NOW)
    assert again.replay and again.changed == ()
    assert again.reservation == first.reservation


def test_reused_reservation_id_with_other_lines_is_refused() -> None:
    """A reservation id names one request: different lines are refused."""
    first = reserve(None, _stocks(A=5), RID, OID, [Line("A", 2)], NOW)
    with pytest.raises(AlreadyExistsError) as caught:
        reserve(first.reservation, _stocks(A=5), RID, OID, [Line("A", 3)], NOW)
    assert caught.value.reason == "RESERVATION_MISMATCH"


def test_release_gives_units_back_once() -> None:
    """Releasing a held reservation frees its units; a second release does nothing."""
    held = reserve(None, _stocks(A=5), RID, OID, [Line("A", 2)], NOW)
    stocks = {s.sku: s for s in held.changed}
    done = release(held.reservation, stocks, RID, "order cancelled", NOW)
    assert done.released and done.changed[0].reserved == 0
    assert done.reservation.state is ReservationState.RELEASED
    again = release(done.reservation, {"A": done.changed[0]}, RID, "retry", NOW)
    assert not again.released and again.changed == () and not again.record


def test_release_of_unknown_reservation_changes_nothing() -> None:
    """Releasing an id never reserved says released=False and records nothing."""
    outcome = release(None, {}, RID, "saga aborted", NOW)
    assert not outcome.released and not outcome.record and outcome.reservation is None


def test_reserve_after_release_is_refused() -> None:
    """A reservation id that was released cannot hold units again."""
    held = reserve(None, _stocks(A=5), RID, OID, [Line("A", 2)], NOW)
    done = release(held.reservation, {s.sku: s for s in held.changed}, RID, "", NOW)
    with pytest.raises(FailedPreconditionError, match="already released"):
        reserve(done.reservation, _stocks(A=5), RID, OID, [Line("A", 2)], NOW)
