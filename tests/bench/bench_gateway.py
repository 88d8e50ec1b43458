"""HTTP/JSON through the gateway vs direct gRPC through the same client chain.

Processes: an echo backend (pinned to core 1); the gateway (uvicorn + httptools,
pinned to core 0), whose client chain is `[CircuitBreakerPolicy]` plus the
pinned deadline step, with its default ingress chain minus auth (rate limit);
this process (core 0) drives both variants in interleaved rounds:

- gateway: `POST /v1/echo {"text": "bench"}` over keep-alive HTTP/1.1
  connections (a minimal load generator on raw sockets, so that the client's
  own HTTP cost stays small next to the gateway's);
- direct: `EchoService/Echo` through `connect(backend, policies=[CircuitBreakerPolicy()])`.

The BENCH line is gateway calls/s over direct calls/s.  The gateway variant
pays an extra hop (HTTP in, gRPC out) and shares core 0 with the load
generator; direct gRPC's client runs alone on core 0.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from tests.bench.harness import (
    Sample,
    bench_line,
    closed_loop,
    cpu_seconds,
    interleave,
    latency_us,
    median_rate,
    pin_to_cpu,
)

ROUNDS = 5
CALLS_PER_ROUND = 2000
CONCURRENCY = 16
BODY = json.dumps({"text": "bench"}).encode()


async def _backend() -> None:
    """Subprocess: an echo server; print its address; run until stdin closes."""
    from framework.config import ServerConfig
    from framework.server import Server
    from framework.testing.echo import EchoServicer

    pin_to_cpu(1)
    server = Server(ServerConfig(name="echo", grace_s=0, reflection=False))
    server.add(EchoServicer())
    await server.start()
    print(server.address, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(0)


async def _gateway(backend: str) -> None:
    """Subprocess: the gateway in front of `backend`; print its URL; run until stdin closes."""
    from framework.gateway import GatewayConfig, build_gateway, running

    pin_to_cpu(0)
    config = GatewayConfig(
        port=0, auth="off", backends={"echo.v1.EchoService": backend}, rate_per_s=1e9, burst=10**9
    )
    gateway = build_gateway(config, services=["echo.v1.EchoService"])
    async with running(gateway) as url:
        print(url, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


class _Connection:
    """One keep-alive HTTP/1.1 connection sending the same POST; reads each answer whole."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.request = (
            f"POST /v1/echo HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
        ).encode() + BODY
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def call(self) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"gateway answered {head[:40]!r}")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def _http_round(host: str, port: int) -> Sample:
    connections = [_Connection(host, port) for _ in range(CONCURRENCY)]
    latencies: list[float] = []
    remaining = CALLS_PER_ROUND

    async def worker(connection: _Connection) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            start = time.perf_counter()
            await connection.call()
            latencies.append(time.perf_counter() - start)

    cpu0, t0 = cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections))
    sample = Sample(
        len(latencies), time.perf_counter() - t0, cpu_seconds() - cpu0, tuple(latencies)
    )
    for connection in connections:
        await connection.close()
    return sample


async def _child(*args: str) -> tuple[Any, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.bench.bench_gateway",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 60)
    return process, line.decode().strip()


async def _stop(process: Any) -> None:
    process.stdin.close()
    await asyncio.wait_for(process.wait(), 30)


async def main() -> None:
    from framework.client import connect
    from framework.policies.breaker import CircuitBreakerPolicy
    from gen.echo.v1.echo_pb2 import EchoRequest
    from gen.echo.v1.echo_pb2_grpc import EchoServiceStub

    pin_to_cpu(0)
    backend, address = await _child("backend")
    gateway, url = await _child("gateway", address)
    host, port = url.removeprefix("http://").split(":")
    channel = connect(address, policies=[CircuitBreakerPolicy()])
    try:
        stub = EchoServiceStub(channel)
        request = EchoRequest(text="bench")
        for _ in range(300):  # warm up both paths
            await stub.Echo(request)
        await _http_round(host, int(port))

        async def direct() -> Sample:
            return await closed_loop(
                lambda: stub.Echo(request), concurrency=CONCURRENCY, total=CALLS_PER_ROUND
            )

        async def through_gateway() -> Sample:
            return await _http_round(host, int(port))

        samples = await interleave(ROUNDS, gateway=through_gateway, direct=direct)
    finally:
        await channel.close()
        await _stop(gateway)
        await _stop(backend)
    via, plain = median_rate(samples["gateway"]), median_rate(samples["direct"])
    print(
        f"gateway {via:.0f} calls/s (p50 {latency_us(samples['gateway'], 0.5):.0f} us, "
        f"p99 {latency_us(samples['gateway'], 0.99):.0f} us); direct gRPC {plain:.0f} calls/s "
        f"(p50 {latency_us(samples['direct'], 0.5):.0f} us, "
        f"p99 {latency_us(samples['direct'], 0.99):.0f} us); concurrency {CONCURRENCY}",
        flush=True,
    )
    bench_line("gateway_unary", via / plain, via, "calls/s", "direct_grpc_same_client_chain")


if __name__ == "__main__":
    if sys.argv[1:2] == ["backend"]:
        asyncio.run(_backend())
    elif sys.argv[1:2] == ["gateway"]:
        asyncio.run(_gateway(sys.argv[2]))
    else:
        asyncio.run(main())
