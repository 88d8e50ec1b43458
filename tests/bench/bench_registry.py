"""Discovery overhead: Echo through the registry-balanced client vs a direct channel.

A subprocess (pinned to another core) serves two echo instances; an in-process
registry (SQLite, no probing) lists them.  The balanced client picks an
instance per call (round robin) over its own channels; the baseline is a plain
`framework.client.connect` channel to the first instance, with the same (empty)
client chain.  The BENCH line compares a balanced client whose service has only
that first instance (the pure cost of discovery and per-call picking); the
balanced client over both instances is printed for information.  Rounds are
interleaved (A B A B ...) and medians reported; the CPU time per call is this
(client) process's only.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

from framework.client import connect
from framework.registry.channel import balanced_channel
from framework.registry.health_probe import ProbeConfig
from framework.registry.registry import Registry, RegistryConfig
from framework.registry.sqlite import SqliteStore
from gen.echo.v1.echo_pb2 import EchoRequest
from gen.echo.v1.echo_pb2_grpc import EchoServiceStub
from tests.bench.harness import (
    bench_line,
    closed_loop,
    interleave,
    latency_us,
    median_cpu_us,
    median_rate,
    pin_to_cpu,
)

ROUNDS = 7
CALLS_PER_ROUND = 3000
CONCURRENCY = 16
SERVICE = "echo.v1.EchoService"
SERVICE_ONE = "echo-first-instance"  # same server, registered alone under another name


async def _serve_echo() -> None:
    """Subprocess: two echo servers; print their addresses; run until stdin closes."""
    from framework.config import ServerConfig
    from framework.server import Server
    from framework.testing.echo import EchoServicer

    pin_to_cpu(1)
    servers = []
    for _ in range(2):
        server = Server(ServerConfig(name="echo", grace_s=0, reflection=False, insecure_dev=True))
        server.add(EchoServicer())
        await server.start()
        servers.append(server)
    print(" ".join(s.address for s in servers), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for server in servers:
        await server.stop(0)


async def main() -> None:
    pin_to_cpu(0)
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.bench.bench_registry",
        "serve",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None and child.stdin is not None
    line = await asyncio.wait_for(child.stdout.readline(), 30)
    addresses = line.decode().split()
    with tempfile.TemporaryDirectory() as tmp:
        registry = Registry(
            SqliteStore(Path(tmp) / "registry.sqlite"),
            RegistryConfig(probe=ProbeConfig(interval_s=0)),
        )
        await registry.start()
        for address in addresses:  # leases outlive the run
            await registry.register(SERVICE, address, ttl_s=300)
        await registry.register(SERVICE_ONE, addresses[0], ttl_s=300)
        from framework.config import ServerConfig
        from framework.registry.service import RegistryServicer
        from framework.server import Server

        registry_server = Server(
            ServerConfig(name="registry", grace_s=0, reflection=False, insecure_dev=True)
        )
        registry_server.add(RegistryServicer(registry))
        await registry_server.start()
        balanced = await balanced_channel(registry_server.address, SERVICE)
        balanced_one = await balanced_channel(registry_server.address, SERVICE_ONE)
        direct = connect(addresses[0])
        try:
            await balanced.channel_ready()
            await balanced_one.channel_ready()
            b_stub, d_stub = EchoServiceStub(balanced), EchoServiceStub(direct)
            o_stub = EchoServiceStub(balanced_one)
            request = EchoRequest(text="bench")
            for stub in (b_stub, o_stub, d_stub):  # warm up every channel
                for _ in range(300):
                    await stub.Echo(request)

            async def run_balanced_one() -> Any:
                return await closed_loop(
                    lambda: o_stub.Echo(request), concurrency=CONCURRENCY, total=CALLS_PER_ROUND
                )

            async def run_balanced() -> Any:
                return await closed_loop(
                    lambda: b_stub.Echo(request), concurrency=CONCURRENCY, total=CALLS_PER_ROUND
                )

            async def run_direct() -> Any:
                return await closed_loop(
                    lambda: d_stub.Echo(request), concurrency=CONCURRENCY, total=CALLS_PER_ROUND
                )

            samples = await interleave(
                ROUNDS, balanced_one=run_balanced_one, direct=run_direct, balanced=run_balanced
            )
        finally:
            await balanced.close()
            await balanced_one.close()
            await direct.close()
            await registry_server.stop(0)
            await registry.close()
            child.stdin.close()
            await child.wait()
    o_rate, d_rate = median_rate(samples["balanced_one"]), median_rate(samples["direct"])
    b_rate = median_rate(samples["balanced"])
    for name, rate in (("balanced_one", o_rate), ("direct", d_rate), ("balanced", b_rate)):
        print(
            f"{name:12} {rate:.0f} calls/s, {median_cpu_us(samples[name]):.0f} us client CPU/call,"
            f" p50 {latency_us(samples[name], 0.5):.0f} us,"
            f" p99 {latency_us(samples[name], 0.99):.0f} us"
        )
    print(f"balanced over two instances / direct to one: {b_rate / d_rate:.3f}")
    bench_line(
        "registry_balanced_unary",
        o_rate / d_rate,
        o_rate,
        "calls/s",
        "direct channel to one instance (same client chain), same run",
    )


if __name__ == "__main__" and sys.argv[1:] == ["serve"]:
    asyncio.run(_serve_echo())
