"""A small world for saga tests: inventory, payment and notification participants on
127.0.0.1:0 (real gRPC, real chains), and channels an orchestrator can use.

`World.open(tmp_path, ...)` starts the three participants; `world.participants()`
gives `Participants` for an orchestrator (framework channels, the inventory one
with a bearer token); the participants' own state is read back through their
stores, never through the orchestrator.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from framework.auth.policy import BearerToken
from framework.client import connect
from framework.config import ServerConfig
from framework.events.sqlite import SqliteConfig, SqliteEventStore
from framework.policies.validation import ValidationPolicy
from framework.policy import Policy
from framework.saga import Participants, saga_types
from framework.server import Server
from gen.notification.v1 import notification_pb2 as notif
from gen.payment.v1 import payment_pb2 as pay
from services.inventory.application import Inventory
from services.inventory.devauth import DevTokens
from services.inventory.main import inventory_policies
from services.inventory.servicer import InventoryServicer
from services.inventory.store import SqliteInventoryStore
from tests.saga.participants import Ledger, NotificationServicer, PaymentServicer, SqliteLedger

# the saga tests' own HS256 secret; fixed, because orchestrator_process.py (a subprocess)
# must verify the tokens the test process mints
DEV_SECRET = "saga-tests-only-hs256-secret-0123456789"

TOKENS = DevTokens(DEV_SECRET)
WRITER = TOKENS.mint("orchestrator", ["inventory:read", "inventory:write"])
SKU = "WIDGET-1"


def server_config(port: int = 0) -> ServerConfig:
    # payment and notification participants run without an AuthPolicy in these tests
    return ServerConfig(
        name="participant", host="127.0.0.1", port=port, grace_s=0.5, insecure_dev=True
    )


async def start_server(servicer: Any, policies: Sequence[Policy], port: int = 0) -> Server:
    server = Server(server_config(port), policies=policies)
    server.add(servicer)
    await server.start()
    return server


@dataclass
class World:
    """Three running participants and what the tests read back."""

    stack: AsyncExitStack
    inventory: Inventory
    ledger: Ledger
    payment: PaymentServicer
    notifications: NotificationServicer
    servers: dict[str, Server]
    payment_target: str
    channels: list[Any] = field(default_factory=list)
    payment_channels: list[Any] = field(default_factory=list)
    server_policies: list[Policy] = field(default_factory=list)

    @classmethod
    async def open(
        cls,
        tmp_path: Path,
        *,
        stock: int = 100,
        users: dict[str, int] | None = None,
        decline: Callable[[pay.ChargePaymentRequest], bool] | None = None,
        fail_notify: Callable[[notif.SendNotificationRequest], bool] | None = None,
        ledger: Ledger | None = None,
        payment_port: int | None = 0,
        server_policies: Sequence[Policy] = (),
    ) -> World:
        """Start the participants; `payment_port=None` leaves payment down (address reserved)."""
        stack = AsyncExitStack()
        store = SqliteInventoryStore(str(tmp_path / f"inventory-{uuid.uuid4().hex[:6]}.db"))
        await store.open()
        stack.push_async_callback(store.close)
        inventory = Inventory(store)
        await inventory.add_stock(SKU, stock, "seed")
        if ledger is None:
            ledger = SqliteLedger(str(tmp_path / f"ledger-{uuid.uuid4().hex[:6]}.db"), decline)
            stack.push_async_callback(ledger.close)
        for user, balance in (users or {}).items():
            await ledger.open_account(user, balance)
        notifications = NotificationServicer(
            str(tmp_path / f"notify-{uuid.uuid4().hex[:6]}.db"), fail_notify or (lambda _: False)
        )
        stack.push_async_callback(notifications.close)
        servers: dict[str, Server] = {}
        inventory_server = await start_server(
            InventoryServicer(inventory), [*server_policies, *inventory_policies(TOKENS)]
        )
        stack.push_async_callback(inventory_server.stop, 0)
        servers["inventory"] = inventory_server
        payment = PaymentServicer(ledger)
        world = cls(stack, inventory, ledger, payment, notifications, servers, "")
        world.server_policies = list(server_policies)
        if payment_port is None:
            world.payment_target = f"127.0.0.1:{free_port()}"
        else:
            await world.start_payment(payment_port)
        notify_server = await start_server(notifications, [*server_policies, ValidationPolicy()])
        stack.push_async_callback(notify_server.stop, 0)
        servers["notification"] = notify_server
        return world

    async def start_payment(self, port: int = 0) -> None:
        """Start the payment participant, on `port` or the reserved address; nothing to do
        when it already runs (a second server cannot bind the port: SO_REUSEPORT is off)."""
        if "payment" in self.servers:
            return
        if port == 0 and self.payment_target:
            port = int(self.payment_target.rpartition(":")[2])
        server = await start_server(self.payment, [*self.server_policies, ValidationPolicy()], port)
        self.stack.push_async_callback(server.stop, 0)
        self.servers["payment"] = server
        self.payment_target = server.address

    def participants(self, extra: Sequence[Policy] = ()) -> Participants:
        inventory = connect(
            self.servers["inventory"].address, policies=[*extra, BearerToken(WRITER)]
        )
        payment = connect(self.payment_target, policies=list(extra))
        self.payment_channels.append(payment)
        notification = connect(self.servers["notification"].address, policies=list(extra))
        self.channels.extend([inventory, payment, notification])
        return Participants(
            {
                "inventory.v1.InventoryService": inventory,
                "payment.v1.PaymentService": payment,
                "notification.v1.NotificationService": notification,
            }
        )

    async def payment_reachable(self) -> None:
        """Wait until the orchestrators' payment channels have reconnected (bounded)."""
        for channel in self.payment_channels:
            await asyncio.wait_for(channel.channel_ready(), 30)

    async def reserved(self) -> int:
        return (await self.inventory.get_stock(SKU)).reserved

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
        await self.stack.aclose()


def free_port() -> int:
    """A port nothing listens on now (for a participant that is down)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def saga_store(path: Path) -> SqliteEventStore:
    """A SQLite event store that knows the saga events."""
    return await SqliteEventStore.open(SqliteConfig(path=str(path)), saga_types())
