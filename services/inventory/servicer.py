"""gRPC edge of the inventory: proto <-> application, nothing else.

Errors raised below (framework errors) are mapped to statuses by the server's
error mapping; this module never sets a status itself.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import timestamp_pb2

from framework.errors import FieldViolation, InvalidArgumentError
from gen.inventory.v1 import inventory_pb2, inventory_pb2_grpc
from services.inventory.application import Inventory
from services.inventory.domain import Line, Stock

__all__ = ["IDEMPOTENCY_KEY", "InventoryServicer", "stock_message"]

IDEMPOTENCY_KEY = "idempotency-key"


def stock_message(stock: Stock) -> inventory_pb2.Stock:
    updated = timestamp_pb2.Timestamp()
    updated.FromDatetime(stock.updated_at)
    return inventory_pb2.Stock(
        sku=stock.sku,
        on_hand=stock.on_hand,
        reserved=stock.reserved,
        available=stock.available,
        updated_at=updated,
    )


def _idempotency_key(context: Any) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == IDEMPOTENCY_KEY:
            return value.decode() if isinstance(value, bytes) else str(value)
    raise InvalidArgumentError(
        f"send an '{IDEMPOTENCY_KEY}' metadata entry (e.g. a UUID; the saga orchestrator "
        "sends saga:<saga_id>/<step>/<action|compensation>) so a repeated call is applied once",
        reason="IDEMPOTENCY_KEY_MISSING",
        violations=[FieldViolation(IDEMPOTENCY_KEY, "required metadata entry", "required")],
    )


class InventoryServicer(inventory_pb2_grpc.InventoryServiceServicer):
    """Implements `inventory.v1.InventoryService` on an `Inventory`."""

    def __init__(self, inventory: Inventory) -> None:
        self.inventory = inventory

    async def AddStock(
        self, request: inventory_pb2.AddStockRequest, context: Any
    ) -> inventory_pb2.AddStockResponse:
        stock = await self.inventory.add_stock(
            request.sku, request.quantity, _idempotency_key(context)
        )
        return inventory_pb2.AddStockResponse(stock=stock_message(stock))

    async def ReserveStock(
        self, request: inventory_pb2.ReserveStockRequest, context: Any
    ) -> inventory_pb2.ReserveStockResponse:
        reservation = await self.inventory.reserve_stock(
            request.reservation_id,
            request.order_id,
            [Line(line.sku, line.quantity) for line in request.lines],
            _idempotency_key(context),
        )
        return inventory_pb2.ReserveStockResponse(
            reservation_id=reservation.reservation_id,
            stocks=[stock_message(s) for s in reservation.stocks_after],
        )

    async def ReleaseStock(
        self, request: inventory_pb2.ReleaseStockRequest, context: Any
    ) -> inventory_pb2.ReleaseStockResponse:
        released = await self.inventory.release_stock(
            request.reservation_id, request.reason, _idempotency_key(context)
        )
        return inventory_pb2.ReleaseStockResponse(
            reservation_id=request.reservation_id, released=released
        )

    async def GetStock(
        self, request: inventory_pb2.GetStockRequest, context: Any
    ) -> inventory_pb2.GetStockResponse:
        stock = await self.inventory.get_stock(request.sku)
        return inventory_pb2.GetStockResponse(stock=stock_message(stock))
