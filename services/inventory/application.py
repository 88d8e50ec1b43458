"""Inventory use cases: load, apply the domain rules, save, in one transaction.

Collaborators are passed in: an `InventoryStore` (which runs a unit of work
atomically) and a clock.  Idempotency lives here:

- `reserve_stock` with a reservation id already used returns the original
  reservation (and the stock as that reserve left it), never holds twice;
- `add_stock` with an idempotency key already used returns the stock as the
  first call left it, never adds twice; the same key with a different SKU or
  quantity is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from framework.clock import Clock, SystemClock
from framework.errors import AlreadyExistsError, NotFoundError
from services.inventory import domain
from services.inventory.domain import Line, Reservation, Stock

__all__ = ["Addition", "Inventory", "InventoryStore", "Transaction"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Addition:
    """A recorded AddStock, so a retry with the same key is answered, not applied."""

    idempotency_key: str
    sku: str
    quantity: int
    stock_after: Stock


class Transaction(Protocol):
    """What a unit of work may read and write; everything commits or nothing does."""

    def stocks(self, skus: Sequence[str]) -> dict[str, Stock]: ...

    def reservation(self, reservation_id: str) -> Reservation | None: ...

    def addition(self, idempotency_key: str) -> Addition | None: ...

    def save_stocks(self, stocks: Iterable[Stock]) -> None: ...

    def save_reservation(self, reservation: Reservation) -> None: ...

    def save_addition(self, addition: Addition) -> None: ...


class InventoryStore(Protocol):
    """Runs a synchronous unit of work in one transaction, off the event loop."""

    async def transact(self, work: Callable[[Transaction], T]) -> T: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class Inventory:
    """The inventory use cases (what the servicer calls)."""

    def __init__(self, store: InventoryStore, *, clock: Clock | None = None) -> None:
        self.store = store
        self.clock = clock or SystemClock()

    async def add_stock(self, sku: str, quantity: int, idempotency_key: str = "") -> Stock:
        """Receive units; a repeated `idempotency_key` returns the first call's stock."""
        now = self.clock.now()

        def work(tx: Transaction) -> Stock:
            if idempotency_key:
                seen = tx.addition(idempotency_key)
                if seen is not None:
                    return _replayed_addition(seen, sku, quantity)
            stock = domain.add_stock(tx.stocks([sku]).get(sku), sku, quantity, now)
            tx.save_stocks([stock])
            if idempotency_key:
                tx.save_addition(Addition(idempotency_key, sku, quantity, stock))
            return stock

        stock = await self.store.transact(work)
        logger.info("stock added sku=%s quantity=%s on_hand=%s", sku, quantity, stock.on_hand)
        return stock

    async def reserve_stock(
        self, reservation_id: str, order_id: str, lines: Iterable[Line]
    ) -> Reservation:
        """Hold all lines or none; a repeat returns the original reservation."""
        wanted = domain.merge_lines(lines)
        now = self.clock.now()

        def work(tx: Transaction) -> domain.ReserveOutcome:
            outcome = domain.reserve(
                tx.reservation(reservation_id),
                tx.stocks([line.sku for line in wanted]),
                reservation_id,
                order_id,
                wanted,
                now,
            )
            if not outcome.replay:
                tx.save_stocks(outcome.changed)
                tx.save_reservation(outcome.reservation)
            return outcome

        outcome = await self.store.transact(work)
        logger.info(
            "stock reserved reservation_id=%s order_id=%s replay=%s",
            reservation_id,
            order_id,
            outcome.replay,
        )
        return outcome.reservation

    async def release_stock(self, reservation_id: str, reason: str = "") -> bool:
        """Give back a reservation's units; False when there was nothing to give back."""
        now = self.clock.now()

        def work(tx: Transaction) -> domain.ReleaseOutcome:
            existing = tx.reservation(reservation_id)
            skus = [line.sku for line in existing.lines] if existing else []
            outcome = domain.release(existing, tx.stocks(skus), reservation_id, reason, now)
            tx.save_stocks(outcome.changed)
            if outcome.record:
                tx.save_reservation(outcome.reservation)
            return outcome

        outcome = await self.store.transact(work)
        logger.info(
            "stock release reservation_id=%s released=%s state=%s",
            reservation_id,
            outcome.released,
            outcome.reservation.state.value,
        )
        return outcome.released

    async def get_stock(self, sku: str) -> Stock:
        """The stock of one SKU; NotFoundError when it was never stocked."""
        stock = await self.store.transact(lambda tx: tx.stocks([sku]).get(sku))
        if stock is None:
            raise NotFoundError(
                f"SKU {sku} has never been stocked; add stock with AddStock first",
                reason="SKU_NOT_FOUND",
                domain=domain.DOMAIN,
            )
        return stock


def _replayed_addition(seen: Addition, sku: str, quantity: int) -> Stock:
    if seen.sku != sku or seen.quantity != quantity:
        raise AlreadyExistsError(
            f"idempotency key {seen.idempotency_key} was used for {seen.quantity} x {seen.sku}; "
            "send a new key for a different request",
            reason="IDEMPOTENCY_KEY_REUSED",
            domain=domain.DOMAIN,
        )
    return seen.stock_after
