"""Ordering with its neighbours, in-process over real gRPC and a real registry: the Order
aggregate, the order-list read model, and notifications fed by order events (consumer group).

Confirmation (the saga) is exercised with the orchestrator in tests/system.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from framework.auth.policy import BearerToken
from framework.client import connect
from framework.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
)
from gen.notification.v1 import notification_pb2 as npb
from gen.notification.v1.notification_pb2_grpc import NotificationServiceStub
from gen.order.v1 import order_pb2 as pb
from gen.order.v1 import saga_pb2
from gen.order.v1.order_pb2_grpc import OrderServiceStub
from gen.user.v1 import user_pb2 as upb
from gen.user.v1.user_pb2_grpc import UserServiceStub
from services.notification.main import build as build_notification
from services.order.application import SagaOutcome
from services.order.main import OrderService
from services.order.main import build as build_order
from services.user.main import UserConfig
from services.user.main import build as build_user
from services.user.passwords import Argon2Config
from tests.services.kit import Backend, Keys, poll, runtime_config, start_registry

CUSTOMER = ["orders:read", "orders:write", "notifications:read", "users:read"]


class NoOrchestrator:
    """Confirmations when no saga orchestrator runs (these tests never confirm)."""

    async def start(self, saga_id: str, confirmation: saga_pb2.OrderConfirmation) -> None:
        raise UnavailableError("no saga orchestrator in this test")

    async def wait(self, saga_id: str, timeout_s: float) -> SagaOutcome:
        raise UnavailableError("no saga orchestrator in this test")

    async def outcome(self, saga_id: str) -> SagaOutcome:
        raise UnavailableError("no saga orchestrator in this test")


def _key() -> tuple[tuple[str, str]]:
    return (("idempotency-key", str(uuid.uuid4())),)


@dataclass
class Shop:
    keys: Keys
    order: OrderService
    servers: list[Any]
    order_address: str
    notification_address: str
    user_address: str

    def orders(self, token: str) -> OrderServiceStub:
        return OrderServiceStub(connect(self.order_address, policies=[BearerToken(token)]))

    def notifications(self, token: str) -> NotificationServiceStub:
        return NotificationServiceStub(
            connect(self.notification_address, policies=[BearerToken(token)])
        )

    async def customer(self, email: str) -> tuple[str, str]:
        users = UserServiceStub(connect(self.user_address))
        user = (
            await users.RegisterUser(
                upb.RegisterUserRequest(email=email, display_name="Ada", password="s3cret-pass"),
                metadata=_key(),
            )
        ).user
        return user.user_id, self.keys.customer(user.user_id, CUSTOMER)


async def _order_service(keys: Keys, backend: Backend, tmp: Path, registry: str) -> OrderService:
    token = keys.token_file(tmp, "service:order", ["users:read", "users:admin", "registry:read"])
    config = runtime_config("order", keys, backend, registry=registry, token_file=token)
    service = await build_order(config, NoOrchestrator())
    await service.server.start()
    return service


@pytest.fixture
async def shop(keys: Keys, backend: Backend, tmp_path: Path) -> AsyncIterator[Shop]:
    registry_server, registry = await start_registry(tmp_path)
    started: list[Any] = [registry_server]
    try:
        registry_at = registry_server.address
        user = await build_user(
            UserConfig(
                runtime_config(
                    "user",
                    keys,
                    backend,
                    registry=registry_at,
                    token_file=keys.token_file(tmp_path, "service:user", ["registry:register"]),
                ),
                signing_key_path=str(keys.files.user_signing),
                argon2=Argon2Config(time_cost=1, memory_cost_kib=1024, parallelism=1),
            )
        )
        await user.server.start()
        started.append(user.server)
        order = await _order_service(keys, backend, tmp_path, registry_at)
        started.append(order.server)
        feed_token = keys.token_file(
            tmp_path,
            "service:notification",
            ["events:read", "events:subscribe"],
            {"groups": ["notification"]},
        )
        notification = await build_notification(
            runtime_config(
                "notification", keys, backend, registry=registry_at, token_file=feed_token
            )
        )
        await notification.server.start()
        started.append(notification.server)
        yield Shop(
            keys,
            order,
            started,
            order.server.address,
            notification.server.address,
            user.server.address,
        )
    finally:
        for server in reversed(started):
            await server.stop(0)
        await registry.close()


async def test_an_order_is_created_filled_listed_and_cancelled(shop: Shop) -> None:
    """Create (idempotent by key), add items, see it in ListOrders, cancel, cancel again."""
    user_id, token = await shop.customer("ada@example.com")
    orders = shop.orders(token)
    key = _key()
    created = (
        await orders.CreateOrder(
            pb.CreateOrderRequest(user_id=user_id, currency="EUR"), metadata=key
        )
    ).order
    again = (
        await orders.CreateOrder(
            pb.CreateOrderRequest(user_id=user_id, currency="EUR"), metadata=key
        )
    ).order
    assert again.order_id == created.order_id and created.status == pb.ORDER_STATUS_DRAFT
    with pytest.raises(AlreadyExistsError):
        await orders.CreateOrder(
            pb.CreateOrderRequest(user_id=user_id, currency="USD"), metadata=key
        )
    line_key = _key()
    for _ in range(2):  # the same line twice with one key: added once
        filled = await orders.AddOrderItem(
            pb.AddOrderItemRequest(
                order_id=created.order_id, sku="WIDGET-1", quantity=2, unit_price_minor=12_50
            ),
            metadata=line_key,
        )
    await orders.AddOrderItem(
        pb.AddOrderItemRequest(
            order_id=created.order_id, sku="GADGET-2", quantity=1, unit_price_minor=5_00
        ),
        metadata=_key(),
    )
    assert filled.order.total_minor == 25_00

    async def listed() -> pb.Order | None:
        page = await orders.ListOrders(pb.ListOrdersRequest(user_id=user_id))
        found = [o for o in page.orders if o.order_id == created.order_id]
        return found[0] if found and found[0].total_minor == 30_00 else None

    view = await poll(listed)
    assert [i.sku for i in view.items] == ["WIDGET-1", "GADGET-2"]
    cancelled = await orders.CancelOrder(
        pb.CancelOrderRequest(order_id=created.order_id, reason="changed my mind")
    )
    assert cancelled.order.status == pb.ORDER_STATUS_CANCELLED
    repeat = await orders.CancelOrder(pb.CancelOrderRequest(order_id=created.order_id))
    assert repeat.order.version == cancelled.order.version
    with pytest.raises(FailedPreconditionError) as closed:
        await orders.AddOrderItem(
            pb.AddOrderItemRequest(order_id=created.order_id, sku="WIDGET-1", quantity=1),
            metadata=_key(),
        )
    assert closed.value.reason == "ORDER_NOT_DRAFT"


async def test_a_cancelled_order_notifies_its_customer_once(shop: Shop) -> None:
    """OrderCancelled reaches the notification service through the consumer group."""
    user_id, token = await shop.customer("bob@example.com")
    orders = shop.orders(token)
    order = (
        await orders.CreateOrder(
            pb.CreateOrderRequest(user_id=user_id, currency="EUR"), metadata=_key()
        )
    ).order
    await orders.CancelOrder(pb.CancelOrderRequest(order_id=order.order_id, reason="too slow"))
    notifications = shop.notifications(token)

    async def notified() -> list[npb.Notification] | None:
        page = await notifications.ListNotifications(npb.ListNotificationsRequest(user_id=user_id))
        return list(page.notifications) or None

    found = await poll(notified)
    assert len(found) == 1 and "too slow" in found[0].body and order.order_id in found[0].body


async def test_customers_see_only_their_own_orders(shop: Shop) -> None:
    """Another customer's order, list or notifications: PERMISSION_DENIED; unknown: NOT_FOUND."""
    ada, ada_token = await shop.customer("ada@example.com")
    _, bob_token = await shop.customer("bob@example.com")
    order = (
        await shop.orders(ada_token).CreateOrder(
            pb.CreateOrderRequest(user_id=ada, currency="EUR"), metadata=_key()
        )
    ).order
    as_bob = shop.orders(bob_token)
    with pytest.raises(PermissionDeniedError):
        await as_bob.GetOrder(pb.GetOrderRequest(order_id=order.order_id))
    with pytest.raises(PermissionDeniedError):
        await as_bob.ListOrders(pb.ListOrdersRequest(user_id=ada))
    with pytest.raises(PermissionDeniedError):
        await as_bob.CreateOrder(
            pb.CreateOrderRequest(user_id=ada, currency="EUR"), metadata=_key()
        )
    with pytest.raises(PermissionDeniedError):
        await shop.notifications(bob_token).ListNotifications(
            npb.ListNotificationsRequest(user_id=ada)
        )
    with pytest.raises(NotFoundError):
        await as_bob.GetOrder(pb.GetOrderRequest(order_id=str(uuid.uuid4())))


async def test_orders_need_an_existing_customer_and_items_to_confirm(shop: Shop) -> None:
    """An unknown customer is NOT_FOUND; confirming an empty order is ORDER_EMPTY."""
    ghost = str(uuid.uuid4())
    admin = shop.orders(
        shop.keys.token("operator", ["orders:read", "orders:write", "orders:admin"])
    )
    with pytest.raises(NotFoundError):
        await admin.CreateOrder(
            pb.CreateOrderRequest(user_id=ghost, currency="EUR"), metadata=_key()
        )
    user_id, token = await shop.customer("carol@example.com")
    order = (
        await shop.orders(token).CreateOrder(
            pb.CreateOrderRequest(user_id=user_id, currency="EUR"), metadata=_key()
        )
    ).order
    with pytest.raises(FailedPreconditionError) as empty:
        await shop.orders(token).ConfirmOrder(
            pb.ConfirmOrderRequest(order_id=order.order_id), metadata=_key()
        )
    assert empty.value.reason == "ORDER_EMPTY"


async def test_the_read_model_is_rebuilt_from_the_events(shop: Shop) -> None:
    """Rebuilding the order list from position 0 gives the same rows as the live projection."""
    user_id, token = await shop.customer("dave@example.com")
    orders = shop.orders(token)
    for _ in range(3):
        order = (
            await orders.CreateOrder(
                pb.CreateOrderRequest(user_id=user_id, currency="EUR"), metadata=_key()
            )
        ).order
        await orders.AddOrderItem(
            pb.AddOrderItemRequest(
                order_id=order.order_id, sku="WIDGET-1", quantity=1, unit_price_minor=1_00
            ),
            metadata=_key(),
        )

    async def three() -> list[pb.Order] | None:
        # a longer deadline than the contract's 2 s: a loaded machine is not what this checks
        page = await orders.ListOrders(pb.ListOrdersRequest(user_id=user_id), timeout=30)
        done = [o for o in page.orders if o.total_minor == 1_00]
        return list(page.orders) if len(done) == 3 else None

    live = await poll(three)
    applied = await shop.order.runner.rebuild()
    assert applied >= 6
    rebuilt = list(
        (await orders.ListOrders(pb.ListOrdersRequest(user_id=user_id), timeout=30)).orders
    )
    assert rebuilt == live
    page = await orders.ListOrders(pb.ListOrdersRequest(user_id=user_id, page_size=2))
    rest = await orders.ListOrders(
        pb.ListOrdersRequest(user_id=user_id, page_token=page.next_page_token)
    )
    assert [o.order_id for o in [*page.orders, *rest.orders]] == [o.order_id for o in live]
