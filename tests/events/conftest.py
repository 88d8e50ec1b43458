"""Event store fixtures: one factory per backend, each test on its own database.

`store_factory` opens stores of the parametrized backend on the test's own
SQLite file or PostgreSQL schema (dropped after the test); every store opened
through it shares that data and is closed at teardown.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from framework.events.sqlite import SqliteConfig, SqliteEventStore
from framework.events.upcast import Upcasters
from tests.events.account import account_types

StoreFactory = Callable[..., Awaitable[Any]]


class Backend:
    """Where one test's events live: a SQLite file or a PostgreSQL schema."""

    def __init__(self, name: str, path: Path | None = None, dsn: str = "", schema: str = ""):
        self.name, self.path, self.dsn, self.schema = name, path, dsn, schema
        self.opened: list[Any] = []

    async def open(self, upcasters: Upcasters | None = None, **options: Any) -> Any:
        if self.name == "sqlite":
            assert self.path is not None
            config = SqliteConfig(path=str(self.path), **options)
            store: Any = await SqliteEventStore.open(config, account_types(), upcasters)
        else:
            from framework.events.postgres import PostgresConfig, PostgresEventStore

            pg = PostgresConfig(dsn=self.dsn, schema=self.schema, **options)
            store = await PostgresEventStore.open(pg, account_types(), upcasters)
        self.opened.append(store)
        return store

    async def close(self) -> None:
        for store in self.opened:
            await store.close()
        if self.name == "postgres":
            import asyncpg

            conn = await asyncpg.connect(self.dsn)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
            finally:
                await conn.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """The parametrized backend holding this test's own data (dropped after)."""
    if request.param == "sqlite":
        b = Backend("sqlite", path=tmp_path / "events.db")
    else:
        dsn = request.getfixturevalue("postgres_dsn")
        b = Backend("postgres", dsn=dsn, schema=f"ev_{uuid.uuid4().hex[:16]}")
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
async def store(backend: Backend) -> Any:
    """A store of the parametrized backend on this test's own data."""
    return await backend.open()
