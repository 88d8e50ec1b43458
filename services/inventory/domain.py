"""Inventory rules: stock per SKU and reservations against it. No grpc, no I/O.

A reservation holds units of several SKUs, all lines or none.  Release is its
saga compensation.  The business rules on a reservation id:

- a repeated `reserve` with the same reservation id and lines returns the
  original reservation (nothing is held twice); other lines are refused;
- a reservation that was released cannot hold units again
  (`FailedPreconditionError`, reason `RESERVATION_RELEASED`);
- releasing what is not held (twice, or an id never reserved) changes
  nothing and says `released=False`.

The saga mechanics (a repeated call answering the first result, a
compensation that arrives before its action, an action arriving after its
compensation) are the framework's participant barrier
(`framework.saga.barrier`), recorded in the same transaction by the
application layer.

The functions here are pure: they take the current records and return the new
ones; the application layer loads and saves them in one transaction.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime

from framework.errors import AlreadyExistsError, FailedPreconditionError, InvalidArgumentError

__all__ = [
    "Line",
    "ReleaseOutcome",
    "Reservation",
    "ReservationState",
    "ReserveOutcome",
    "Stock",
    "add_stock",
    "merge_lines",
    "release",
    "reserve",
]

DOMAIN = "inventory.v1"


@dataclass(frozen=True, slots=True)
class Stock:
    """Units of one SKU: `on_hand` physically held, `reserved` of them promised."""

    sku: str
    on_hand: int
    reserved: int
    updated_at: datetime

    @property
    def available(self) -> int:
        return self.on_hand - self.reserved

    def added(self, quantity: int, now: datetime) -> Stock:
        _positive(quantity, "quantity")
        return replace(self, on_hand=self.on_hand + quantity, updated_at=now)

    def held(self, quantity: int, now: datetime) -> Stock:
        if quantity > self.available:
            raise FailedPreconditionError(
                f"SKU {self.sku}: {quantity} requested, {self.available} available",
                reason="INSUFFICIENT_STOCK",
                domain=DOMAIN,
            )
        return replace(self, reserved=self.reserved + quantity, updated_at=now)

    def freed(self, quantity: int, now: datetime) -> Stock:
        # never below zero, even if a record was edited by hand
        return replace(self, reserved=max(0, self.reserved - quantity), updated_at=now)


@dataclass(frozen=True, slots=True)
class Line:
    """A quantity of one SKU."""

    sku: str
    quantity: int


class ReservationState(enum.Enum):
    HELD = "HELD"
    RELEASED = "RELEASED"


@dataclass(frozen=True, slots=True)
class Reservation:
    """Units held for an order; `stocks_after` is the stock as the reserve left it."""

    reservation_id: str
    order_id: str
    lines: tuple[Line, ...]
    state: ReservationState
    updated_at: datetime
    stocks_after: tuple[Stock, ...] = ()
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ReserveOutcome:
    reservation: Reservation
    changed: tuple[Stock, ...]  # stocks to save (empty on a replay)
    replay: bool


@dataclass(frozen=True, slots=True)
class ReleaseOutcome:
    reservation: Reservation | None  # None: the id was never reserved
    changed: tuple[Stock, ...]  # stocks to save (empty when nothing was released)
    released: bool
    record: bool  # whether `reservation` must be saved


def _positive(quantity: int, name: str) -> None:
    if quantity < 1:
        raise InvalidArgumentError(f"{name} must be at least 1, got {quantity}", domain=DOMAIN)


def add_stock(current: Stock | None, sku: str, quantity: int, now: datetime) -> Stock:
    """Receive `quantity` units of `sku`; a SKU seen for the first time starts at zero."""
    if not sku:
        raise InvalidArgumentError("sku must not be empty", domain=DOMAIN)
    base = current or Stock(sku=sku, on_hand=0, reserved=0, updated_at=now)
    return base.added(quantity, now)


def merge_lines(lines: Iterable[Line]) -> tuple[Line, ...]:
    """One line per SKU (quantities of repeated SKUs summed), sorted by SKU."""
    totals: dict[str, int] = {}
    for line in lines:
        _positive(line.quantity, f"quantity of {line.sku}")
        totals[line.sku] = totals.get(line.sku, 0) + line.quantity
    if not totals:
        raise InvalidArgumentError("a reservation needs at least one line", domain=DOMAIN)
    return tuple(Line(sku, quantity) for sku, quantity in sorted(totals.items()))


def reserve(
    existing: Reservation | None,
    stocks: Mapping[str, Stock],
    reservation_id: str,
    order_id: str,
    lines: Iterable[Line],
    now: datetime,
) -> ReserveOutcome:
    """Hold every line or none; see the module docstring for repeats and late calls."""
    wanted = merge_lines(lines)
    if existing is not None:
        return _replay(existing, order_id, wanted)
    short = [
        (line, stocks[line.sku].available if line.sku in stocks else 0)
        for line in wanted
        if line.sku not in stocks or stocks[line.sku].available < line.quantity
    ]
    if short:
        shown = ", ".join(f"{ln.sku} ({ln.quantity} requested, {n} available)" for ln, n in short)
        raise FailedPreconditionError(
            f"not enough stock for {shown}; nothing was reserved",
            reason="INSUFFICIENT_STOCK",
            metadata={"skus": ",".join(ln.sku for ln, _ in short)},
            domain=DOMAIN,
        )
    changed = tuple(stocks[line.sku].held(line.quantity, now) for line in wanted)
    reservation = Reservation(
        reservation_id=reservation_id,
        order_id=order_id,
        lines=wanted,
        state=ReservationState.HELD,
        updated_at=now,
        stocks_after=changed,
    )
    return ReserveOutcome(reservation, changed, replay=False)


def _replay(existing: Reservation, order_id: str, wanted: tuple[Line, ...]) -> ReserveOutcome:
    if existing.state is not ReservationState.HELD:
        raise FailedPreconditionError(
            f"reservation {existing.reservation_id} was already released "
            f"({existing.state.value.lower()}); use a new reservation id to reserve again",
            reason="RESERVATION_RELEASED",
            domain=DOMAIN,
        )
    if existing.order_id != order_id or existing.lines != wanted:
        raise AlreadyExistsError(
            f"reservation {existing.reservation_id} exists with a different order or lines; "
            "a reservation id names exactly one request",
            reason="RESERVATION_MISMATCH",
            domain=DOMAIN,
        )
    return ReserveOutcome(existing, (), replay=True)


def release(
    existing: Reservation | None,
    stocks: Mapping[str, Stock],
    reservation_id: str,
    reason: str,
    now: datetime,
) -> ReleaseOutcome:
    """Give back a held reservation; anything else is a no-op with `released=False`."""
    if existing is None:
        return ReleaseOutcome(None, (), released=False, record=False)
    if existing.state is not ReservationState.HELD:
        return ReleaseOutcome(existing, (), released=False, record=False)
    changed = tuple(
        stocks[line.sku].freed(line.quantity, now) for line in existing.lines if line.sku in stocks
    )
    done = replace(existing, state=ReservationState.RELEASED, updated_at=now, reason=reason)
    return ReleaseOutcome(done, changed, released=True, record=True)
