"""Composition root of the notification service.

    python -m services.notification.main

Environment: the runtime's `SERVICE_*` (see `framework.system.runtime`).  It
consumes the order service's events as consumer group `notification` (from the
order service's event store, or JetStream when `SERVICE_BUS` is a NATS URL).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from framework.events.typeregistry import EventTypeRegistry
from framework.health import Check
from framework.server import Server
from framework.system.database import ServiceDatabase
from framework.system.feed import EventFeed
from framework.system.runtime import RuntimeConfig, ServiceRuntime
from gen.notification.v1 import events_pb2
from services.notification.application import ORDER_EVENT_TYPES, Notifications
from services.notification.servicer import NotificationServicer
from services.notification.store import SqlNotificationStore

__all__ = ["GROUP", "SERVICE", "NotificationService", "build", "main"]

SERVICE = "notification.v1.NotificationService"
GROUP = "notification"


@dataclass(frozen=True, slots=True)
class NotificationService:
    server: Server
    notifications: Notifications
    feed: EventFeed
    db: ServiceDatabase


async def build(config: RuntimeConfig) -> NotificationService:
    runtime = ServiceRuntime(config)
    db = await runtime.open_database(EventTypeRegistry.from_modules(events_pb2))
    store = SqlNotificationStore(db)
    await store.setup()
    notifications = Notifications(store)
    feed = EventFeed(
        runtime,
        db,
        group=GROUP,
        source="order",
        event_types=ORDER_EVENT_TYPES,
        apply=notifications.handle_order_event,
    )
    server = runtime.server(
        health_checks=[Check("database", db.ping, interval_s=5.0, timeout_s=2.0)],
        hooks=[feed],
        closing=[db],
    )
    server.add(NotificationServicer(notifications))
    runtime.register(server, SERVICE)
    return NotificationService(server, notifications, feed, db)


async def run(config: RuntimeConfig) -> None:
    service = await build(config)
    await service.server.serve()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(run(RuntimeConfig.from_env("notification")))


if __name__ == "__main__":
    main()
