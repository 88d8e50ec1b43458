"""What a developer sees on the console: one span per stdout line, /metrics says its URL."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest
from opentelemetry.sdk.trace.export import ConsoleSpanExporter

from framework.telemetry.prometheus import MetricsEndpoint
from framework.telemetry.sdk import Telemetry, TelemetryConfig


def test_console_spans_are_one_json_line_each() -> None:
    """OTEL_TRACES_EXPORTER=console prints each span as one JSON line on stdout, nothing else."""
    config = TelemetryConfig(service_name="t", traces_exporter="console", batch_spans=False)
    telemetry = Telemetry.build(config)
    assert telemetry.tracer_provider is not None
    exporter = telemetry.span_exporter
    assert isinstance(exporter, ConsoleSpanExporter)
    assert exporter.out is sys.stdout  # where it writes; captured here to read it back
    exporter.out = io.StringIO()
    tracer = telemetry.tracer_provider.get_tracer("test")
    for name in ("first", "second"):
        with tracer.start_as_current_span(name):
            pass
    telemetry.shutdown()
    lines = exporter.out.getvalue().splitlines()
    assert [json.loads(line)["name"] for line in lines] == ["first", "second"]


def test_the_metrics_endpoint_logs_where_it_listens(caplog: pytest.LogCaptureFixture) -> None:
    """Starting /metrics logs its URL (port 0 resolved to the bound port)."""
    telemetry = Telemetry.build(TelemetryConfig(service_name="t"))
    assert telemetry.metric_reader is not None
    endpoint = MetricsEndpoint(telemetry.metric_reader, port=0)
    with caplog.at_level(logging.INFO, logger="framework.telemetry.prometheus"):
        port = endpoint.start()
    try:
        assert f"metrics on http://127.0.0.1:{port}/metrics" in caplog.messages
    finally:
        endpoint.close()
        telemetry.shutdown()
