"""Shared set-up for the example system's service tests: keys, tokens, runtime configs.

Each test gets its own keys (in its tmp dir), its own database (a SQLite file or a
PostgreSQL schema dropped afterwards) and servers on 127.0.0.1 port 0.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from framework.config import ServerConfig
from framework.system.keys import (
    PLATFORM_ISSUER,
    PLATFORM_KID,
    USER_ISSUER,
    USER_KID,
    KeyFiles,
    TokenFile,
    TokenSigner,
    ensure_dev_keys,
)
from framework.system.runtime import RuntimeConfig

AUDIENCE = "testsystem"
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Keys:
    files: KeyFiles
    platform: TokenSigner
    users: TokenSigner

    def token(self, subject: str, scopes: Iterable[str]) -> str:
        """A platform token (operator or workload) for `subject` with `scopes`."""
        return self.platform.mint(subject, scopes, ttl_s=600).token

    def customer(self, user_id: str, scopes: Iterable[str]) -> str:
        """A customer's token, as the user service signs it."""
        return self.users.mint(user_id, scopes, ttl_s=600).token

    def token_file(
        self,
        directory: Path,
        subject: str,
        scopes: Iterable[str],
        claims: Mapping[str, object] | None = None,
    ) -> str:
        path = directory / f"{subject.replace(':', '-')}.jwt"
        TokenFile(path).write(self.platform.mint(subject, scopes, ttl_s=600, claims=claims))
        return str(path)


def make_keys(directory: Path) -> Keys:
    files = ensure_dev_keys(directory)
    return Keys(
        files,
        TokenSigner.from_file(
            files.platform_signing, kid=PLATFORM_KID, issuer=PLATFORM_ISSUER, audience=AUDIENCE
        ),
        TokenSigner.from_file(
            files.user_signing, kid=USER_KID, issuer=USER_ISSUER, audience=AUDIENCE
        ),
    )


@dataclass(frozen=True, slots=True)
class Backend:
    """Where one test's service data lives: a SQLite directory or a PostgreSQL DSN + prefix."""

    name: str
    directory: Path
    dsn: str = ""
    prefix: str = ""

    def store(self, service: str) -> tuple[str, str]:
        """(store URL, schema) of `service`'s own database."""
        if self.name == "sqlite":
            return f"sqlite:{self.directory / f'{service}.sqlite3'}", ""
        return self.dsn, f"{self.prefix}_{service}"


def runtime_config(
    name: str,
    keys: Keys,
    backend: Backend | None = None,
    *,
    registry: str = "",
    token_file: str = "",
    **extra: str,
) -> RuntimeConfig:
    store_url, schema = backend.store(name) if backend else ("", "")
    return RuntimeConfig(
        name=name,
        server=ServerConfig(name=name, port=0, grace_s=2.0),
        jwks_path=str(keys.files.jwks),
        audience=AUDIENCE,
        registry=registry,
        token_file=token_file,
        store_url=store_url,
        store_schema=schema,
        registration_ttl_s=5.0,
        extra=extra,
    )


async def drop_schemas(dsn: str, prefix: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", f"{prefix}\\_%"
        )
        for row in rows:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{row[0]}" CASCADE')
    finally:
        await conn.close()


async def start_registry(directory: Path) -> tuple[Any, Any]:
    """An in-process registry on 127.0.0.1:0 (SQLite); returns (server, registry)."""
    from framework.registry.health_probe import ProbeConfig
    from framework.registry.registry import Registry, RegistryConfig
    from framework.registry.service import RegistryServicer
    from framework.registry.sqlite import SqliteStore
    from framework.server import Server

    registry = Registry(
        SqliteStore(directory / "registry.sqlite3"),
        RegistryConfig(sweep_interval_s=0.5, probe=ProbeConfig(interval_s=0.5)),
    )
    await registry.start()
    # an anonymous test registry: the system tests' services register without grants
    server = Server(ServerConfig(name="registry", port=0, grace_s=0.5, insecure_dev=True))
    server.add(RegistryServicer(registry))
    await server.start()
    return server, registry


async def poll(check: Callable[[], Awaitable[T | None]], *, timeout_s: float = 60.0) -> T:
    """`check()` until it returns something other than None (bounded; no fixed sleeps)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    delay = 0.02
    while True:
        found = await check()
        if found is not None:
            return found
        if loop.time() >= deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.25)


async def cut_waiting_on(
    dsn: str, schema: str, table: str, trigger: Callable[[], Awaitable[object]]
) -> int:
    """Cut the connections of a transaction in the middle: hold an ACCESS EXCLUSIVE lock on
    `schema.table`, run `trigger()` (whose transaction then waits for the lock after its
    earlier statements), terminate exactly the backends waiting on that table
    (`pg_locks`, so nobody else's connection), then release; how many were cut."""
    import asyncpg

    admin = await asyncpg.connect(dsn)
    blocker = await asyncpg.connect(dsn)
    waiting = "SELECT DISTINCT pid FROM pg_locks WHERE NOT granted AND relation = $1::regclass"
    relation = f'"{schema}".{table}'
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute(f"LOCK TABLE {relation} IN ACCESS EXCLUSIVE MODE")
        triggered = asyncio.ensure_future(trigger())
        try:
            pids: list[int] = []
            for _ in range(1000):  # bounded: ~20 s
                pids = [r["pid"] for r in await admin.fetch(waiting, relation)]
                if pids:
                    break
                await asyncio.sleep(0.02)
            ended = 0
            for pid in pids:
                ended += bool(await admin.fetchval("SELECT pg_terminate_backend($1)", pid))
            return ended
        finally:
            await tx.rollback()
            await asyncio.wait([triggered])
    finally:
        await blocker.close()
        await admin.close()
