"""gRPC edge of the ordering service: proto <-> application, nothing else."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from google.protobuf import timestamp_pb2

from framework.auth.policy import current_principal
from framework.policies.idempotency import current_idempotency_key
from gen.order.v1 import order_pb2 as pb
from gen.order.v1 import order_pb2_grpc
from services.order.application import Orders
from services.order.domain import Caller, Line, Order, Status
from services.order.projections import OrderView

__all__ = ["OrderServicer", "order_message", "view_message"]

_STATUS = {
    Status.DRAFT: pb.ORDER_STATUS_DRAFT,
    Status.CONFIRMING: pb.ORDER_STATUS_CONFIRMING,
    Status.CONFIRMED: pb.ORDER_STATUS_CONFIRMED,
    Status.CANCELLED: pb.ORDER_STATUS_CANCELLED,
}


def _stamp(moment: datetime | None) -> timestamp_pb2.Timestamp | None:
    if moment is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _items(lines: Sequence[Line]) -> list[pb.OrderItem]:
    return [
        pb.OrderItem(sku=line.sku, quantity=line.quantity, unit_price_minor=line.unit_price_minor)
        for line in lines
    ]


def order_message(order: Order) -> pb.Order:
    return pb.Order(
        order_id=order.id,
        user_id=order.user_id,
        status=_STATUS[order.status],
        items=_items(order.lines),
        currency=order.currency,
        total_minor=order.total_minor,
        cancel_reason=order.cancel_reason,
        version=order.version,
        created_at=_stamp(order.created_at),
        updated_at=_stamp(order.updated_at),
        saga_id=order.saga_id,
    )


def view_message(view: OrderView) -> pb.Order:
    return pb.Order(
        order_id=view.order_id,
        user_id=view.user_id,
        status=_STATUS[view.status],
        items=_items(view.lines),
        currency=view.currency,
        total_minor=view.total_minor,
        cancel_reason=view.cancel_reason,
        version=view.version,
        created_at=_stamp(view.created_at),
        updated_at=_stamp(view.updated_at),
        saga_id=view.saga_id,
    )


def _caller() -> Caller:
    principal = current_principal()
    return Caller(principal.subject, principal.scopes) if principal else Caller("")


def _key() -> str:
    return current_idempotency_key() or ""


class OrderServicer(order_pb2_grpc.OrderServiceServicer):
    def __init__(self, orders: Orders) -> None:
        self.orders = orders

    async def CreateOrder(
        self, request: pb.CreateOrderRequest, context: Any
    ) -> pb.CreateOrderResponse:
        order = await self.orders.create(_caller(), request.user_id, request.currency, _key())
        return pb.CreateOrderResponse(order=order_message(order))

    async def AddOrderItem(
        self, request: pb.AddOrderItemRequest, context: Any
    ) -> pb.AddOrderItemResponse:
        order = await self.orders.add_item(
            _caller(),
            request.order_id,
            request.sku,
            request.quantity,
            request.unit_price_minor,
            _key(),
        )
        return pb.AddOrderItemResponse(order=order_message(order))

    async def ConfirmOrder(
        self, request: pb.ConfirmOrderRequest, context: Any
    ) -> pb.ConfirmOrderResponse:
        remaining = context.time_remaining()
        # leave a margin of the caller's deadline to record the outcome and answer
        wait_s = max(0.5, remaining - 1.0) if remaining is not None else None
        order = await self.orders.confirm(_caller(), request.order_id, wait_s)
        return pb.ConfirmOrderResponse(order=order_message(order))

    async def CancelOrder(
        self, request: pb.CancelOrderRequest, context: Any
    ) -> pb.CancelOrderResponse:
        order = await self.orders.cancel(_caller(), request.order_id, request.reason)
        return pb.CancelOrderResponse(order=order_message(order))

    async def GetOrder(self, request: pb.GetOrderRequest, context: Any) -> pb.GetOrderResponse:
        order = await self.orders.get(_caller(), request.order_id)
        return pb.GetOrderResponse(order=order_message(order))

    async def ListOrders(
        self, request: pb.ListOrdersRequest, context: Any
    ) -> pb.ListOrdersResponse:
        views, following = await self.orders.list(
            _caller(), request.user_id, request.page_size, request.page_token
        )
        return pb.ListOrdersResponse(
            orders=[view_message(v) for v in views], next_page_token=following
        )
