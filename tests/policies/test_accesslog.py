"""Access log: one record per call with the fields operators filter on, written cheaply."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from framework.errors import NotFoundError, RateLimitedError
from framework.policies.accesslog import AccessLogPolicy, AccessLogWriter
from framework.telemetry.sdk import Telemetry, TelemetryConfig
from framework.testing import serve
from framework.testing.echo import EchoServicer
from gen.echo.v1 import echo_pb2, echo_pb2_grpc


def _records(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def _until(condition: Callable[[], bool], attempts: int = 6000) -> None:
    """Poll (bounded) for something another thread does."""
    for _ in range(attempts):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met")


async def test_each_call_writes_one_json_line_with_the_fields() -> None:
    """Server and client records are JSON lines with side, method, code, level, peer,
    duration and the typed reason; health checks stay quiet; stopping flushes them."""
    stream = io.StringIO()
    writer = AccessLogWriter(stream, flush_interval_s=60)
    policy = AccessLogPolicy(writer)
    async with serve(EchoServicer(), policies=[policy], client_policies=[policy]) as t:
        stub = t.stub(echo_pb2_grpc.EchoServiceStub)
        await stub.Echo(echo_pb2.EchoRequest(text="x"))
        with pytest.raises(NotFoundError):
            await stub.Fail(echo_pb2.FailRequest(error="NotFoundError"))
        with pytest.raises(Exception, match="internal"):
            await stub.Fail(echo_pb2.FailRequest(error="unexpected"))
        with pytest.raises(RateLimitedError):
            await stub.Fail(echo_pb2.FailRequest(error="RateLimitedError"))
        health = health_pb2_grpc.HealthStub(t.channel)
        await health.Check(health_pb2.HealthCheckRequest(service=""))
    # Stopping the server flushed the records queued so far (a 60 s interval never came).
    assert sorted(r["side"] for r in _records(stream)).count("server") == 4
    writer.flush()  # the client side's records written after the stop
    records = _records(stream)
    assert not [r for r in records if r["rpc"].startswith("/grpc.health.")]
    fields = sorted((r["side"], r["method"], r["code"], r["level"]) for r in records)
    assert fields == sorted(
        [
            ("server", "Echo", "OK", "INFO"),
            ("client", "Echo", "OK", "INFO"),
            ("server", "Fail", "NOT_FOUND", "INFO"),
            ("client", "Fail", "NOT_FOUND", "INFO"),
            ("server", "Fail", "INTERNAL", "WARNING"),
            ("client", "Fail", "INTERNAL", "WARNING"),
            ("server", "Fail", "RESOURCE_EXHAUSTED", "INFO"),
            ("client", "Fail", "RESOURCE_EXHAUSTED", "INFO"),
        ]
    )
    server_ok = next(r for r in records if r["side"] == "server" and r["code"] == "OK")
    assert server_ok["service"] == "echo.v1.EchoService"
    assert server_ok["rpc"] == "/echo.v1.EchoService/Echo"
    assert server_ok["logger"] == "framework.access"
    assert server_ok["duration_ms"] >= 0
    assert "127.0.0.1" in server_ok["peer"]
    assert server_ok["ts"].endswith("+00:00")
    assert "reason" not in server_ok
    limited = next(r for r in records if r["side"] == "server" and r["code"] != "OK")
    assert next(r for r in records if r["code"] == "RESOURCE_EXHAUSTED")["reason"] == "RATE_LIMITED"
    assert "trace_id" not in limited  # no tracing policy in this chain


async def test_an_error_record_is_written_at_once_and_ok_records_wait_for_the_batch() -> None:
    """With a long flush interval an OK record waits; a failed call wakes the writer,
    which writes both."""
    stream = io.StringIO()
    writer = AccessLogWriter(stream, flush_interval_s=600, max_batch=1000)
    async with serve(EchoServicer(), policies=[AccessLogPolicy(writer)]) as t:
        stub = t.stub(echo_pb2_grpc.EchoServiceStub)
        await stub.Echo(echo_pb2.EchoRequest(text="x"))
        assert stream.getvalue() == ""  # queued, not written: no wake-up before 600 s
        with pytest.raises(NotFoundError):
            await stub.Fail(echo_pb2.FailRequest(error="NotFoundError"))
        await _until(lambda: len(stream.getvalue().splitlines()) == 2)
        assert [r["code"] for r in _records(stream)] == ["OK", "NOT_FOUND"]
    writer.close()


async def test_stopping_the_server_flushes_the_pending_records() -> None:
    """Records still queued when the server drains are written by the time stop() returns."""
    stream = io.StringIO()
    writer = AccessLogWriter(stream, flush_interval_s=600, max_batch=1000)
    async with serve(EchoServicer(), policies=[AccessLogPolicy(writer)]) as t:
        stub = t.stub(echo_pb2_grpc.EchoServiceStub)
        for i in range(5):
            await stub.Echo(echo_pb2.EchoRequest(text=str(i)))
        assert stream.getvalue() == ""
    assert [r["code"] for r in _records(stream)] == ["OK"] * 5


async def test_sampling_drops_only_fast_successful_calls() -> None:
    """sample_ratio=0 writes no fast OK call, yet every error; slow calls are always kept."""
    stream = io.StringIO()
    sampled = AccessLogPolicy(AccessLogWriter(stream), sample_ratio=0.0)
    async with serve(EchoServicer(), policies=[sampled]) as t:
        stub = t.stub(echo_pb2_grpc.EchoServiceStub)
        for _ in range(5):
            await stub.Echo(echo_pb2.EchoRequest(text="x"))
        for _ in range(3):
            with pytest.raises(NotFoundError):
                await stub.Fail(echo_pb2.FailRequest(error="NotFoundError"))
    assert [r["code"] for r in _records(stream)] == ["NOT_FOUND"] * 3

    slow_stream = io.StringIO()
    every_call_slow = AccessLogPolicy(AccessLogWriter(slow_stream), sample_ratio=0.0, slow_ms=0)
    async with serve(EchoServicer(), policies=[every_call_slow]) as t:
        await t.stub(echo_pb2_grpc.EchoServiceStub).Echo(echo_pb2.EchoRequest(text="x"))
    (kept,) = _records(slow_stream)
    assert kept["code"] == "OK"
    assert kept["sample_ratio"] == 0.0


async def test_records_name_the_trace_of_the_call() -> None:
    """With tracing first in the chain, the record carries the server span's ids."""
    telemetry = Telemetry.build(TelemetryConfig(service_name="t", traces_exporter="memory"))
    stream = io.StringIO()
    tracing, _ = telemetry.policies()
    async with serve(
        EchoServicer(), policies=[tracing, AccessLogPolicy(AccessLogWriter(stream))]
    ) as t:
        await t.stub(echo_pb2_grpc.EchoServiceStub).Echo(echo_pb2.EchoRequest(text="x"))
    (record,) = _records(stream)
    assert telemetry.span_exporter is not None
    (span,) = telemetry.span_exporter.get_finished_spans()  # type: ignore[attr-defined]
    assert record["trace_id"] == f"{span.context.trace_id:032x}"
    assert record["span_id"] == f"{span.context.span_id:016x}"
    telemetry.shutdown()


def test_a_writer_that_cannot_keep_up_drops_and_says_how_many() -> None:
    """Beyond max_pending lines are refused, counted, and reported in a WARNING line."""
    entered, release = threading.Event(), threading.Event()

    class Stuck(io.StringIO):
        def write(self, text: str) -> int:
            entered.set()
            release.wait(30)
            return super().write(text)

    stream = Stuck()
    writer = AccessLogWriter(stream, flush_interval_s=600, max_batch=2, max_pending=2)
    writer.write('{"n":0}\n', urgent=True)  # the writer thread takes it and blocks
    assert entered.wait(30)
    for n in range(1, 6):
        writer.write(f'{{"n":{n}}}\n')
    release.set()
    writer.close()
    records = _records(stream)
    assert [r.get("n") for r in records[:3]] == [0, 1, 2]
    assert records[3]["level"] == "WARNING"
    assert records[3]["dropped"] == 3


def test_a_failing_stream_is_counted_and_the_writer_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stream that raises OSError loses those lines (counted, logged), not the writer."""

    class Full(io.StringIO):
        fail = True

        def write(self, text: str) -> int:
            if self.fail:
                raise OSError(28, "No space left on device")
            return super().write(text)

    stream = Full()
    writer = AccessLogWriter(stream)
    caplog.set_level(logging.WARNING, logger="framework.policies.accesslog")
    writer.write('{"n":1}\n')
    writer.flush()
    assert "No space left" in caplog.text
    stream.fail = False
    writer.write('{"n":2}\n')
    writer.close()
    records = _records(stream)
    assert records[0] == {"n": 2}
    assert records[1]["dropped"] == 1


async def test_a_logger_sink_writes_log_records_with_the_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Given a logging.Logger, each call is one LogRecord carrying the structured fields."""
    caplog.set_level(logging.INFO, logger="framework.access")
    policy = AccessLogPolicy(logging.getLogger("framework.access"))
    async with serve(EchoServicer(), policies=[policy], client_policies=[policy]) as t:
        stub = t.stub(echo_pb2_grpc.EchoServiceStub)
        await stub.Echo(echo_pb2.EchoRequest(text="x"))
        with pytest.raises(Exception, match="internal"):
            await stub.Fail(echo_pb2.FailRequest(error="unexpected"))
    records = [r for r in caplog.records if r.name == "framework.access"]
    fields = [(r.side, r.method, r.code, r.levelname) for r in records]  # type: ignore[attr-defined]
    assert fields == [
        ("server", "Echo", "OK", "INFO"),
        ("client", "Echo", "OK", "INFO"),
        ("server", "Fail", "INTERNAL", "WARNING"),
        ("client", "Fail", "INTERNAL", "WARNING"),
    ]
    assert records[0].service == "echo.v1.EchoService"  # type: ignore[attr-defined]
    assert "127.0.0.1" in records[0].peer  # type: ignore[attr-defined]


async def test_a_logger_sink_costs_nothing_when_the_level_is_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With the logger above INFO no record is built."""
    caplog.set_level(logging.WARNING, logger="framework.access")
    policy = AccessLogPolicy(logging.getLogger("framework.access"))
    async with serve(EchoServicer(), policies=[policy]) as t:
        await t.stub(echo_pb2_grpc.EchoServiceStub).Echo(echo_pb2.EchoRequest(text="x"))
    assert [r for r in caplog.records if r.name == "framework.access"] == []


def test_bad_settings_are_refused_with_the_field_named() -> None:
    """Out-of-range sampling and batching settings raise ValueError naming the field."""
    with pytest.raises(ValueError, match="sample_ratio"):
        AccessLogPolicy(AccessLogWriter(io.StringIO()), sample_ratio=1.5)
    with pytest.raises(ValueError, match="max_batch"):
        AccessLogWriter(io.StringIO(), max_batch=10, max_pending=5)


async def test_a_call_the_client_cancels_is_logged_as_cancelled() -> None:
    """A call dropped half-way by its client gets a server record with code CANCELLED,
    written at once (an error record)."""

    stream = io.StringIO()
    writer = AccessLogWriter(stream, flush_interval_s=600)
    gate = EchoServicer(release=asyncio.Event())  # holds Echo until released: never here
    async with serve(gate, policies=[AccessLogPolicy(writer)]) as t:
        stub = t.stub(echo_pb2_grpc.EchoServiceStub)
        call = asyncio.ensure_future(stub.Echo(echo_pb2.EchoRequest(text="held")))
        await asyncio.wait_for(gate.started.wait(), timeout=60)
        call.cancel()
        await _until(lambda: '"code":"CANCELLED"' in stream.getvalue())
    (record,) = _records(stream)
    assert (record["side"], record["method"], record["code"]) == ("server", "Echo", "CANCELLED")
