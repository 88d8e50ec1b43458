"""Composition root of the ordering service.

    python -m services.order.main

Environment: the runtime's `SERVICE_*` (see `framework.system.runtime`), plus
`ORDER_CONFIRM_WAIT_S` (how long ConfirmOrder waits for the saga, default 10) and
`ORDER_RECONCILE_S` (how often unfinished confirmations are settled, default 5).
It serves `order.v1.OrderService` and, read-only, its event store (the order
events other services consume), and runs the order-list projection.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from framework.events.aggregate import Repository
from framework.events.projection import ProjectionRunner
from framework.events.typeregistry import EventTypeRegistry
from framework.health import Check
from framework.server import Server
from framework.system.database import ServiceDatabase
from framework.system.feed import ProjectionHook, publish_events
from framework.system.runtime import RuntimeConfig, ServiceRuntime
from gen.order.v1 import events_pb2
from services.order.application import Confirmations, Orders, Reconciler
from services.order.clients import UserDirectory
from services.order.domain import Order
from services.order.projections import OrderListProjection, SqlOrderReadModel
from services.order.servicer import OrderServicer

__all__ = ["SERVICE", "OrderService", "build", "main"]

SERVICE = "order.v1.OrderService"


@dataclass(frozen=True, slots=True)
class OrderService:
    server: Server
    orders: Orders
    db: ServiceDatabase
    runner: ProjectionRunner[object]


async def build(config: RuntimeConfig, confirmations: Confirmations | None = None) -> OrderService:
    runtime = ServiceRuntime(config)
    env = config.extra
    db = await runtime.open_database(EventTypeRegistry.from_modules(events_pb2))
    read_model = SqlOrderReadModel(db)
    await read_model.setup()
    runner: ProjectionRunner[object] = ProjectionRunner(db.store, OrderListProjection(db))  # type: ignore[arg-type]
    if confirmations is None:
        from services.order.sagas import SagaConfirmations

        confirmations = SagaConfirmations(await runtime.channel("saga.v1.SagaService"))
    orders = Orders(
        Repository(db.store, Order),
        read_model,
        UserDirectory(await runtime.channel("user.v1.UserService")),
        confirmations,
        confirm_wait_s=float(env.get("ORDER_CONFIRM_WAIT_S") or 10),
    )
    server = runtime.server(
        health_checks=[Check("database", db.ping, interval_s=5.0, timeout_s=2.0)],
        hooks=[
            ProjectionHook(runner),
            Reconciler(orders, float(env.get("ORDER_RECONCILE_S") or 5)),
        ],
        closing=[db],
    )
    server.add(OrderServicer(orders))
    publish_events(runtime, server, db)
    runtime.register(server, SERVICE)
    return OrderService(server, orders, db, runner)


async def run(config: RuntimeConfig) -> None:
    service = await build(config)
    await service.server.serve()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(run(RuntimeConfig.from_env("order")))


if __name__ == "__main__":
    main()
