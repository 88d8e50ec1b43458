"""Telemetry set-up from the standard `OTEL_*` variables: providers, exporters, policies.

    config = TelemetryConfig.from_env()          # at start-up, in the composition root
    telemetry = Telemetry.build(config)
    server = Server(..., policies=[*telemetry.policies(), ...])
    breaker = CircuitBreakerPolicy(config, on_state_change=telemetry.breaker_listener())
    ...
    telemetry.shutdown()

Spans are exported in batches by `framework.telemetry.batcher.SpanBatcher` (the
SDK's `BatchSpanProcessor` job at a fraction of its per-span cost).  Providers are
built here and passed into the policies; nothing is installed as
a global (call `opentelemetry.trace.set_tracer_provider` yourself if third-party
instrumentation needs one).  Exporters: `otlp` (when the optional package
`opentelemetry-exporter-otlp-proto-grpc` is installed), `console` for
development, `memory` for tests, `none`.  With `OTEL_SDK_DISABLED=true` no
provider is built and the policies bind to nothing: zero cost per call.

Variables read (https://opentelemetry.io/docs/specs/otel/configuration/sdk-environment-variables/):
OTEL_SDK_DISABLED, OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_EXPORTER,
OTEL_METRICS_EXPORTER, OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_TRACES_SAMPLER,
OTEL_TRACES_SAMPLER_ARG, OTEL_BSP_SCHEDULE_DELAY, OTEL_BSP_MAX_QUEUE_SIZE,
OTEL_BSP_MAX_EXPORT_BATCH_SIZE, OTEL_METRIC_EXPORT_INTERVAL, OTEL_EXPORTER_PROMETHEUS_HOST,
OTEL_EXPORTER_PROMETHEUS_PORT; and FRAMEWORK_METRICS_NAMING (`otel`, the default,
or `grpc_prometheus`: see `framework.telemetry.names`).  One deviation: the traces
exporter defaults to `otlp` only when an OTLP endpoint is set, else `none`, so a
laptop without a collector does not log export failures.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, MetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace import sampling as samplers
from opentelemetry.sdk.trace.export import (
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from framework.policy import Policy
from framework.telemetry.batcher import SpanBatcher
from framework.telemetry.metrics import (
    BreakerListener,
    MetricsPolicy,
    RpcMetrics,
    StorePeriodicReader,
    StoreReader,
)
from framework.telemetry.names import NAMINGS, OTEL
from framework.telemetry.tracing import TracingPolicy

logger = logging.getLogger(__name__)

TRACE_EXPORTERS = frozenset({"otlp", "console", "memory", "none"})
METRIC_EXPORTERS = frozenset({"otlp", "console", "prometheus", "none"})
SAMPLERS = frozenset(
    {
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    }
)
OTLP_PACKAGE = "opentelemetry-exporter-otlp-proto-grpc"


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """What to build; `from_env()` reads the standard variables."""

    service_name: str = "unknown_service"
    disabled: bool = False
    traces_exporter: str = "none"
    metrics_exporter: str = "prometheus"
    otlp_endpoint: str = ""
    sampler: str = "parentbased_always_on"
    sampler_ratio: float = 1.0
    resource_attributes: tuple[tuple[str, str], ...] = ()
    metric_export_interval_s: float = 60.0
    prometheus_host: str = "127.0.0.1"
    prometheus_port: int = 9464
    batch_spans: bool = True
    metrics_naming: str = OTEL
    span_schedule_delay_s: float = 5.0
    span_queue_size: int = 2048
    span_batch_size: int = 512

    def __post_init__(self) -> None:
        if not self.service_name:
            raise ValueError("service_name must not be empty (set OTEL_SERVICE_NAME)")
        if self.traces_exporter not in TRACE_EXPORTERS:
            raise ValueError(
                f"traces_exporter must be one of {sorted(TRACE_EXPORTERS)}, "
                f"got {self.traces_exporter!r} (OTEL_TRACES_EXPORTER)"
            )
        if self.metrics_exporter not in METRIC_EXPORTERS:
            raise ValueError(
                f"metrics_exporter must be one of {sorted(METRIC_EXPORTERS)}, "
                f"got {self.metrics_exporter!r} (OTEL_METRICS_EXPORTER)"
            )
        if self.sampler not in SAMPLERS:
            raise ValueError(
                f"sampler must be one of {sorted(SAMPLERS)}, got {self.sampler!r} "
                "(OTEL_TRACES_SAMPLER)"
            )
        if not 0.0 <= self.sampler_ratio <= 1.0:
            raise ValueError(
                f"sampler_ratio must be within [0, 1], got {self.sampler_ratio} "
                "(OTEL_TRACES_SAMPLER_ARG)"
            )
        if self.metrics_naming not in NAMINGS:
            raise ValueError(
                f"metrics_naming must be one of {sorted(NAMINGS)}, got {self.metrics_naming!r} "
                "(FRAMEWORK_METRICS_NAMING)"
            )
        if self.span_schedule_delay_s <= 0:
            raise ValueError("span_schedule_delay_s must be > 0 (OTEL_BSP_SCHEDULE_DELAY)")
        if not 1 <= self.span_batch_size <= self.span_queue_size:
            raise ValueError(
                "need 1 <= span_batch_size <= span_queue_size "
                "(OTEL_BSP_MAX_EXPORT_BATCH_SIZE, OTEL_BSP_MAX_QUEUE_SIZE)"
            )
        if self.metric_export_interval_s <= 0:
            raise ValueError("metric_export_interval_s must be > 0 (OTEL_METRIC_EXPORT_INTERVAL)")
        if not 0 <= self.prometheus_port <= 65535:
            raise ValueError(
                f"prometheus_port must be 0..65535, got {self.prometheus_port} "
                "(OTEL_EXPORTER_PROMETHEUS_PORT)"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TelemetryConfig:
        """Read the OTEL_* variables (from `environ`, default the process environment)."""
        env = os.environ if environ is None else environ

        def get(name: str, default: str = "") -> str:
            return env.get(name, default).strip()

        attributes = _parse_pairs(get("OTEL_RESOURCE_ATTRIBUTES"))
        endpoint = get("OTEL_EXPORTER_OTLP_ENDPOINT")
        sampler = get("OTEL_TRACES_SAMPLER", "parentbased_always_on").lower()
        ratio_text = get("OTEL_TRACES_SAMPLER_ARG")
        try:
            ratio = float(ratio_text) if ratio_text else 1.0
            interval_ms = float(get("OTEL_METRIC_EXPORT_INTERVAL", "60000"))
            port = int(get("OTEL_EXPORTER_PROMETHEUS_PORT", "9464"))
            delay_ms = float(get("OTEL_BSP_SCHEDULE_DELAY", "5000"))
            queue_size = int(get("OTEL_BSP_MAX_QUEUE_SIZE", "2048"))
            batch_size = int(get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "512"))
        except ValueError as error:
            raise ValueError(f"an OTEL_* variable is not a number: {error}") from None
        return cls(
            service_name=get("OTEL_SERVICE_NAME")
            or dict(attributes).get("service.name", "unknown_service"),
            disabled=get("OTEL_SDK_DISABLED").lower() == "true",
            traces_exporter=get("OTEL_TRACES_EXPORTER", "otlp" if endpoint else "none").lower(),
            metrics_exporter=get("OTEL_METRICS_EXPORTER", "prometheus").lower(),
            otlp_endpoint=endpoint,
            sampler=sampler,
            sampler_ratio=ratio,
            resource_attributes=attributes,
            metric_export_interval_s=interval_ms / 1000.0,
            prometheus_host=get("OTEL_EXPORTER_PROMETHEUS_HOST", "127.0.0.1"),
            prometheus_port=port,
            metrics_naming=get("FRAMEWORK_METRICS_NAMING", OTEL).lower(),
            span_schedule_delay_s=delay_ms / 1000.0,
            span_queue_size=queue_size,
            span_batch_size=batch_size,
        )


def _parse_pairs(text: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


def build_sampler(name: str, ratio: float) -> samplers.Sampler:
    """The SDK sampler a configured name stands for."""
    base: dict[str, samplers.Sampler] = {
        "always_on": samplers.ALWAYS_ON,
        "always_off": samplers.ALWAYS_OFF,
        "traceidratio": samplers.TraceIdRatioBased(ratio),
    }
    if name.startswith("parentbased_"):
        return samplers.ParentBased(base[name.removeprefix("parentbased_")])
    return base[name]


def otlp_available() -> bool:
    return importlib.util.find_spec("opentelemetry.exporter.otlp.proto.grpc") is not None


class Telemetry:
    """The providers and readers one process uses; build once at start-up."""

    def __init__(
        self,
        config: TelemetryConfig,
        tracer_provider: TracerProvider | None,
        meter_provider: MeterProvider | None,
        rpc_metrics: RpcMetrics | None,
        metric_reader: StoreReader | None,
        span_exporter: SpanExporter | None,
    ) -> None:
        self.config = config
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.rpc_metrics = rpc_metrics
        self.metric_reader = metric_reader  # pull reader: Prometheus endpoint, tests
        self.span_exporter = span_exporter

    @classmethod
    def build(
        cls, config: TelemetryConfig, *, span_exporter: SpanExporter | None = None
    ) -> Telemetry:
        """Providers per `config`; `span_exporter` overrides the configured one (benchmarks)."""
        if config.disabled:
            return cls(config, None, None, None, None, None)
        resource = Resource.create(
            {**dict(config.resource_attributes), "service.name": config.service_name}
        )
        tracer_provider = TracerProvider(
            sampler=build_sampler(config.sampler, config.sampler_ratio),
            resource=resource,
            shutdown_on_exit=False,
        )
        exporter = span_exporter or _span_exporter(config)
        if exporter is not None:
            batch = config.batch_spans and not isinstance(exporter, InMemorySpanExporter)
            processor: SpanProcessor
            if batch:
                processor = SpanBatcher(
                    exporter,
                    schedule_delay_s=config.span_schedule_delay_s,
                    max_queue=config.span_queue_size,
                    max_export_batch=config.span_batch_size,
                )
            else:
                processor = SimpleSpanProcessor(exporter)
            tracer_provider.add_span_processor(processor)
        store = RpcMetrics(naming=config.metrics_naming)
        pull = StoreReader(store, resource)
        readers: list[MetricReader] = [pull]
        push = _metric_exporter(config)
        if push is not None:
            interval_ms = config.metric_export_interval_s * 1000
            readers.append(
                StorePeriodicReader(store, resource, push, export_interval_millis=interval_ms)
            )
        meter_provider = MeterProvider(
            resource=resource, metric_readers=readers, shutdown_on_exit=False
        )
        store.publish(meter_provider)
        return cls(config, tracer_provider, meter_provider, store, pull, exporter)

    def policies(self) -> list[Policy]:
        """[TracingPolicy, MetricsPolicy], in that order; put them first in a chain."""
        return [TracingPolicy(self.tracer_provider), MetricsPolicy(self.rpc_metrics)]

    def breaker_listener(self) -> BreakerListener:
        """The breaker callback feeding the `breaker.state` gauge (a no-op when disabled).

        `CircuitBreakerPolicy(config, on_state_change=telemetry.breaker_listener())`.
        """
        return MetricsPolicy(self.rpc_metrics).breaker_listener()

    def flush(self) -> None:
        """Export what is queued: ended spans, and (push exporters) the metrics now."""
        if self.tracer_provider is not None:
            self.tracer_provider.force_flush()
        if self.meter_provider is not None:
            self.meter_provider.force_flush()

    def shutdown(self) -> None:
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()


def _span_line(span: ReadableSpan) -> str:
    return str(span.to_json(indent=None)) + "\n"


def _span_exporter(config: TelemetryConfig) -> SpanExporter | None:
    kind = config.traces_exporter
    if kind == "console":
        # One span per line on stdout (logs go to stderr): never a multi-line block that a
        # log line could land inside when both streams share a terminal.
        return ConsoleSpanExporter(service_name=config.service_name, formatter=_span_line)
    if kind == "memory":
        return InMemorySpanExporter()
    if kind == "otlp":
        if not otlp_available():
            logger.warning(
                "OTEL_TRACES_EXPORTER=otlp but %s is not installed; spans are not exported. "
                "Install it or set OTEL_TRACES_EXPORTER=console",
                OTLP_PACKAGE,
            )
            return None
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter,
        )

        exporter: SpanExporter = OTLPSpanExporter(endpoint=config.otlp_endpoint or None)
        return exporter
    return None


def _metric_exporter(config: TelemetryConfig) -> Any:
    kind = config.metrics_exporter
    if kind == "console":
        return ConsoleMetricExporter()
    if kind == "otlp":
        if not otlp_available():
            logger.warning(
                "OTEL_METRICS_EXPORTER=otlp but %s is not installed; use the Prometheus "
                "endpoint or install it",
                OTLP_PACKAGE,
            )
            return None
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter,
        )

        return OTLPMetricExporter(endpoint=config.otlp_endpoint or None)
    return None
