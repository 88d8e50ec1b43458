"""Composition root of the identity service: config -> store -> server -> serve.

    python -m services.user.main

Environment: the runtime's `SERVICE_*` (see `framework.system.runtime`), plus
`USER_SIGNING_KEY` (PEM file of the ES256 key that signs access tokens; only this
service holds it), `USER_TOKEN_TTL_S` (default 3600) and the Argon2 cost
`USER_ARGON2_TIME_COST`, `USER_ARGON2_MEMORY_KIB` (defaults: argon2-cffi's).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from framework.events.typeregistry import EventTypeRegistry
from framework.health import Check
from framework.server import Server
from framework.system.database import ServiceDatabase
from framework.system.keys import USER_ISSUER, USER_KID, TokenSigner
from framework.system.runtime import RuntimeConfig, ServiceRuntime
from gen.user.v1 import events_pb2
from services.user.application import Users
from services.user.passwords import Argon2Config, Argon2Hasher
from services.user.servicer import UserServicer
from services.user.store import SqlUserStore

__all__ = ["SERVICE", "UserConfig", "UserService", "build", "main"]

logger = logging.getLogger(__name__)

SERVICE = "user.v1.UserService"


@dataclass(frozen=True, slots=True)
class UserConfig:
    runtime: RuntimeConfig
    signing_key_path: str
    token_ttl_s: float = 3600.0
    argon2: Argon2Config = field(default_factory=Argon2Config)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> UserConfig:
        runtime = RuntimeConfig.from_env("user", environ)
        env = runtime.extra
        key = env.get("USER_SIGNING_KEY", "")
        if not key:
            raise ValueError("USER_SIGNING_KEY must name the PEM file of the token signing key")
        defaults = Argon2Config()
        try:
            return cls(
                runtime=runtime,
                signing_key_path=key,
                token_ttl_s=float(env.get("USER_TOKEN_TTL_S") or 3600),
                argon2=Argon2Config(
                    time_cost=int(env.get("USER_ARGON2_TIME_COST") or defaults.time_cost),
                    memory_cost_kib=int(
                        env.get("USER_ARGON2_MEMORY_KIB") or defaults.memory_cost_kib
                    ),
                ),
            )
        except ValueError as error:
            raise ValueError(f"bad USER_* setting: {error}") from None


@dataclass(frozen=True, slots=True)
class UserService:
    server: Server
    users: Users
    db: ServiceDatabase


async def build(config: UserConfig) -> UserService:
    """Open the database and build the server (call `server.start()` or `serve()`)."""
    runtime = ServiceRuntime(config.runtime)
    db = await runtime.open_database(EventTypeRegistry.from_modules(events_pb2))
    store = SqlUserStore(db)
    await store.setup()
    signer = TokenSigner.from_file(
        config.signing_key_path, kid=USER_KID, issuer=USER_ISSUER, audience=config.runtime.audience
    )
    users = Users(store, Argon2Hasher(config.argon2), signer, token_ttl_s=config.token_ttl_s)
    server = runtime.server(
        health_checks=[Check("database", db.ping, interval_s=5.0, timeout_s=2.0)],
        closing=[db],
    )
    server.add(UserServicer(users))
    runtime.register(server, SERVICE)
    return UserService(server, users, db)


async def run(config: UserConfig) -> None:
    service = await build(config)
    await service.server.serve()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(run(UserConfig.from_env()))


if __name__ == "__main__":
    main()
