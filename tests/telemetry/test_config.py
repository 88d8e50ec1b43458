"""TelemetryConfig from OTEL_* variables, and what Telemetry.build makes of it."""

from __future__ import annotations

import io
import json
import logging
import multiprocessing

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from framework.policy import Method
from framework.telemetry.logs import JsonFormatter, PlainFormatter, configure_logging
from framework.telemetry.sdk import Telemetry, TelemetryConfig, build_sampler


def test_from_env_reads_the_standard_variables() -> None:
    """OTEL_SERVICE_NAME, sampler, exporters, endpoint and resource attributes are read."""
    config = TelemetryConfig.from_env(
        {
            "OTEL_SERVICE_NAME": "orders",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.25",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=dev, team=shop",
            "OTEL_EXPORTER_PROMETHEUS_PORT": "0",
        }
    )
    assert config.service_name == "orders"
    assert config.sampler == "parentbased_traceidratio" and config.sampler_ratio == 0.25
    assert config.traces_exporter == "otlp"  # because an endpoint is set
    assert config.otlp_endpoint == "http://collector:4317"
    assert dict(config.resource_attributes) == {"deployment.environment": "dev", "team": "shop"}
    assert config.prometheus_port == 0
    assert (
        "TraceIdRatioBased{0.25}"
        in build_sampler(config.sampler, config.sampler_ratio).get_description()
    )


def test_from_env_defaults_without_a_collector() -> None:
    """With nothing set, no span exporter is configured and the service name is the spec's."""
    config = TelemetryConfig.from_env({})
    assert config.traces_exporter == "none" and config.service_name == "unknown_service"


def test_bad_values_name_the_variable() -> None:
    """An unknown sampler is refused with the variable's name in the message."""
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER"):
        TelemetryConfig.from_env({"OTEL_TRACES_SAMPLER": "sometimes"})
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER_ARG"):
        TelemetryConfig(sampler_ratio=2.0)


def test_sdk_disabled_builds_nothing_and_binds_nothing() -> None:
    """OTEL_SDK_DISABLED=true: no providers, and both policies bind to no hook at all."""
    telemetry = Telemetry.build(TelemetryConfig.from_env({"OTEL_SDK_DISABLED": "true"}))
    assert telemetry.tracer_provider is None and telemetry.meter_provider is None
    method = Method.resolve("/echo.v1.EchoService/Echo")
    assert [p.bind(method) for p in telemetry.policies()] == [None, None]


def test_memory_exporter_for_tests() -> None:
    """traces_exporter=memory gives an in-memory exporter that spans reach at once."""
    telemetry = Telemetry.build(TelemetryConfig(service_name="t", traces_exporter="memory"))
    assert isinstance(telemetry.span_exporter, InMemorySpanExporter)
    assert telemetry.tracer_provider is not None
    with telemetry.tracer_provider.get_tracer("t").start_as_current_span("work"):
        pass
    assert [s.name for s in telemetry.span_exporter.get_finished_spans()] == ["work"]
    telemetry.shutdown()


def test_json_formatter_writes_extras_and_exceptions() -> None:
    """Extra fields become keys; an exception is formatted; outside spans there is no trace id."""
    stream = io.StringIO()
    logger = logging.getLogger("tests.telemetry.json")
    handler = configure_logging(stream=stream, logger=logger, service="svc")
    try:
        logger.info("done %s", "ok", extra={"duration_ms": 1.5, "code": "OK", "peer": "ipv4:1"})
        try:
            raise ValueError("bad")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "done ok" and first["service"] == "svc"
    assert first["duration_ms"] == 1.5 and first["code"] == "OK" and first["peer"] == "ipv4:1"
    assert "trace_id" not in first
    assert first["ts"].endswith("+00:00")
    assert second["level"] == "ERROR" and "ValueError: bad" in second["exception"]
    assert isinstance(handler.formatter, JsonFormatter)


def test_log_lines_of_a_named_process_say_its_name() -> None:
    """In a worker process (named `worker-<index>` by its server), JSON lines carry
    `process` and plain lines start with `[worker-<index>]`; the main process adds nothing."""
    record_args = ("tests.telemetry.plain", logging.INFO, __file__, 1, "hello", None, None)
    stream = io.StringIO()
    logger = logging.getLogger("tests.telemetry.process")
    handler = configure_logging(stream=stream, logger=logger)
    plain = PlainFormatter("%(levelname)s %(name)s: %(message)s")
    process = multiprocessing.current_process()
    name = process.name
    try:
        logger.info("main")
        main_plain = plain.format(logging.LogRecord(*record_args))
        process.name = "worker-3"
        logger.info("worker")
        worker_plain = plain.format(logging.LogRecord(*record_args))
    finally:
        process.name = name
        logger.removeHandler(handler)
    main, worker = (json.loads(line) for line in stream.getvalue().splitlines())
    assert "process" not in main and worker["process"] == "worker-3"
    assert main_plain == "INFO tests.telemetry.plain: hello"
    assert worker_plain == "[worker-3] INFO tests.telemetry.plain: hello"
