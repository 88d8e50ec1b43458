"""Sync servicer methods and sync generators run in the server's executor, as grpc.aio
runs them: they overlap, see the call's context variables, and never stall the loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from framework.policy import current_call, only
from framework.testing import serve
from gen.echo.v1 import echo_pb2, echo_pb2_grpc
from tests.framework.recording import RecordingPolicy

CONCURRENT = 4


class Blocking(echo_pb2_grpc.EchoServiceServicer):
    """Sync handlers that block their thread (as a sync database driver would)."""

    def __init__(self) -> None:
        # every Echo waits until all CONCURRENT have started: only possible if they overlap
        self.together = threading.Barrier(CONCURRENT, timeout=30)
        self.release = threading.Event()
        self.entered = threading.Event()
        self.loop_threads: set[int] = set()

    def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        if request.text == "hold":
            self.entered.set()
            self.release.wait(30)
        else:
            self.together.wait()
        call = current_call()
        name = call.method.full_name if call is not None else "no call"
        keys = sorted(k for k, _ in context.invocation_metadata())
        return echo_pb2.EchoResponse(text=f"{request.text}:{name}", metadata_keys=keys)

    def EchoStream(self, request: echo_pb2.EchoRequest, context: Any) -> Iterator[Any]:
        for i in range(request.repeat):
            if i == 1:
                self.entered.set()
                self.release.wait(30)  # blocks between two messages
            call = current_call()
            yield echo_pb2.EchoResponse(text=f"{i}:{call.method.name if call else '-'}")

    def Collect(self, request_iterator: Iterator[Any], context: Any) -> echo_pb2.EchoResponse:
        return echo_pb2.EchoResponse(text=",".join(r.text for r in request_iterator))


async def test_sync_handlers_overlap_in_the_executor_with_the_call_context() -> None:
    """Four concurrent calls of a blocking sync handler all run at once (each waits at a
    barrier the four must reach together) and see current_call() and their context."""
    log: list[str] = []
    servicer = Blocking()
    async with serve(servicer, policies=[RecordingPolicy("s", log)]) as t:
        stub = t.stub(echo_pb2_grpc.EchoServiceStub)
        replies = await asyncio.gather(
            *(
                stub.Echo(echo_pb2.EchoRequest(text=f"c{i}"), metadata=(("x-n", str(i)),))
                for i in range(CONCURRENT)
            )
        )
    assert sorted(r.text for r in replies) == [
        f"c{i}:/echo.v1.EchoService/Echo" for i in range(CONCURRENT)
    ]
    assert all("x-n" in r.metadata_keys for r in replies)
    assert log.count("exit:s:OK") == CONCURRENT


async def test_a_blocked_sync_handler_or_generator_does_not_stall_health() -> None:
    """While a sync handler and a sync generator are blocked in their threads, health
    Check and Watch still answer; then both finish normally through the chain."""
    log: list[str] = []
    servicer = Blocking()
    recording = only(RecordingPolicy("s", log), "echo.v1.EchoService")
    async with serve(servicer, policies=[recording]) as t:
        channel = grpc.aio.insecure_channel(t.target)
        stub = echo_pb2_grpc.EchoServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        held = asyncio.ensure_future(stub.Echo(echo_pb2.EchoRequest(text="hold"), timeout=30))
        await asyncio.to_thread(servicer.entered.wait, 30)
        checked = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        servicer.entered.clear()
        stream = stub.EchoStream(echo_pb2.EchoRequest(repeat=3), timeout=30)
        first = await stream.read()
        await asyncio.to_thread(servicer.entered.wait, 30)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        watched = await watch.read()
        watch.cancel()
        servicer.release.set()
        rest = []
        while (message := await stream.read()) is not grpc.aio.EOF:
            rest.append(message.text)
        reply = await held
        collected = await stub.Collect(iter([echo_pb2.EchoRequest(text=x) for x in "abc"]))
        await channel.close()
    assert checked.status == watched.status == health_pb2.HealthCheckResponse.SERVING
    assert reply.text == "hold:/echo.v1.EchoService/Echo"
    assert [first.text, *rest] == ["0:EchoStream", "1:EchoStream", "2:EchoStream"]
    assert collected.text == "a,b,c"
    assert sorted(log) == ["enter:s"] * 3 + ["exit:s:OK"] * 3
