"""Tracing and metrics policies driven with Call objects, no network."""

from __future__ import annotations

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from framework.errors import CircuitOpenError, NotFoundError, RateLimitedError
from framework.policy import Call, Method, Side
from framework.telemetry.metrics import MetricsPolicy
from framework.telemetry.sdk import Telemetry, TelemetryConfig
from framework.telemetry.tracing import TracingPolicy, split_address

ECHO = Method.resolve("/echo.v1.EchoService/Echo")
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


def spans(telemetry: Telemetry) -> list[trace.Span]:
    assert isinstance(telemetry.span_exporter, InMemorySpanExporter)
    return list(telemetry.span_exporter.get_finished_spans())  # type: ignore[arg-type]


def test_server_span_continues_inbound_traceparent(telemetry: Telemetry) -> None:
    """A server call with a traceparent header gets a SERVER span in that trace, parented."""
    policy = TracingPolicy(telemetry.tracer_provider, server_address="127.0.0.1:5000")
    enter = policy.bind(ECHO)
    assert enter is not None
    metadata = (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),)
    call = Call(ECHO, Side.SERVER, metadata=metadata)
    exit_ = enter(call)
    inside = trace.get_current_span().get_span_context()
    exit_(None)
    (span,) = spans(telemetry)
    assert span.kind is SpanKind.SERVER
    assert span.name == "echo.v1.EchoService/Echo"
    assert f"{span.context.trace_id:032x}" == TRACE_ID
    assert f"{span.parent.span_id:016x}" == PARENT_ID
    assert inside.span_id == span.context.span_id
    assert dict(span.attributes) == {
        "rpc.system": "grpc",
        "rpc.service": "echo.v1.EchoService",
        "rpc.method": "Echo",
        "rpc.grpc.status_code": 0,
        "server.address": "127.0.0.1",
        "server.port": 5000,
    }
    assert not trace.get_current_span().get_span_context().is_valid


def test_client_span_injects_its_context(telemetry: Telemetry) -> None:
    """A client call carries a traceparent naming its CLIENT span."""
    enter = TracingPolicy(telemetry.tracer_provider).bind(ECHO)
    assert enter is not None
    call = Call(ECHO, Side.CLIENT, target="dns:///orders:50051")
    enter(call)(None)
    (span,) = spans(telemetry)
    header = call.header("traceparent")
    ctx = span.context
    assert header == f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
    assert span.kind is SpanKind.CLIENT
    assert span.attributes["server.address"] == "orders"
    assert span.attributes["server.port"] == 50051


def test_typed_error_marks_span_and_adds_decision_event(telemetry: Telemetry) -> None:
    """A policy's typed rejection sets ERROR with its reason and a named span event."""
    enter = TracingPolicy(telemetry.tracer_provider).bind(ECHO)
    assert enter is not None
    enter(Call(ECHO, Side.CLIENT, target="a:1"))(CircuitOpenError("breaker for a is open"))
    enter(Call(ECHO, Side.SERVER))(RateLimitedError("slow down"))
    enter(Call(ECHO, Side.SERVER))(NotFoundError("no such order"))
    breaker, limited, missing = spans(telemetry)
    assert breaker.status.status_code is StatusCode.ERROR
    assert breaker.status.description == "CIRCUIT_OPEN: breaker for a is open"
    assert [e.name for e in breaker.events] == ["breaker open"]
    assert breaker.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert [e.name for e in limited.events] == ["rate limited"]
    assert missing.attributes["error.type"] == "NOT_FOUND"
    assert missing.attributes["rpc.grpc.status_code"] == 5


def test_unexpected_exception_is_recorded(telemetry: Telemetry) -> None:
    """An unexpected exception maps to INTERNAL and its stack trace is a span event."""
    enter = TracingPolicy(telemetry.tracer_provider).bind(ECHO)
    assert enter is not None
    exit_ = enter(Call(ECHO, Side.SERVER))
    try:
        raise KeyError("boom")
    except KeyError as error:
        exit_(error)
    (span,) = spans(telemetry)
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INTERNAL.value[0]
    assert span.events[0].name == "exception"
    assert "KeyError" in span.events[0].attributes["exception.stacktrace"]


def test_handler_can_annotate_the_current_server_span(telemetry: Telemetry) -> None:
    """Attributes and events set on the current span by a handler reach the exporter."""
    enter = TracingPolicy(telemetry.tracer_provider).bind(ECHO)
    assert enter is not None
    exit_ = enter(Call(ECHO, Side.SERVER))
    current = trace.get_current_span()
    current.set_attribute("order.id", "o-1")
    current.add_event("stock reserved", {"items": 3})
    exit_(None)
    (span,) = spans(telemetry)
    assert span.attributes["order.id"] == "o-1"
    assert span.events[0].name == "stock reserved"


def test_disabled_tracing_binds_nothing() -> None:
    """TracingPolicy(None) and MetricsPolicy(None) add no per-call work at all."""
    assert TracingPolicy(None).bind(ECHO) is None
    assert MetricsPolicy(None).bind(ECHO) is None


def test_unsampled_parent_is_followed(telemetry: Telemetry) -> None:
    """A caller that did not sample the trace gets no exported span, but the context flows."""
    enter = TracingPolicy(telemetry.tracer_provider).bind(ECHO)
    assert enter is not None
    call = Call(ECHO, Side.SERVER, metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-00"),))
    exit_ = enter(call)
    inside = trace.get_current_span().get_span_context()
    exit_(None)
    assert spans(telemetry) == []
    assert f"{inside.trace_id:032x}" == TRACE_ID
    assert not inside.trace_flags.sampled


def test_metrics_histogram_counts_by_code(telemetry: Telemetry) -> None:
    """Durations land in per-method, per-code histograms; errors counted by reason."""
    enter = MetricsPolicy(telemetry.rpc_metrics).bind(ECHO)
    assert enter is not None
    for _ in range(3):
        enter(Call(ECHO, Side.SERVER))(None)
    enter(Call(ECHO, Side.SERVER))(RateLimitedError("slow down"))
    in_flight = enter(Call(ECHO, Side.CLIENT, target="a:1"))
    assert telemetry.metric_reader is not None
    data = telemetry.metric_reader.get_metrics_data()
    metrics = {m.name: m for rm in data.resource_metrics for s in rm.scope_metrics
               for m in s.metrics}  # fmt: skip
    duration = metrics["rpc.server.call.duration"]
    assert duration.unit == "s"
    points = {p.attributes["rpc.response.status_code"]: p for p in duration.data.data_points}
    assert points["OK"].count == 3
    assert points["OK"].attributes["rpc.method"] == "echo.v1.EchoService/Echo"
    assert "error.type" not in points["OK"].attributes
    assert points["RESOURCE_EXHAUSTED"].count == 1
    assert points["RESOURCE_EXHAUSTED"].attributes["error.type"] == "RATE_LIMITED"
    assert sum(points["OK"].bucket_counts) == 3
    (error,) = metrics["rpc.server.errors"].data.data_points
    assert error.attributes["error.type"] == "RATE_LIMITED" and error.value == 1
    (client_flight,) = metrics["rpc.client.in_flight"].data.data_points
    assert client_flight.value == 1
    in_flight(None)


def test_duration_exemplar_names_the_sampled_span(telemetry: Telemetry) -> None:
    """With tracing outermost, the duration bucket's exemplar carries the call's trace."""
    tracing = TracingPolicy(telemetry.tracer_provider).bind(ECHO)
    metrics = MetricsPolicy(telemetry.rpc_metrics).bind(ECHO)
    assert tracing is not None and metrics is not None
    call = Call(ECHO, Side.SERVER)
    exits = [tracing(call), metrics(call)]
    for exit_ in reversed(exits):
        exit_(None)
    (span,) = spans(telemetry)
    assert telemetry.metric_reader is not None
    data = telemetry.metric_reader.get_metrics_data()
    (point,) = [p for rm in data.resource_metrics for s in rm.scope_metrics for m in s.metrics
                if m.name == "rpc.server.call.duration" for p in m.data.data_points]  # fmt: skip
    (exemplar,) = point.exemplars
    assert (exemplar.trace_id, exemplar.span_id) == (span.context.trace_id, span.context.span_id)
    assert exemplar.value == point.sum


def test_metric_hooks_for_other_policies(telemetry: Telemetry) -> None:
    """Breaker state, rejections and retries reported by hooks show as metrics."""
    store = telemetry.rpc_metrics
    assert store is not None and telemetry.metric_reader is not None
    store.breaker_state("inventory", "closed")
    store.breaker_state("inventory", "open")
    store.rejected("ratelimit", "RATE_LIMITED")
    store.retry("echo.v1.EchoService", "Echo")
    data = telemetry.metric_reader.get_metrics_data()
    metrics = {m.name: m for rm in data.resource_metrics for s in rm.scope_metrics
               for m in s.metrics}  # fmt: skip
    states = {p.attributes["state"]: p.value for p in metrics["breaker.state"].data.data_points}
    assert states == {"closed": 0, "open": 1}
    assert metrics["policy.rejections"].data.data_points[0].value == 1
    assert metrics["rpc.client.retries"].data.data_points[0].value == 1


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("dns:///svc.local:443", ("svc.local", 443)),
        ("ipv4:10.0.0.1:5", ("10.0.0.1", 5)),
        ("[::1]:50051", ("::1", 50051)),
        ("unix:/tmp/sock", ("/tmp/sock", None)),
    ],
)
def test_split_address(target: str, expected: tuple[str, int | None]) -> None:
    """Targets in gRPC's forms split into server.address / server.port."""
    assert split_address(target) == expected


def test_configured_sampler_is_asked() -> None:
    """A non-default sampler decides: parentbased_always_off keeps sampled callers only."""
    telemetry = Telemetry.build(
        TelemetryConfig(
            service_name="t", traces_exporter="memory", sampler="parentbased_always_off"
        )
    )
    enter = TracingPolicy(telemetry.tracer_provider).bind(ECHO)
    assert enter is not None
    enter(Call(ECHO, Side.SERVER))(None)  # root: not sampled
    traced = (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),)
    enter(Call(ECHO, Side.SERVER, metadata=traced))(None)  # sampled caller: kept
    (span,) = spans(telemetry)
    assert f"{span.context.trace_id:032x}" == TRACE_ID
    assert f"{span.parent.span_id:016x}" == PARENT_ID
    telemetry.shutdown()
