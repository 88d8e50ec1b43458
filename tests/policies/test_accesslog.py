"""Structured request logging: one record per call with the fields operators filter on."""

from __future__ import annotations

import logging

import pytest

from framework.errors import NotFoundError
from framework.policies.accesslog import AccessLogPolicy
from framework.testing import serve
from framework.testing.echo import EchoServicer
from gen.echo.v1 import echo_pb2, echo_pb2_grpc


async def test_each_call_logs_service_method_code_duration_and_peer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Server and client records carry the structured fields; health checks stay quiet."""
    caplog.set_level(logging.INFO, logger="framework.access")
    async with serve(
        EchoServicer(), policies=[AccessLogPolicy()], client_policies=[AccessLogPolicy()]
    ) as t:
        stub = t.stub(echo_pb2_grpc.EchoServiceStub)
        await stub.Echo(echo_pb2.EchoRequest(text="x"))
        with pytest.raises(NotFoundError):
            await stub.Fail(echo_pb2.FailRequest(error="NotFoundError"))
        with pytest.raises(Exception, match="internal"):
            await stub.Fail(echo_pb2.FailRequest(error="unexpected"))
    records = [r for r in caplog.records if r.name == "framework.access"]
    fields = [(r.side, r.method, r.code, r.levelname) for r in records]  # type: ignore[attr-defined]
    assert fields == [
        ("server", "Echo", "OK", "INFO"),
        ("client", "Echo", "OK", "INFO"),
        ("server", "Fail", "NOT_FOUND", "INFO"),
        ("client", "Fail", "NOT_FOUND", "INFO"),
        ("server", "Fail", "INTERNAL", "WARNING"),
        ("client", "Fail", "INTERNAL", "WARNING"),
    ]
    server_record = records[0]
    assert server_record.service == "echo.v1.EchoService"  # type: ignore[attr-defined]
    assert server_record.duration_ms >= 0  # type: ignore[attr-defined]
    assert "127.0.0.1" in server_record.peer  # type: ignore[attr-defined]


async def test_logging_costs_nothing_when_the_level_is_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With the logger above INFO no record is built."""
    caplog.set_level(logging.WARNING, logger="framework.access")
    async with serve(EchoServicer(), policies=[AccessLogPolicy()]) as t:
        await t.stub(echo_pb2_grpc.EchoServiceStub).Echo(echo_pb2.EchoRequest(text="x"))
    assert [r for r in caplog.records if r.name == "framework.access"] == []
