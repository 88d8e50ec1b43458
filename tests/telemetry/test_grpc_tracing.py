"""Traces, metrics and logs across real in-process gRPC services."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import urllib.request
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import grpc
import grpc.aio
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families

from framework.client import connect
from framework.errors import NotFoundError
from framework.events.store import EventMetadata
from framework.telemetry.logs import configure_logging
from framework.telemetry.prometheus import MetricsEndpoint
from framework.telemetry.sdk import Telemetry
from framework.telemetry.tracing import continue_trace, trace_fields
from framework.testing import serve
from framework.testing.echo import EchoServicer
from gen.echo.v1 import echo_pb2, echo_pb2_grpc

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
log = logging.getLogger("tests.telemetry.hops")


class Hop(echo_pb2_grpc.EchoServiceServicer):
    """One service of the chain: calls the next hop, or answers (or fails) at the end."""

    def __init__(self, name: str, downstream: echo_pb2_grpc.EchoServiceStub | None) -> None:
        self.name = name
        self.downstream = downstream
        self.events: list[EventMetadata] = []

    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        log.info("hop %s handling", self.name, extra={"service": self.name, "method": "Echo"})
        self.events.append(EventMetadata(**trace_fields()))  # as if it recorded an event
        if self.downstream is None:
            if request.text == "fail":
                raise NotFoundError(f"{self.name} has no {request.text!r}")
            return echo_pb2.EchoResponse(text=self.name)
        reply = await self.downstream.Echo(request)
        return echo_pb2.EchoResponse(text=f"{self.name}>{reply.text}")


@asynccontextmanager
async def chain_of_three(telemetry: Telemetry) -> AsyncIterator[tuple[Any, list[Hop]]]:
    """A -> B -> C, each hop's server and client traced; yields a traced stub to A."""
    async with AsyncExitStack() as stack:
        hops: list[Hop] = []
        downstream = None
        for name in ("C", "B", "A"):
            hop = Hop(name, downstream)
            hops.insert(0, hop)
            t = await stack.enter_async_context(serve(hop, policies=telemetry.policies()))
            channel = connect(t.target, policies=telemetry.policies())
            stack.push_async_callback(channel.close)
            downstream = echo_pb2_grpc.EchoServiceStub(channel)
        yield downstream, hops


def finished(telemetry: Telemetry) -> list[ReadableSpan]:
    assert isinstance(telemetry.span_exporter, InMemorySpanExporter)
    return list(telemetry.span_exporter.get_finished_spans())


def by_kind_in_order(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    """Spans ordered root first, following parent links."""
    children = {s.parent.span_id if s.parent else None: s for s in spans}
    ordered, parent = [], None
    while parent in children or (parent is None and None in children):
        span = children[parent]
        ordered.append(span)
        parent = span.context.span_id
    return ordered


async def test_three_hops_make_one_trace(telemetry: Telemetry) -> None:
    """A call through A -> B -> C is one trace: client/server spans alternate, parent to child."""
    async with chain_of_three(telemetry) as (stub, _):
        reply = await stub.Echo(echo_pb2.EchoRequest(text="hi"))
    assert reply.text == "A>B>C"
    spans = finished(telemetry)
    assert len(spans) == 6
    assert len({s.context.trace_id for s in spans}) == 1
    chain = by_kind_in_order(spans)
    assert len(chain) == 6
    assert [s.kind for s in chain] == [SpanKind.CLIENT, SpanKind.SERVER] * 3
    assert all(s.attributes["rpc.grpc.status_code"] == 0 for s in spans)
    assert all(s.status.status_code is StatusCode.UNSET for s in spans)
    assert {s.name for s in spans} == {"echo.v1.EchoService/Echo"}
    client_ports = {s.attributes["server.port"] for s in spans if s.kind is SpanKind.CLIENT}
    assert len(client_ports) == 3


async def test_error_at_the_end_is_visible_up_the_chain(telemetry: Telemetry) -> None:
    """NOT_FOUND raised by C marks every span of the chain with code 5 and ERROR."""
    async with chain_of_three(telemetry) as (stub, _):
        with pytest.raises(NotFoundError):
            await stub.Echo(echo_pb2.EchoRequest(text="fail"))
    spans = by_kind_in_order(finished(telemetry))
    assert len(spans) == 6
    assert [s.attributes["rpc.grpc.status_code"] for s in spans] == [5] * 6
    assert all(s.status.status_code is StatusCode.ERROR for s in spans)
    assert all(s.attributes["error.type"] == "NOT_FOUND" for s in spans)
    assert "C has no 'fail'" in (spans[-1].status.description or "")


async def test_foreign_client_traceparent_is_continued(telemetry: Telemetry) -> None:
    """A raw grpcio call with a hand-set traceparent gets a server span in that trace."""
    metadata = (("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01"),)
    async with serve(EchoServicer(), policies=telemetry.policies()) as t:
        raw = grpc.aio.insecure_channel(t.target)
        stub = echo_pb2_grpc.EchoServiceStub(raw)
        await stub.Echo(echo_pb2.EchoRequest(text="x"), metadata=metadata)
        await raw.close()
    (span,) = finished(telemetry)
    assert span.kind is SpanKind.SERVER
    assert f"{span.context.trace_id:032x}" == TRACE_ID
    assert span.parent is not None and f"{span.parent.span_id:016x}" == "00f067aa0ba902b7"


async def test_event_handler_span_joins_the_emitting_rpc_trace(telemetry: Telemetry) -> None:
    """An event recorded inside an RPC is handled under a span of that RPC's trace."""
    async with chain_of_three(telemetry) as (stub, hops):
        await stub.Echo(echo_pb2.EchoRequest(text="hi"))
    (event,) = hops[1].events  # recorded by B
    server_b = next(
        s for s in finished(telemetry)
        if s.kind is SpanKind.SERVER and f"{s.context.trace_id:032x}" in event.traceparent
        and f"{s.context.span_id:016x}" in event.traceparent
    )  # fmt: skip

    async def projection() -> None:  # runs later, in another task, as a consumer would
        with continue_trace(event, "OrderPlaced handle", tracer_provider=telemetry.tracer_provider):
            await asyncio.sleep(0)

    await asyncio.create_task(projection())
    handler = next(s for s in finished(telemetry) if s.kind is SpanKind.CONSUMER)
    assert handler.context.trace_id == server_b.context.trace_id
    assert handler.parent is not None and handler.parent.span_id == server_b.context.span_id
    assert handler.links[0].context.span_id == server_b.context.span_id


async def test_replayed_event_only_links_to_the_producer(telemetry: Telemetry) -> None:
    """link_only=True starts a new trace that links to the producing span."""
    producer = {"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"}
    with continue_trace(
        producer, "replay", tracer_provider=telemetry.tracer_provider, link_only=True
    ):
        pass
    (span,) = finished(telemetry)
    assert f"{span.context.trace_id:032x}" != TRACE_ID
    assert span.parent is None
    assert f"{span.links[0].context.trace_id:032x}" == TRACE_ID


async def test_json_logs_carry_trace_and_span_ids(telemetry: Telemetry) -> None:
    """Log lines written inside each hop's handler name that hop's server span."""
    stream = io.StringIO()
    handler = configure_logging(stream=stream, logger=log, service="hops")
    try:
        async with chain_of_three(telemetry) as (stub, _):
            await stub.Echo(echo_pb2.EchoRequest(text="hi"))
    finally:
        log.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["message"] for line in lines] == [
        "hop A handling",
        "hop B handling",
        "hop C handling",
    ]
    servers = {
        f"{s.context.span_id:016x}": s for s in finished(telemetry) if s.kind is SpanKind.SERVER
    }
    for line in lines:
        assert line["span_id"] in servers
        assert line["trace_id"] == f"{servers[line['span_id']].context.trace_id:032x}"
        assert line["method"] == "Echo" and line["level"] == "INFO"
    assert {line["service"] for line in lines} == {"A", "B", "C"}


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """name and labels -> value; an empty label is no label, as Prometheus stores it."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if v))
            samples[(sample.name, labels)] = sample.value
    return samples


async def test_metrics_endpoint_shows_rpc_histograms(telemetry: Telemetry) -> None:
    """After 3 Echo and 2 failing calls, /metrics shows those counts by method and code."""
    assert telemetry.metric_reader is not None
    endpoint = MetricsEndpoint(telemetry.metric_reader, port=0)
    async with serve(EchoServicer(), policies=telemetry.policies(), hooks=[endpoint]) as t:
        stub = echo_pb2_grpc.EchoServiceStub(t.connect(policies=telemetry.policies()))
        for _ in range(3):
            await stub.Echo(echo_pb2.EchoRequest(text="x"))
        for _ in range(2):
            with pytest.raises(NotFoundError):
                await stub.Fail(echo_pb2.FailRequest(error="NotFoundError", message="gone"))
        samples = await asyncio.to_thread(scrape, endpoint.url)
    base = (("rpc_system_name", "grpc"),)

    def count(side: str, method: str, code: str, reason: str = "") -> float:
        labels = [*base, ("rpc_method", f"echo.v1.EchoService/{method}")]
        labels.append(("rpc_response_status_code", code))
        if reason:
            labels.append(("error_type", reason))
        return samples[(f"rpc_{side}_call_duration_seconds_count", tuple(sorted(labels)))]

    assert count("server", "Echo", "OK") == 3
    assert count("client", "Echo", "OK") == 3
    assert count("server", "Fail", "NOT_FOUND", "NOT_FOUND") == 2
    assert count("client", "Fail", "NOT_FOUND", "NOT_FOUND") == 2
    echo = (*base, ("rpc_method", "echo.v1.EchoService/Echo"))
    inf = tuple(sorted((*echo, ("rpc_response_status_code", "OK"), ("le", "+Inf"))))
    assert samples[("rpc_server_call_duration_seconds_bucket", inf)] == 3
    errors = tuple(sorted((*base, ("rpc_method", "echo.v1.EchoService/Fail"),
                           ("rpc_response_status_code", "NOT_FOUND"),
                           ("error_type", "NOT_FOUND"))))  # fmt: skip
    assert samples[("rpc_server_errors_total", errors)] == 2
    assert samples[("rpc_server_in_flight", tuple(sorted(echo)))] == 0
    assert any(
        name == "target_info" and ("service_name", "test") in labels for name, labels in samples
    )


async def test_streaming_calls_get_one_span_per_side(telemetry: Telemetry) -> None:
    """A server-streaming and a client-streaming call each make one CLIENT and one SERVER span."""
    async with serve(
        EchoServicer(), policies=telemetry.policies(), client_policies=telemetry.policies()
    ) as t:
        stub = t.stub(echo_pb2_grpc.EchoServiceStub)
        replies = [r.text async for r in stub.EchoStream(echo_pb2.EchoRequest(text="s", repeat=3))]

        async def requests() -> AsyncIterator[echo_pb2.EchoRequest]:
            for text in ("a", "b"):
                yield echo_pb2.EchoRequest(text=text)

        collected = await stub.Collect(requests())
    assert replies == ["s#0", "s#1", "s#2"] and collected.text
    spans = finished(telemetry)
    kinds = sorted((s.attributes["rpc.method"], s.kind.name) for s in spans)
    assert kinds == [
        ("Collect", "CLIENT"),
        ("Collect", "SERVER"),
        ("EchoStream", "CLIENT"),
        ("EchoStream", "SERVER"),
    ]
    assert len({s.context.trace_id for s in spans}) == 2  # one trace per call
    assert all(s.attributes["rpc.grpc.status_code"] == 0 for s in spans)
