"""Composition root of the inventory service: config -> store -> server -> serve.

    python -m services.inventory.main

Environment: `SERVICE_HOST`, `SERVICE_PORT`, `SERVICE_GRACE_S`,
`SERVICE_DRAIN_DELAY_S` (see `ServerConfig.from_env`), `INVENTORY_DB_PATH`
(SQLite file, default `inventory.sqlite3`; ":memory:" for a throwaway run),
`INVENTORY_JWT_SECRET` (HS256 secret of the dev tokens, >= 32 bytes),
`SERVICE_BARRIER_HORIZON_S` / `SERVICE_BARRIER_PRUNE_INTERVAL_S` (how long the saga
barrier keeps a finished saga's rows; `framework.system.barrier`).  Without a
secret the service refuses to start, unless `INVENTORY_DEV=1`: then it makes a
random secret for this run and says so (`python -m services.demo` sets it).
There is no secret in the source code.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from framework.auth.policy import AuthPolicy
from framework.clock import Clock
from framework.config import ServerConfig
from framework.errors import NotFoundError
from framework.health import Check
from framework.policies.accesslog import AccessLogPolicy
from framework.policies.ratelimit import RateLimitPolicy
from framework.policies.validation import ValidationPolicy
from framework.policy import Policy
from framework.saga.retention import BarrierPruner, BarrierRetention
from framework.server import Server
from framework.system.barrier import retention_from_env
from framework.system.runtime import RuntimeConfig, ServiceRuntime
from services.inventory.application import Inventory
from services.inventory.devauth import DevTokens
from services.inventory.servicer import InventoryServicer
from services.inventory.store import SqlInventoryStore, SqliteInventoryStore, inventory_types

__all__ = [
    "DEV_FLAG",
    "InventoryConfig",
    "InventoryService",
    "build",
    "inventory_policies",
    "main",
    "store_check",
]

logger = logging.getLogger(__name__)

SERVICE_NAME = "inventory"
DEV_FLAG = "INVENTORY_DEV"  # =1: a random JWT secret for this run (development only)


@dataclass(frozen=True, slots=True)
class InventoryConfig:
    """Everything the inventory service needs at start-up (`jwt_secret`: >= 32 bytes)."""

    server: ServerConfig
    jwt_secret: str
    db_path: str = "inventory.sqlite3"
    barrier_retention: BarrierRetention = field(default_factory=BarrierRetention)

    def __post_init__(self) -> None:
        if not self.db_path:
            raise ValueError("InventoryConfig.db_path must not be empty (':memory:' for none)")
        if len(self.jwt_secret.encode()) < 32:
            raise ValueError("InventoryConfig.jwt_secret must be at least 32 bytes long")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> InventoryConfig:
        """`SERVICE_*` for the server, `INVENTORY_DB_PATH`, `INVENTORY_JWT_SECRET` (or
        `INVENTORY_DEV=1`); ValueError saying what to set when there is no secret."""
        env = os.environ if environ is None else environ
        secret = env.get("INVENTORY_JWT_SECRET") or ""
        if not secret:
            if env.get(DEV_FLAG, "").lower() not in ("1", "true"):
                raise ValueError(
                    "INVENTORY_JWT_SECRET is not set: give the HS256 secret (>= 32 bytes) its "
                    f"tokens are signed with, or set {DEV_FLAG}=1 for a random development "
                    "secret (what `make run` / `python -m services.demo` do)"
                )
            secret = secrets.token_urlsafe(32)
            logger.warning(
                "%s=1: DEVELOPMENT MODE, a random JWT secret for this run; tokens minted now "
                "stop working when the process stops",
                DEV_FLAG,
            )
        return cls(
            server=ServerConfig.from_env(SERVICE_NAME, env),
            jwt_secret=secret,
            db_path=env.get("INVENTORY_DB_PATH") or "inventory.sqlite3",
            barrier_retention=retention_from_env(env),
        )


def inventory_policies(tokens: DevTokens, *, clock: Clock | None = None) -> list[Policy]:
    """The server chain, outermost first: log, authenticate, limit per caller, validate.

    Rate limits come from the contract (`AddStock`: 50/s, burst 100, per verified
    subject), so the limit runs after authentication.
    """
    return [
        AccessLogPolicy(),
        AuthPolicy(tokens.verifier()),
        RateLimitPolicy(clock=clock),
        ValidationPolicy(),
    ]


def store_check(store: SqlInventoryStore) -> Check:
    """Required health check: the store answers a query."""
    return Check("database", store.ping, interval_s=5.0, timeout_s=2.0)


class _CloseStore:
    """Server hook: close the store once the server has drained."""

    def __init__(self, store: SqlInventoryStore) -> None:
        self.store = store

    async def on_stopped(self, server: Server) -> None:
        await self.store.close()


@dataclass(frozen=True, slots=True)
class InventoryService:
    """A built (not yet started) inventory service and its collaborators."""

    server: Server
    inventory: Inventory
    store: SqlInventoryStore
    tokens: DevTokens
    pruner: BarrierPruner


async def build(
    config: InventoryConfig,
    *,
    clock: Clock | None = None,
    extra_policies: Sequence[Policy] = (),
) -> InventoryService:
    """Open the store and build the server (call `server.start()` or `serve()`)."""
    store = SqliteInventoryStore(config.db_path, clock=clock)
    await store.open()
    inventory = Inventory(store, clock=clock)
    tokens = DevTokens(config.jwt_secret)
    pruner = store.barrier.pruner(config.barrier_retention)
    server = Server(
        config.server,
        policies=[*inventory_policies(tokens, clock=clock), *extra_policies],
        # framework.health.Check is frozen but HealthCheck declares settable members
        health_checks=[store_check(store)],
        hooks=[pruner, _CloseStore(store)],
    )
    server.add(InventoryServicer(inventory))
    return InventoryService(server, inventory, store, tokens, pruner)


async def run(config: InventoryConfig) -> None:
    service = await build(config)
    await service.server.serve()


def parse_seed(text: str) -> list[tuple[str, int]]:
    """`INVENTORY_SEED`: "SKU=quantity,..." (ValueError naming a bad entry)."""
    seed: list[tuple[str, int]] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        sku, sep, quantity = item.partition("=")
        if not sep or not sku or not quantity.isdigit() or int(quantity) < 1:
            raise ValueError(f"INVENTORY_SEED entries look like SKU=quantity, got {item!r}")
        seed.append((sku, int(quantity)))
    return seed


class _Seed:
    """Server hook: stock each seeded SKU that was never stocked.

    A SKU with a stock row is left alone, so a restart adds nothing even after the
    barrier pruned the seed's key; replicas starting at once share the key, so the
    barrier adds it once.
    """

    def __init__(self, inventory: Inventory, seed: Sequence[tuple[str, int]]) -> None:
        self.inventory = inventory
        self.seed = tuple(seed)

    async def on_started(self, server: Server) -> None:
        for sku, quantity in self.seed:
            try:
                await self.inventory.get_stock(sku)
                continue
            except NotFoundError:
                pass
            await self.inventory.add_stock(sku, quantity, idempotency_key=f"seed:{sku}:{quantity}")


async def build_in_system(config: RuntimeConfig, *, clock: Clock | None = None) -> InventoryService:
    """Inventory as a process of a system (`python -m framework up`): the system's token
    keys, registration, fault and breaker admin; stock from `INVENTORY_SEED`.

    The store is the system's database for the service (`SERVICE_STORE`: a SQLite file,
    or its own PostgreSQL schema), like every other service's.
    """
    env = config.extra
    runtime = ServiceRuntime(config)
    db = await runtime.open_database(inventory_types())
    store = SqlInventoryStore(db, clock=clock)
    await store.setup()
    inventory = Inventory(store, clock=clock)
    pruner = store.barrier.pruner(retention_from_env(env))
    server = runtime.server(
        health_checks=[store_check(store)],
        hooks=[pruner, _Seed(inventory, parse_seed(env.get("INVENTORY_SEED", "")))],
        closing=[store],
    )
    server.add(InventoryServicer(inventory))
    runtime.register(server, "inventory.v1.InventoryService")
    # tokens are the system's (JWKS); this minter's random secret verifies nothing here
    tokens = DevTokens(secrets.token_urlsafe(32))
    return InventoryService(server, inventory, store, tokens, pruner)


async def _run_in_system(config: RuntimeConfig) -> None:
    service = await build_in_system(config)
    await service.server.serve()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if os.environ.get("SERVICE_JWKS"):  # started by `python -m framework up`
        asyncio.run(_run_in_system(RuntimeConfig.from_env("inventory")))
        return
    try:
        config = InventoryConfig.from_env()
    except ValueError as error:
        raise SystemExit(f"inventory: {error}") from None
    asyncio.run(run(config))


if __name__ == "__main__":
    main()
