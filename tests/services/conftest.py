"""Fixtures of the example system's service tests (see tests/services/kit.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.services.kit import Backend, Keys, drop_schemas, make_keys


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    """Fresh development keys for this test."""
    return make_keys(tmp_path / "keys")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """The parametrized backend of this test's services (PostgreSQL schemas dropped after)."""
    if request.param == "sqlite":
        yield Backend("sqlite", tmp_path)
        return
    dsn = request.getfixturevalue("postgres_dsn")
    prefix = f"t{uuid.uuid4().hex[:12]}"
    try:
        yield Backend("postgres", tmp_path, dsn, prefix)
    finally:
        await drop_schemas(dsn, prefix)
