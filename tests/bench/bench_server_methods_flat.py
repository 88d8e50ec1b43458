"""Server CPU per unary call as the number of served methods grows (#23 item 2).

The server process (pinned to core 0) runs framework `Server`s serving the echo
service plus dummy methods, 10, 100 and 1,000 methods in all, and, for reference,
bare grpc.aio servers with the same methods registered the way generated code
registers them (10 and 1,000).  The client process (this one, pinned to core 1)
calls `Echo` on each through a bare channel, 32 calls in flight; rounds are
interleaved and the server's CPU per call is read from /proc/<pid>/stat around each
round.  The framework serves every method through one generic handler (one
dictionary lookup), so its cost should stay flat; the summary ratio is CPU per call
with 10 methods / with 1,000 (1.0 = flat, goal >= 0.9).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import statistics
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from tests.bench.harness import (
    Sample,
    bench_line,
    closed_loop,
    interleave,
    median_rate,
    pin_to_cpu,
)

CONCURRENCY = 32
CALLS_PER_ROUND = 3000
ROUNDS = 5
FRAMEWORK_SIZES = (10, 100, 1000)
BARE_SIZES = (10, 1000)
METHODS_PER_SERVICE = 100


def _dummy_handlers(count: int) -> dict[str, dict[str, grpc.RpcMethodHandler]]:
    """`count` dummy unary methods, 100 per service (bench.v1.Dummy0, Dummy1, ...)."""
    from gen.echo.v1 import echo_pb2

    async def dummy(request: Any, context: Any) -> Any:
        return echo_pb2.EchoResponse(text=request.text)

    handler = grpc.unary_unary_rpc_method_handler(
        dummy,
        request_deserializer=echo_pb2.EchoRequest.FromString,
        response_serializer=echo_pb2.EchoResponse.SerializeToString,
    )
    services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
    for i in range(count):
        service = f"bench.v1.Dummy{i // METHODS_PER_SERVICE}"
        services.setdefault(service, {})[f"M{i % METHODS_PER_SERVICE}"] = handler
    return services


async def _serve(conn: multiprocessing.connection.Connection) -> None:
    from framework.config import ServerConfig
    from framework.server import Server
    from framework.testing.echo import EchoServicer
    from gen.echo.v1 import echo_pb2_grpc

    echo_methods = 5  # Echo, EchoStream, Collect, Chat, Fail
    ports: dict[str, int] = {}
    framework_servers: list[Server] = []
    for size in FRAMEWORK_SIZES:
        server = Server(
            ServerConfig(name=f"flat{size}", port=0, grace_s=0, insecure_dev=True, health=False)
        )
        server.add(EchoServicer())
        for service, handlers in _dummy_handlers(size - echo_methods).items():
            server.add_registered_method_handlers(service, handlers)
        ports[f"framework_{size}"] = await server.start()
        framework_servers.append(server)
    bare_servers: list[grpc.aio.Server] = []
    for size in BARE_SIZES:
        bare = grpc.aio.server()
        echo_pb2_grpc.add_EchoServiceServicer_to_server(EchoServicer(), bare)
        for service, handlers in _dummy_handlers(size - echo_methods).items():
            # as generated code registers a service
            bare.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(service, handlers),)
            )
            bare.add_registered_method_handlers(service, handlers)
        ports[f"bare_{size}"] = bare.add_insecure_port("127.0.0.1:0")
        await bare.start()
        bare_servers.append(bare)
    conn.send(ports)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, conn.recv)  # "stop"
    for server in framework_servers:
        await server.stop(grace_s=0)
    for bare in bare_servers:
        await bare.stop(0)
    conn.send("stopped")


def _server_main(conn: multiprocessing.connection.Connection) -> None:
    pin_to_cpu(0)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("framework.server").setLevel(logging.ERROR)  # insecure_dev notices
    asyncio.run(_serve(conn))


def _process_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _run() -> None:
    from gen.echo.v1.echo_pb2 import EchoRequest
    from gen.echo.v1.echo_pb2_grpc import EchoServiceStub

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_server_main, args=(child,), daemon=True)
    process.start()
    try:
        ports: dict[str, int] = parent.recv()
        assert process.pid is not None
        pid = process.pid
        pin_to_cpu(1)
        channels = {name: grpc.aio.insecure_channel(f"127.0.0.1:{p}") for name, p in ports.items()}
        request = EchoRequest(text="hello")
        server_cpu: dict[str, list[float]] = {}

        def variant(name: str) -> Callable[[], Awaitable[Sample]]:
            stub = EchoServiceStub(channels[name])

            async def call() -> object:
                return await stub.Echo(request, timeout=30)

            async def run() -> Sample:
                cpu0 = _process_cpu_s(pid)
                sample = await closed_loop(call, concurrency=CONCURRENCY, total=CALLS_PER_ROUND)
                server_cpu.setdefault(name, []).append((_process_cpu_s(pid) - cpu0) / sample.ops)
                return sample

            return run

        variants = {name: variant(name) for name in ports}
        for run in variants.values():  # warm up connections and caches: one round each
            await run()
        server_cpu.clear()
        results = await interleave(ROUNDS, **variants)
        for channel in channels.values():
            await channel.close()
    finally:
        parent.send("stop")
        parent.recv()
        process.join(timeout=10)

    cpu_us = {name: statistics.median(values) * 1e6 for name, values in server_cpu.items()}
    for name in ports:
        print(
            f"{name:15s} calls/s={median_rate(results[name]):8.0f} "
            f"server_cpu={cpu_us[name]:6.1f}us/call",
            flush=True,
        )
    ratio = cpu_us["framework_10"] / cpu_us["framework_1000"]
    print(
        "framework server CPU per call 10 -> 100 -> 1000 methods: "
        + " -> ".join(f"{cpu_us[f'framework_{n}']:.0f}us" for n in FRAMEWORK_SIZES)
        + f"; bare grpc.aio registered methods 10 -> 1000: {cpu_us['bare_10']:.0f}us -> "
        f"{cpu_us['bare_1000']:.0f}us",
        flush=True,
    )
    bench_line(
        "server_methods_flat",
        ratio,
        cpu_us["framework_1000"],
        "server_cpu_us_per_call",
        "same_server_10_methods",
    )


def main() -> None:
    asyncio.run(_run())
