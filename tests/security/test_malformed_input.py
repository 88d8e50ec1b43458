"""Malformed input from an attacker on the wire (#12 item 9): request bytes that do not
parse, and metadata that is not UTF-8, answered cleanly with nothing secret in the logs."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import grpc.aio
import pytest

from framework.auth.policy import AuthPolicy
from framework.config import ServerConfig
from framework.policy import only
from framework.testing import serve
from framework.testing.echo import EchoServicer
from gen.echo.v1 import echo_pb2, echo_pb2_grpc
from tests.framework.recording import RecordingPolicy
from tests.security.kit import Issuer
from tests.security.rawh2 import END_HEADERS, END_STREAM, HEADERS, grpc_call

ECHO = "/echo.v1.EchoService/Echo"
SECRET = b"s3cr3t-token-part"


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def _mentions(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    found = []
    for record in caplog.records:
        text = f"{record.getMessage()} {record.exc_text or ''} {record.args!r}"
        if needle in text:
            found.append(text[:200])
    return found


async def test_malformed_request_bytes_are_invalid_argument_through_the_chain(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Bytes that are not the request message: INVALID_ARGUMENT with a generic message
    (not UNKNOWN with the parser's text), seen by the chain's exits, no error logged."""
    caplog.set_level(logging.DEBUG)
    log: list[str] = []
    recording = only(RecordingPolicy("s", log), "echo.v1.EchoService")
    async with (
        serve(EchoServicer(), policies=[recording]) as t,
        grpc.aio.insecure_channel(t.target) as channel,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary(ECHO)(b"\xff\xff\xff\xff", timeout=10)
        reply = await echo_pb2_grpc.EchoServiceStub(channel).Echo(
            echo_pb2.EchoRequest(text="still fine"), timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details() or ""
    assert "could not be parsed" in details
    assert "Wire format" not in details and "DecodeError" not in details
    assert reply.text == "still fine"
    assert log == ["enter:s", "exit:s:INVALID_ARGUMENT", "enter:s", "exit:s:OK"]
    assert not _errors(caplog)


async def test_malformed_bytes_from_an_anonymous_caller_are_refused_by_auth_first() -> None:
    """Authentication runs before the request is parsed: an anonymous caller sending
    garbage learns UNAUTHENTICATED, nothing about the message."""
    issuer = Issuer()
    config = ServerConfig(name="secure", host="127.0.0.1", port=0, grace_s=0)
    async with (
        serve(EchoServicer(), policies=[AuthPolicy(issuer.verifier())], config=config) as t,
        grpc.aio.insecure_channel(t.target) as channel,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary(ECHO)(b"\xff\xff\xff\xff", timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_an_authorization_value_that_is_not_utf8_is_never_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A raw HTTP/2 request whose authorization header is not UTF-8 (grpc's client refuses
    to send one): the call is answered, no ERROR traceback, the value appears in no log."""
    caplog.set_level(logging.DEBUG)
    issuer = Issuer()
    config = ServerConfig(name="secure", host="127.0.0.1", port=0, grace_s=0)
    log: list[str] = []
    policies: list[Any] = [
        only(RecordingPolicy("s", log), "echo.v1.EchoService"),
        AuthPolicy(issuer.verifier()),
    ]
    async with serve(EchoServicer(), policies=policies, config=config) as t:
        message = echo_pb2.EchoRequest(text="x").SerializeToString()
        frames = await grpc_call(
            "127.0.0.1",
            t.port,
            ECHO,
            [(b"authorization", b"Bearer " + SECRET + b"\xff\xfe"), (b"x-note", b"\xc3\x28")],
            message,
        )
        token = issuer.token("alice", ["echo:read"])
        async with grpc.aio.insecure_channel(t.target) as channel:
            reply = await echo_pb2_grpc.EchoServiceStub(channel).Echo(
                echo_pb2.EchoRequest(text="fine"),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=10,
            )
    assert frames[-1] == (HEADERS, END_STREAM | END_HEADERS)  # trailers ended the call
    assert log == ["enter:s", "exit:s:UNAUTHENTICATED", "enter:s", "exit:s:OK"]
    assert reply.text == "fine"
    assert not _errors(caplog)
    assert not _mentions(caplog, SECRET.decode())
    assert any("not valid UTF-8" in r.getMessage() for r in caplog.records)
