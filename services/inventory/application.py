"""Inventory use cases: load, apply the domain rules, save, in one transaction.

Collaborators are passed in: an `InventoryStore` (which runs a unit of work
atomically) and a clock.  Idempotency lives here, through the framework's
participant barrier (`framework.saga.barrier`), recorded in the same
transaction as the stock change:

- a call repeated with the same idempotency key answers the first call's
  result and changes nothing; the same key with another request is refused
  (`ALREADY_EXISTS`, reason `IDEMPOTENCY_KEY_REUSED`);
- with a saga key (`saga:<saga_id>/<step>/action|compensation`, what the
  saga orchestrator sends), a release whose reserve never ran is a no-op
  (`released=False`) and a reserve arriving after its release is refused
  (`FAILED_PRECONDITION`, reason `ACTION_AFTER_COMPENSATION`);
- without a key (in-process callers) only the domain rules apply: a
  reservation id already held returns the original reservation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar

from framework.clock import Clock, SystemClock
from framework.errors import NotFoundError
from framework.saga.barrier import BarrierCall, ResultCodec
from services.inventory import domain
from services.inventory.domain import Line, Reservation, ReservationState, Stock

__all__ = ["Inventory", "InventoryStore", "Transaction"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Transaction(Protocol):
    """What a unit of work may read and write; everything commits or nothing does.

    Reads lock what they return until the transaction ends (stock rows in SKU order).
    """

    async def stocks(self, skus: Sequence[str]) -> dict[str, Stock]: ...

    async def ensure_stocks(self, skus: Sequence[str], now: datetime) -> None:
        """Create empty stock rows for SKUs that have none (so they can be locked)."""
        ...

    async def reservation(self, reservation_id: str) -> Reservation | None: ...

    async def save_stocks(self, stocks: Iterable[Stock]) -> None: ...

    async def save_reservation(self, reservation: Reservation) -> None: ...

    async def guard(
        self,
        call: BarrierCall,
        work: Callable[[], Awaitable[T]],
        codec: ResultCodec[T],
        *,
        null_result: Callable[[], T] | None = None,
    ) -> T:
        """Run `work` once per idempotency key in this transaction (the participant barrier)."""
        ...


class InventoryStore(Protocol):
    """Runs a unit of work in one transaction."""

    async def transact(self, work: Callable[[Transaction], Awaitable[T]]) -> T: ...

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

        async def add(tx: Transaction) -> Stock:
            await tx.ensure_stocks([sku], now)
            stock = domain.add_stock((await tx.stocks([sku])).get(sku), sku, quantity, now)
            await tx.save_stocks([stock])
            return stock

        async def work(tx: Transaction) -> Stock:
            if not idempotency_key:
                return await add(tx)
            call = BarrierCall.of(idempotency_key, _digest("AddStock", sku, quantity))
            return await tx.guard(call, lambda: add(tx), STOCK_CODEC)

        stock = await self.store.transact(work)
        logger.info("stock added sku=%s quantity=%s on_hand=%s", sku, quantity, stock.on_hand)
        return stock

    async def reserve_stock(
        self,
        reservation_id: str,
        order_id: str,
        lines: Iterable[Line],
        idempotency_key: str = "",
    ) -> Reservation:
        """Hold all lines or none; a repeat returns the original reservation."""
        wanted = domain.merge_lines(lines)
        now = self.clock.now()

        async def hold(tx: Transaction) -> Reservation:
            # stock locks first: a concurrent reserve of this id then sees the winner's row
            stocks = await tx.stocks([line.sku for line in wanted])
            outcome = domain.reserve(
                await tx.reservation(reservation_id),
                stocks,
                reservation_id,
                order_id,
                wanted,
                now,
            )
            if not outcome.replay:
                await tx.save_stocks(outcome.changed)
                await tx.save_reservation(outcome.reservation)
            return outcome.reservation

        async def work(tx: Transaction) -> Reservation:
            if not idempotency_key:
                return await hold(tx)
            flat = [f"{line.sku}={line.quantity}" for line in wanted]
            call = BarrierCall.of(
                idempotency_key, _digest("ReserveStock", reservation_id, order_id, *flat)
            )
            return await tx.guard(call, lambda: hold(tx), RESERVATION_CODEC)

        reservation = await self.store.transact(work)
        logger.info(
            "stock reserved reservation_id=%s order_id=%s key=%s",
            reservation_id,
            order_id,
            idempotency_key,
        )
        return reservation

    async def release_stock(
        self, reservation_id: str, reason: str = "", idempotency_key: str = ""
    ) -> bool:
        """Give back a reservation's units; False when there was nothing to give back."""
        now = self.clock.now()

        async def give_back(tx: Transaction) -> bool:
            existing = await tx.reservation(reservation_id)
            skus = [line.sku for line in existing.lines] if existing else []
            stocks = await tx.stocks(skus)
            outcome = domain.release(existing, stocks, reservation_id, reason, now)
            await tx.save_stocks(outcome.changed)
            if outcome.record and outcome.reservation is not None:
                await tx.save_reservation(outcome.reservation)
            return outcome.released

        async def work(tx: Transaction) -> bool:
            if not idempotency_key:
                return await give_back(tx)
            call = BarrierCall.of(idempotency_key, _digest("ReleaseStock", reservation_id, reason))
            return await tx.guard(
                call, lambda: give_back(tx), BOOL_CODEC, null_result=lambda: False
            )

        released = await self.store.transact(work)
        logger.info(
            "stock release reservation_id=%s released=%s key=%s",
            reservation_id,
            released,
            idempotency_key,
        )
        return released

    async def get_stock(self, sku: str) -> Stock:
        """The stock of one SKU; NotFoundError when it was never stocked."""

        async def read(tx: Transaction) -> Stock | None:
            return (await tx.stocks([sku])).get(sku)

        stock = await self.store.transact(read)
        if stock is None:
            raise NotFoundError(
                f"SKU {sku} has never been stocked; add stock with AddStock first",
                reason="SKU_NOT_FOUND",
                domain=domain.DOMAIN,
            )
        return stock


def _digest(*parts: object) -> bytes:
    """What the barrier fingerprints: the use case and its arguments."""
    return "\x1f".join(str(part) for part in parts).encode()


def stock_json(stock: Stock) -> dict[str, Any]:
    return {
        "sku": stock.sku,
        "on_hand": stock.on_hand,
        "reserved": stock.reserved,
        "updated_at": stock.updated_at.isoformat(),
    }


def stock_from(data: dict[str, Any]) -> Stock:
    return Stock(
        sku=data["sku"],
        on_hand=int(data["on_hand"]),
        reserved=int(data["reserved"]),
        updated_at=datetime.fromisoformat(data["updated_at"]),
    )


class _StockCodec:
    def encode(self, value: Stock) -> bytes:
        return json.dumps(stock_json(value)).encode()

    def decode(self, data: bytes) -> Stock:
        return stock_from(json.loads(data))


class _ReservationCodec:
    def encode(self, value: Reservation) -> bytes:
        return json.dumps(
            {
                "reservation_id": value.reservation_id,
                "order_id": value.order_id,
                "lines": [[line.sku, line.quantity] for line in value.lines],
                "state": value.state.value,
                "updated_at": value.updated_at.isoformat(),
                "stocks_after": [stock_json(s) for s in value.stocks_after],
                "reason": value.reason,
            }
        ).encode()

    def decode(self, data: bytes) -> Reservation:
        raw = json.loads(data)
        return Reservation(
            reservation_id=raw["reservation_id"],
            order_id=raw["order_id"],
            lines=tuple(Line(sku, int(quantity)) for sku, quantity in raw["lines"]),
            state=ReservationState(raw["state"]),
            updated_at=datetime.fromisoformat(raw["updated_at"]),
            stocks_after=tuple(stock_from(s) for s in raw["stocks_after"]),
            reason=raw["reason"],
        )


class _BoolCodec:
    def encode(self, value: bool) -> bytes:
        return b"1" if value else b"0"

    def decode(self, data: bytes) -> bool:
        return data == b"1"


STOCK_CODEC = _StockCodec()
RESERVATION_CODEC = _ReservationCodec()
BOOL_CODEC = _BoolCodec()
