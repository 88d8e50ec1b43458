"""OTLP export for real: an in-test OTLP/gRPC receiver (the collector's trace and metrics
services, from opentelemetry-proto) gets the spans and metrics of real calls."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from framework.errors import NotFoundError
from framework.telemetry.sdk import Telemetry, TelemetryConfig
from framework.testing import serve
from framework.testing.echo import EchoServicer
from gen.echo.v1 import echo_pb2, echo_pb2_grpc


class Receiver(
    trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer
):
    """Keeps every export request it is sent."""

    def __init__(self) -> None:
        self.traces: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.metrics: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self.lock = threading.Lock()

    def spans(self) -> list[tuple[Any, trace_pb2.Span]]:
        """(resource, span) for every span received."""
        with self.lock:
            return [
                (rs.resource, span)
                for request in self.traces
                for rs in request.resource_spans
                for ss in rs.scope_spans
                for span in ss.spans
            ]

    def metric(self, name: str) -> list[Any]:
        """Every received metric called `name` (latest export last)."""
        with self.lock:
            return [
                metric
                for request in self.metrics
                for rm in request.resource_metrics
                for sm in rm.scope_metrics
                for metric in sm.metrics
                if metric.name == name
            ]


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self.receiver.lock:
            self.receiver.traces.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def Export(
        self, request: metrics_service_pb2.ExportMetricsServiceRequest, context: Any
    ) -> metrics_service_pb2.ExportMetricsServiceResponse:
        with self.receiver.lock:
            self.receiver.metrics.append(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, int]]:
    """An OTLP/gRPC receiver on 127.0.0.1 (its own thread pool, off the test's loop)."""
    received = Receiver()
    server = _receiver_server(received, 0)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield received, port
    server.stop(0)


async def _until(condition: Callable[[], bool], attempts: int = 1000) -> None:
    for _ in range(attempts):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the receiver did not get what was expected")


async def test_spans_and_metrics_of_real_calls_reach_an_otlp_receiver(
    receiver: tuple[Receiver, int],
) -> None:
    """A traced OK call and a NOT_FOUND call: the receiver gets both sides' spans in one
    trace each (server parented on client), and the duration histograms with exemplars."""
    received, port = receiver
    telemetry = Telemetry.build(
        TelemetryConfig(
            service_name="otlp-test",
            traces_exporter="otlp",
            metrics_exporter="otlp",
            otlp_endpoint=f"http://127.0.0.1:{port}",
            metric_export_interval_s=3600,  # exported by the flush below, not by the timer
        )
    )
    try:
        async with serve(
            EchoServicer(),
            policies=telemetry.policies(),
            client_policies=telemetry.policies(),
        ) as t:
            stub = t.stub(echo_pb2_grpc.EchoServiceStub)
            assert (await stub.Echo(echo_pb2.EchoRequest(text="x"))).text == "x"
            with pytest.raises(NotFoundError):
                await stub.Fail(echo_pb2.FailRequest(error="NotFoundError", message="gone"))
        await asyncio.to_thread(telemetry.flush)
        await _until(lambda: len(received.spans()) == 4)
        await _until(lambda: bool(received.metric("rpc.server.call.duration")))
    finally:
        await asyncio.to_thread(telemetry.shutdown)

    spans = received.spans()
    resource = spans[0][0]
    assert {a.key: a.value.string_value for a in resource.attributes}["service.name"] == (
        "otlp-test"
    )
    by_kind = {(s.name, s.kind): s for _, s in spans}
    echo = "echo.v1.EchoService/Echo"
    client = by_kind[(echo, trace_pb2.Span.SPAN_KIND_CLIENT)]
    server = by_kind[(echo, trace_pb2.Span.SPAN_KIND_SERVER)]
    assert server.trace_id == client.trace_id
    assert server.parent_span_id == client.span_id
    attributes = {a.key: a.value for a in server.attributes}
    assert attributes["rpc.system"].string_value == "grpc"
    assert attributes["rpc.method"].string_value == "Echo"
    failed = by_kind[("echo.v1.EchoService/Fail", trace_pb2.Span.SPAN_KIND_SERVER)]
    assert failed.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    assert failed.status.message == "NOT_FOUND: gone"

    (duration, *_) = received.metric("rpc.server.call.duration")[-1:]
    assert duration.unit == "s"
    points = {
        {a.key: a.value.string_value for a in p.attributes}["rpc.method"]: p
        for p in duration.histogram.data_points
    }
    assert points[echo].count == 1
    codes = {a.key: a.value.string_value for a in points[echo].attributes}
    assert codes["rpc.response.status_code"] == "OK"
    (exemplar,) = points[echo].exemplars
    assert exemplar.trace_id == server.trace_id
    assert exemplar.span_id == server.span_id
    assert received.metric("rpc.client.call.duration")
    assert received.metric("rpc.server.in_flight")


async def test_export_resumes_after_the_receiver_restarts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Receiver stopped: calls still succeed and the failed export is bounded; once a
    receiver listens on the same port again, later spans reach it."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")  # seconds, read by the exporter
    first = Receiver()
    server = _receiver_server(first, 0)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    telemetry = Telemetry.build(
        TelemetryConfig(
            service_name="otlp-restart",
            traces_exporter="otlp",
            metrics_exporter="none",
            otlp_endpoint=f"http://127.0.0.1:{port}",
        )
    )
    try:
        async with serve(EchoServicer(), policies=telemetry.policies()) as t:
            stub = t.stub(echo_pb2_grpc.EchoServiceStub)
            await stub.Echo(echo_pb2.EchoRequest(text="before"))
            await asyncio.to_thread(telemetry.flush)
            await _until(lambda: len(first.spans()) == 1)
            server.stop(0).wait()
            assert (await stub.Echo(echo_pb2.EchoRequest(text="during"))).text == "during"
            await asyncio.to_thread(telemetry.flush)  # fails after its timeout; spans lost
            second = Receiver()
            server = _receiver_server(second, port)
            server.start()
            # The exporter's channel reconnects after its backoff (grpc's: 1 s, x1.6, up to
            # 120 s): bounded in time, not in tries, since a refused export can fail at once.
            loop = asyncio.get_running_loop()
            give_up_at = loop.time() + 120.0
            while not second.spans() and loop.time() < give_up_at:
                await stub.Echo(echo_pb2.EchoRequest(text="after"))
                await asyncio.to_thread(telemetry.flush)
                if not second.spans():
                    await asyncio.sleep(0.2)
    finally:
        await asyncio.to_thread(telemetry.shutdown)
        server.stop(0)
    assert [s.name for _, s in first.spans()] == ["echo.v1.EchoService/Echo"]
    assert second.spans()
    assert all(s.name == "echo.v1.EchoService/Echo" for _, s in second.spans())


def _receiver_server(received: Receiver, port: int) -> grpc.Server:
    """A receiver's gRPC server; bound to `port` when non-zero (the caller binds port 0)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(received), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Metrics(received), server)
    if port:
        server.add_insecure_port(f"127.0.0.1:{port}")
    return server
