"""Drain: in-flight calls tracked, their exits awaited before policies close, and a drain
signal that lets a long-lived stream end itself cleanly."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from framework.config import ServerConfig
from framework.server import Server, drain_signal
from gen.echo.v1 import echo_pb2, echo_pb2_grpc
from tests.framework.recording import RecordingPolicy
from tests.processes import run_module

ROOT = Path(__file__).resolve().parents[2]


class ClosingRecorder(RecordingPolicy):
    """Records enters and exits, and when the server closes it."""

    async def close(self) -> None:
        self.log.append(f"close:{self.name}")


class Streams(echo_pb2_grpc.EchoServiceServicer):
    """EchoStream ignores draining (cut at the end of grace); Chat ends on the signal."""

    def __init__(self) -> None:
        self.streaming = asyncio.Event()
        self.signals: list[bool] = []

    async def EchoStream(self, request: echo_pb2.EchoRequest, context: Any) -> AsyncIterator[Any]:
        yield echo_pb2.EchoResponse(text="first")
        self.streaming.set()
        await asyncio.Event().wait()  # never ends by itself
        yield echo_pb2.EchoResponse(text="never")

    async def Chat(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        drain = drain_signal()
        assert drain is not None
        self.signals.append(drain.is_set())
        yield echo_pb2.EchoResponse(text="first")
        self.streaming.set()
        await drain.wait()
        self.signals.append(drain.is_set())
        yield echo_pb2.EchoResponse(text="bye")


def _config(grace_s: float) -> ServerConfig:
    return ServerConfig(
        name="drain", host="127.0.0.1", port=0, grace_s=grace_s, drain_delay_s=0, insecure_dev=True
    )


async def test_exits_of_calls_cut_at_the_end_of_grace_run_before_policies_close() -> None:
    """A stream that outlives the grace period is cut; its exit (CANCELLED) has run, and
    the server counts no call in flight, before any policy is closed and stop() returns."""
    log: list[str] = []
    servicer = Streams()
    server = Server(_config(grace_s=0.2), policies=[ClosingRecorder("s", log)])
    server.add(servicer)
    await server.start()
    async with grpc.aio.insecure_channel(server.address) as channel:
        stream = echo_pb2_grpc.EchoServiceStub(channel).EchoStream(
            echo_pb2.EchoRequest(), timeout=30
        )
        assert (await stream.read()).text == "first"
        await asyncio.wait_for(servicer.streaming.wait(), 60)
        assert server.in_flight == 1
        await server.stop()
        in_flight = server.in_flight
        try:
            await stream.read()
        except grpc.aio.AioRpcError as error:
            cut = error.code()
    assert log == ["enter:s", "exit:s:CANCELLED", "close:s"]
    assert in_flight == 0
    assert cut in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


async def test_a_long_lived_stream_ends_itself_cleanly_on_the_drain_signal() -> None:
    """A handler waiting on drain_signal() says goodbye and ends with OK when the server
    drains, well within the grace period; its exit sees OK."""
    log: list[str] = []
    servicer = Streams()
    server = Server(_config(grace_s=30), policies=[ClosingRecorder("s", log)])
    server.add(servicer)
    await server.start()
    async with grpc.aio.insecure_channel(server.address) as channel:
        chat = echo_pb2_grpc.EchoServiceStub(channel).Chat(timeout=30)
        assert (await chat.read()).text == "first"
        await asyncio.wait_for(servicer.streaming.wait(), 60)
        assert not server.draining.is_set()
        stopping = asyncio.ensure_future(server.stop())
        assert (await chat.read()).text == "bye"
        assert await chat.read() is grpc.aio.EOF
        code = await chat.code()
        await asyncio.wait_for(stopping, 20)  # bounded; the stream ended, grace is 30 s
    assert code == grpc.StatusCode.OK
    assert servicer.signals == [False, True]
    assert log == ["enter:s", "exit:s:OK", "close:s"]
    assert drain_signal() is None  # outside a call


def test_the_default_drain_delay_lets_load_balancers_see_not_serving() -> None:
    """The default ServerConfig waits a little between NOT_SERVING and refusing calls."""
    assert 0 < ServerConfig().drain_delay_s <= 1
    assert ServerConfig.from_env("x", {"SERVICE_DRAIN_DELAY_S": "0"}).drain_delay_s == 0


async def test_a_stream_finalized_after_its_server_stopped_does_not_crash_the_process() -> None:
    """A response stream cancelled while its handler waits at a yield is finalized later,
    after the server stopped: its exits run once with CANCELLED and the process lives.
    Before, the access log's exit read the peer from the freed call: SIGSEGV."""
    code, out, err = await run_module("tests.framework.stream_finalized_app", timeout_s=300)
    assert code == 0, err.decode(errors="replace")[-3000:]
    log = json.loads(out)  # each stream's exits once (finalization order may interleave)
    assert sorted(log) == ["enter:r"] * 20 + ["exit:r:CANCELLED"] * 20
    assert err.decode().count('"code":"CANCELLED"') == 20  # the access log saw each one
