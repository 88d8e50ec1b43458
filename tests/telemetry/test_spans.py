"""The lean span path: sampled-out calls, inline sampling, the span batcher, late processors."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import pytest
from opentelemetry import baggage, trace
from opentelemetry import context as context_api
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

from framework.policy import Call, Method, Side
from framework.telemetry.batcher import SpanBatcher
from framework.telemetry.sdk import Telemetry, TelemetryConfig
from framework.telemetry.tracing import TracingPolicy

ECHO = Method.resolve("/echo.v1.EchoService/Echo")
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


def _server_call(policy: TracingPolicy, *metadata: tuple[str, str]) -> tuple[Any, Call]:
    """Run a server enter; returns (the exit, the call) with the call's context current."""
    enter = policy.bind(ECHO)
    assert enter is not None
    call = Call(ECHO, Side.SERVER, metadata=metadata)
    return enter(call), call


def _outbound(policy: TracingPolicy) -> Call:
    """A client call made inside the current context; returns it with its metadata."""
    enter = policy.bind(ECHO)
    assert enter is not None
    call = Call(ECHO, Side.CLIENT, target="127.0.0.1:1")
    exit_ = enter(call)
    if exit_ is not None:
        exit_(None)
    return call


def test_a_sampled_out_call_records_nothing_and_propagates_its_trace(
    telemetry: Telemetry,
) -> None:
    """A caller that did not sample: no span, but logs see the trace and outbound calls
    carry it, still not sampled."""
    policy = TracingPolicy(telemetry.tracer_provider)
    exit_, _ = _server_call(policy, ("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-00"))
    inside = trace.get_current_span().get_span_context()
    outbound = _outbound(policy)
    exit_(None)
    assert telemetry.span_exporter is not None
    assert telemetry.span_exporter.get_finished_spans() == ()  # type: ignore[attr-defined]
    assert f"{inside.trace_id:032x}" == TRACE_ID and not inside.trace_flags.sampled
    header = str(outbound.header("traceparent"))
    assert header.startswith(f"00-{TRACE_ID}-") and header.endswith("-00")
    assert not trace.get_current_span().get_span_context().is_valid


def test_a_malformed_traceparent_starts_a_new_trace(telemetry: Telemetry) -> None:
    """Upper-case hex or an all-zero trace id is not a parent: the call is a sampled root."""
    policy = TracingPolicy(telemetry.tracer_provider)
    for bad in (f"00-{TRACE_ID.upper()}-{PARENT_ID}-00", f"00-{'0' * 32}-{PARENT_ID}-00"):
        exit_, _ = _server_call(policy, ("traceparent", bad))
        exit_(None)
    assert telemetry.span_exporter is not None
    spans = telemetry.span_exporter.get_finished_spans()  # type: ignore[attr-defined]
    assert len(spans) == 2
    assert all(s.parent is None and f"{s.context.trace_id:032x}" != TRACE_ID for s in spans)


def test_baggage_is_continued_and_forwarded(telemetry: Telemetry) -> None:
    """With baggage the call takes the propagator's path: the handler sees it, outbound
    calls carry it."""
    policy = TracingPolicy(telemetry.tracer_provider)
    exit_, _ = _server_call(
        policy, ("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"), ("baggage", "tenant=acme")
    )
    seen = baggage.get_baggage("tenant")
    outbound = _outbound(policy)
    exit_(None)
    assert seen == "acme"
    assert outbound.header("baggage") == "tenant=acme"
    assert str(outbound.header("traceparent")).startswith(f"00-{TRACE_ID}-")


def test_ratio_sampling_decides_roots_as_the_sdk_sampler_does() -> None:
    """parentbased_traceidratio: each root call is sampled exactly when the SDK's
    TraceIdRatioBased would sample its trace id."""
    telemetry = Telemetry.build(
        TelemetryConfig(
            service_name="t",
            traces_exporter="memory",
            sampler="parentbased_traceidratio",
            sampler_ratio=0.5,
        )
    )
    policy = TracingPolicy(telemetry.tracer_provider)
    sdk = TraceIdRatioBased(0.5)
    decisions = []
    for _ in range(200):
        exit_, _ = _server_call(policy)
        context = trace.get_current_span().get_span_context()
        exit_(None)
        expected = sdk.should_sample(None, context.trace_id, "n").decision.is_sampled()
        decisions.append((context.trace_flags.sampled, expected))
    assert all(got == expected for got, expected in decisions)
    assert {got for got, _ in decisions} == {True, False}
    assert telemetry.span_exporter is not None
    exported = telemetry.span_exporter.get_finished_spans()  # type: ignore[attr-defined]
    assert len(exported) == sum(got for got, _ in decisions)
    telemetry.shutdown()


def test_a_processor_added_later_sees_the_spans() -> None:
    """Adding a span processor after the policy was built: later spans reach it too."""
    telemetry = Telemetry.build(
        TelemetryConfig(service_name="t"), span_exporter=_Collecting()
    )  # a SpanBatcher alone: spans go straight to its queue
    assert telemetry.tracer_provider is not None
    policy = TracingPolicy(telemetry.tracer_provider)
    exit_, _ = _server_call(policy)
    exit_(None)
    late = InMemorySpanExporter()
    telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(late))
    exit_, _ = _server_call(policy)
    exit_(None)
    telemetry.flush()
    assert len(late.get_finished_spans()) == 1
    exporter = telemetry.tracer_provider._active_span_processor._span_processors[0].exporter  # type: ignore[attr-defined]
    assert len(exporter.spans) == 2
    telemetry.shutdown()


class _Collecting(SpanExporter):
    def __init__(self, fail: bool = False) -> None:
        self.spans: list[ReadableSpan] = []
        self.batches: list[int] = []
        self.fail = fail
        self.shut = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self.fail:
            raise RuntimeError("collector unreachable")
        self.batches.append(len(spans))
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.shut = True


def _ended_spans(n: int, processor: SpanBatcher) -> None:
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("t")
    for i in range(n):
        tracer.start_span(f"s{i}").end()


def test_the_batcher_exports_in_batches_and_flushes_everything() -> None:
    """Spans queue until a batch is full or a flush; flush exports all, in batch-sized calls."""
    exporter = _Collecting()
    batcher = SpanBatcher(exporter, schedule_delay_s=600, max_export_batch=4, max_queue=100)
    _ended_spans(10, batcher)
    assert batcher.force_flush()
    assert [s.name for s in exporter.spans] == [f"s{i}" for i in range(10)]
    assert all(size <= 4 for size in exporter.batches)
    batcher.shutdown()
    assert exporter.shut
    assert not batcher.force_flush()


def test_a_full_queue_drops_spans_and_says_how_many(caplog: pytest.LogCaptureFixture) -> None:
    """Beyond max_queue spans are dropped, counted and reported in one warning."""
    entered, release = threading.Event(), threading.Event()

    class Stuck(_Collecting):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            entered.set()
            release.wait(30)
            return super().export(spans)

    exporter = Stuck()
    batcher = SpanBatcher(exporter, schedule_delay_s=600, max_export_batch=1, max_queue=2)
    _ended_spans(1, batcher)  # wakes the thread, which blocks exporting it
    assert entered.wait(30)
    caplog.set_level(logging.WARNING, logger="framework.telemetry.batcher")
    _ended_spans(5, batcher)  # two fit in the queue, three do not
    release.set()
    batcher.shutdown()
    assert len(exporter.spans) == 3
    assert "3 spans dropped" in caplog.text


def test_an_exporter_failure_loses_the_batch_not_the_thread(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An exporter that raises: logged, the next batch is still exported."""
    exporter = _Collecting(fail=True)
    batcher = SpanBatcher(exporter, schedule_delay_s=600)
    caplog.set_level(logging.ERROR, logger="framework.telemetry.batcher")
    _ended_spans(2, batcher)
    batcher.force_flush()
    assert "exporting 2 spans failed" in caplog.text
    exporter.fail = False
    _ended_spans(1, batcher)
    batcher.force_flush()
    assert [s.name for s in exporter.spans] == ["s0"]
    batcher.shutdown()


def test_export_calls_are_not_traced_themselves() -> None:
    """The exporter runs with instrumentation suppressed (no spans about exporting spans)."""
    seen: list[object] = []

    class Looking(_Collecting):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            seen.append(context_api.get_value(context_api._SUPPRESS_INSTRUMENTATION_KEY))
            return super().export(spans)

    batcher = SpanBatcher(Looking(), schedule_delay_s=600)
    _ended_spans(1, batcher)
    batcher.force_flush()
    batcher.shutdown()
    assert seen == [True]
