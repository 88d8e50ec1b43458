"""Shared fixtures: reachability of the real servers some tests need.

Tests that need PostgreSQL, Redis or NATS use the `postgres_dsn`, `redis_url` or
`nats_url` fixtures. When the server does not answer they skip with the reason,
unless REQUIRE_SERVICES=1 (CI), where they fail instead.
"""

from __future__ import annotations

import os
import socket

# grpc core logs connection teardown at INFO; keep test output readable (set before import)
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import pytest

POSTGRES_DSN = os.environ.get("TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
NATS_URL = os.environ.get("TEST_NATS_URL", "nats://127.0.0.1:4222")


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _need(name: str, host: str, port: int) -> None:
    if _answers(host, port):
        return
    message = f"{name} does not answer on {host}:{port}"
    if os.environ.get("REQUIRE_SERVICES") == "1":
        pytest.fail(f"{message} (REQUIRE_SERVICES=1: start it, see .ci/run)")
    pytest.skip(f"{message}; set REQUIRE_SERVICES=1 to make this a failure")


@pytest.fixture
def postgres_dsn() -> str:
    """DSN of the test PostgreSQL database; skips (or fails in CI) when unreachable."""
    _need("PostgreSQL", "127.0.0.1", 5432)
    return POSTGRES_DSN


@pytest.fixture
def redis_url() -> str:
    """URL of the test Redis; skips (or fails in CI) when unreachable."""
    _need("Redis", "127.0.0.1", 6379)
    return REDIS_URL


@pytest.fixture
def nats_url() -> str:
    """URL of the test NATS JetStream server; skips (or fails in CI) when unreachable."""
    _need("NATS", "127.0.0.1", 4222)
    return NATS_URL
