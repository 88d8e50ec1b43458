"""Registry fixtures: a store per backend (SQLite file, PostgreSQL schema), each test its own."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from framework.registry.sqlite import SqliteStore
from framework.registry.store import RegistryStore
from tests.registry.fleet import Backend


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RegistryStore]:
    """An open, empty store of each backend; PostgreSQL gets a schema of its own."""
    if request.param == "sqlite":
        sqlite = SqliteStore(tmp_path / "registry.sqlite")
        await sqlite.open()
        yield sqlite
        await sqlite.close()
        return
    dsn: str = request.getfixturevalue("postgres_dsn")
    from framework.registry.postgres import PostgresStore

    pg = PostgresStore(dsn, schema=f"reg_{uuid.uuid4().hex[:12]}")
    await pg.open()
    try:
        yield pg
    finally:
        await pg.drop()
        await pg.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """A SQLite file or a PostgreSQL schema of the test's own (dropped afterwards)."""
    if request.param == "sqlite":
        path = tmp_path / "registry.sqlite"
        yield Backend("sqlite", lambda: SqliteStore(path))
        return
    dsn: str = request.getfixturevalue("postgres_dsn")
    from framework.registry.postgres import PostgresStore

    schema = f"reg_{uuid.uuid4().hex[:12]}"
    try:
        yield Backend("postgres", lambda: PostgresStore(dsn, schema=schema))
    finally:
        await PostgresStore(dsn, schema=schema).drop()
