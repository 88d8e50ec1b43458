"""The example system in-process for fuzzing: every service, the saga orchestrator, a registry
and the gateway, on 127.0.0.1 port 0, on an event loop of their own in a thread.

The fuzz tests are synchronous (hypothesis drives them) and call the servers with the
plain grpc library and httpx, so nothing of the framework's client sits between the
fuzzer and the server; `Shop.run(coro)` runs a coroutine on the servers' loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from framework.chaos.system import Database, ProcessView, SystemView
from framework.system.keys import TokenFile
from tests.services.kit import AUDIENCE, Backend, Keys, make_keys, runtime_config, start_registry

T = TypeVar("T")
# the services' own tokens outlive the longest fuzz run (`make fuzz` takes ~15 min on a
# loaded machine; the kit's 10 min tokens expired half-way: every order UNAUTHENTICATED)
TOKEN_TTL_S = 6 * 3600.0

ALL_SCOPES = [
    "operator",
    "registry:read",
    "registry:register",
    "registry:admin",
    "events:read",
    "events:append",
    "events:subscribe",
    "sagas:read",
    "sagas:write",
    "users:read",
    "users:write",
    "users:admin",
    "orders:read",
    "orders:write",
    "orders:admin",
    "payments:read",
    "payments:write",
    "payments:admin",
    "notifications:read",
    "notifications:write",
    "notifications:admin",
    "inventory:read",
    "inventory:write",
]
SEED = "WIDGET-1=100,GADGET-2=50"


@dataclass
class Shop:
    keys: Keys
    directory: Path
    loop: asyncio.AbstractEventLoop
    servers: dict[str, Any] = field(default_factory=dict)  # name -> framework Server
    gateway_url: str = ""
    closers: list[Any] = field(default_factory=list)

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 60.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout_s)

    @property
    def operator_token(self) -> str:
        return self.keys.platform.mint("operator", ALL_SCOPES, ttl_s=TOKEN_TTL_S).token

    def view(self) -> SystemView:
        """The shop's databases, as the chaos invariants read them."""
        names = ["user", "order", "payment", "notification", "sagas"]
        databases = {n: Database(sqlite_path=str(self.directory / f"{n}.sqlite3")) for n in names}
        inventory = ProcessView(
            "inventory-1",
            None,
            "running",
            0,
            {
                "INVENTORY_DB_PATH": str(self.directory / "inventory.sqlite3"),
                "INVENTORY_SEED": SEED,
            },
        )
        return SystemView(databases, processes=[inventory])


async def _start(shop: Shop) -> None:
    from framework.auth.bearer import BearerToken
    from framework.client import connect
    from framework.gateway import GatewayConfig, build_gateway, running
    from framework.system.keys import PLATFORM_ISSUER, USER_ISSUER
    from framework.system.sagas import build as build_sagas
    from services.inventory.main import build_in_system as build_inventory
    from services.notification.main import build as build_notification
    from services.order.main import build as build_order
    from services.order.saga import definitions
    from services.payment.main import build as build_payment
    from services.user.main import UserConfig
    from services.user.main import build as build_user
    from services.user.passwords import Argon2Config

    keys, tmp = shop.keys, shop.directory
    backend = Backend("sqlite", tmp)
    registry_server, registry = await start_registry(tmp)
    shop.servers["registry"] = registry_server
    shop.closers.append(registry)
    at = registry_server.address

    def token(name: str, scopes: list[str], groups: list[str] | None = None) -> str:
        claims: dict[str, object] = {"services": [], "groups": groups or [name]}
        path = tmp / f"service-{name}.jwt"
        scopes = ["registry:register", "registry:read", *scopes]
        TokenFile(path).write(
            keys.platform.mint(f"service:{name}", scopes, ttl_s=TOKEN_TTL_S, claims=claims)
        )
        return str(path)

    def config(name: str, scopes: list[str], **extra: str) -> Any:
        return runtime_config(
            name, keys, backend, registry=at, token_file=token(name, scopes), **extra
        )

    user = await build_user(
        UserConfig(
            config("user", []),
            signing_key_path=str(keys.files.user_signing),
            argon2=Argon2Config(time_cost=1, memory_cost_kib=1024, parallelism=1),
        )
    )
    inventory = await build_inventory(
        config(
            "inventory",
            [],
            INVENTORY_DB_PATH=str(tmp / "inventory.sqlite3"),
            INVENTORY_SEED=SEED,
        )
    )
    payment = await build_payment(config("payment", [], PAYMENT_DECLINE_ABOVE_MINOR="100000"))
    notification = await build_notification(
        config("notification", ["events:read", "events:subscribe"])
    )
    for name, service in (
        ("user", user),
        ("inventory", inventory),
        ("payment", payment),
        ("notification", notification),
    ):
        await service.server.start()
        shop.servers[name] = service.server
    saga_token = keys.platform.mint(
        "service:sagas",
        ["inventory:write", "payments:write", "notifications:write"],
        ttl_s=TOKEN_TTL_S,
    ).token
    channels = {
        "inventory.v1.InventoryService": connect(
            inventory.server.address, policies=[BearerToken(saga_token)]
        ),
        "payment.v1.PaymentService": connect(
            payment.server.address, policies=[BearerToken(saga_token)]
        ),
        "notification.v1.NotificationService": connect(
            notification.server.address, policies=[BearerToken(saga_token)]
        ),
    }
    shop.closers.extend(channels.values())
    sagas = await build_sagas(config("sagas", []), definitions(), channels)
    await sagas.server.start()
    shop.servers["sagas"] = sagas.server
    order = await build_order(
        config("order", ["users:read", "users:admin", "sagas:read", "sagas:write"])
    )
    await order.server.start()
    shop.servers["order"] = order.server

    gateway = build_gateway(
        GatewayConfig(
            port=0,
            backends={
                "user.v1.UserService": user.server.address,
                "order.v1.OrderService": order.server.address,
                "inventory.v1.InventoryService": inventory.server.address,
                "payment.v1.PaymentService": payment.server.address,
                "notification.v1.NotificationService": notification.server.address,
            },
            jwks_file=str(keys.files.jwks),
            jwt_issuer=(USER_ISSUER, PLATFORM_ISSUER),
            jwt_audience=AUDIENCE,
            rate_per_s=100_000,
            burst=100_000,
        ),
    )
    context = running(gateway)
    shop.gateway_url = await context.__aenter__()
    shop.closers.append(context)


async def _stop(shop: Shop) -> None:
    for closer in reversed(shop.closers):
        if hasattr(closer, "__aexit__"):
            await closer.__aexit__(None, None, None)
    for name in ("order", "sagas", "notification", "payment", "inventory", "user", "registry"):
        server = shop.servers.get(name)
        if server is not None:
            await server.stop(0.5)
    for closer in shop.closers:
        if not hasattr(closer, "__aexit__"):
            await closer.close()


class ShopThread:
    """Start the shop on its own loop in a thread; `stop()` ends everything."""

    def __init__(self, directory: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-shop", daemon=True)
        self.thread.start()
        self.shop = Shop(make_keys(directory / "keys"), directory, self.loop)

    def start(self) -> Shop:
        self.shop.run(_start(self.shop), timeout_s=120)
        return self.shop

    def stop(self) -> None:
        try:
            self.shop.run(_stop(self.shop), timeout_s=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)
            self.loop.close()
