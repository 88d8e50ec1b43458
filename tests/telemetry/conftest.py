"""Fixtures for the observability tests: telemetry with in-memory exporters."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from framework.telemetry.sdk import Telemetry, TelemetryConfig


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    """Tracing and metrics into memory: spans exported synchronously, metrics pulled."""
    config = TelemetryConfig(service_name="test", traces_exporter="memory")
    built = Telemetry.build(config)
    yield built
    built.shutdown()
