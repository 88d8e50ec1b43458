"""JWT auth price, end to end: the same framework server with and without `AuthPolicy`.

Server process (pinned to core 0) runs two framework `Server`s with the same
`EchoServicer`: one with no policy, one with `AuthPolicy` (HS256 key set).  The
client process (pinned to core 1) sends 32 calls in flight, every call carrying a
bearer token, in three interleaved variants:

- `open`:     server without auth (baseline; the token is sent but not read)
- `cached`:   server with auth, the same token on every call (a real client's case)
- `uncached`: server with auth, a different token on every call (cache misses:
              one full HS256 verification per call, the worst case)

Server CPU per call is read from /proc/<pid>/stat around each round.
BENCH line: `auth_hs256_unary` = cached calls/s over open calls/s.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import jwt

from tests.bench.harness import (
    Sample,
    bench_line,
    closed_loop,
    interleave,
    latency_us,
    median_cpu_us,
    median_rate,
    pin_to_cpu,
)

CONCURRENCY = 32
CALLS_PER_ROUND = 3000
ROUNDS = 5
WARMUP_CALLS = 1000
SECRET = b"bench-secret-bench-secret-bench-secret!!"
ISSUER, AUDIENCE = "https://id.bench.local", "echo"


def _token(jti: int) -> str:
    claims = {
        "sub": "bench-client",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "scope": "echo:read",
        "exp": int(time.time()) + 3600,
        "jti": str(jti),
    }
    return jwt.encode(claims, SECRET, algorithm="HS256", headers={"kid": "k1"})


async def _serve(conn: multiprocessing.connection.Connection) -> None:
    from framework.auth.keyset import KeySet, StaticKeys, VerificationKey
    from framework.auth.policy import AuthPolicy, JwtConfig, JwtVerifier
    from framework.config import ServerConfig
    from framework.server import Server
    from framework.testing.echo import EchoServicer

    keys = KeySet(StaticKeys([VerificationKey.hmac("k1", SECRET)]))
    verifier = JwtVerifier(keys, JwtConfig(issuer=ISSUER, audience=AUDIENCE))
    servers = []
    for policies in ([], [AuthPolicy(verifier)]):
        server = Server(
            ServerConfig(
                name="bench",
                host="127.0.0.1",
                port=0,
                grace_s=0.5,
                reflection=False,
                insecure_dev=not policies,  # the baseline: no authentication at all
            ),
            policies=policies,
        )
        server.add(EchoServicer())
        await server.start()
        servers.append(server)
    conn.send((servers[0].port, servers[1].port))
    loop = asyncio.get_running_loop()
    while await loop.run_in_executor(None, conn.recv) != "stop":
        conn.send("ok")
    conn.send(f"misses={verifier.misses}")
    for server in servers:
        await server.stop(grace_s=0)


def _server_main(conn: multiprocessing.connection.Connection) -> None:
    pin_to_cpu(0)
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_serve(conn))


def _process_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _run() -> None:
    from framework.client import connect
    from gen.echo.v1.echo_pb2 import EchoRequest
    from gen.echo.v1.echo_pb2_grpc import EchoServiceStub

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_server_main, args=(child,), daemon=True)
    process.start()
    try:
        open_port, auth_port = parent.recv()
        assert process.pid is not None
        pid = process.pid
        pin_to_cpu(1)
        fresh = [_token(i) for i in range(CALLS_PER_ROUND * (ROUNDS + 1) + WARMUP_CALLS)]
        tokens = iter(fresh)
        same = [("authorization", f"Bearer {_token(-1)}")]
        open_stub = EchoServiceStub(connect(f"127.0.0.1:{open_port}"))
        auth_stub = EchoServiceStub(connect(f"127.0.0.1:{auth_port}"))
        request = EchoRequest(text="hello")

        async def open_call() -> object:
            return await open_stub.Echo(request, metadata=same)

        async def cached_call() -> object:
            return await auth_stub.Echo(request, metadata=same)

        async def uncached_call() -> object:
            token = next(tokens)
            return await auth_stub.Echo(request, metadata=[("authorization", f"Bearer {token}")])

        server_cpu: dict[str, list[float]] = {}

        def variant(name: str, call: Callable[[], Awaitable[object]]) -> Callable[[], Any]:
            async def run() -> Sample:
                cpu0 = _process_cpu_s(pid)
                sample = await closed_loop(call, concurrency=CONCURRENCY, total=CALLS_PER_ROUND)
                cpu_us = (_process_cpu_s(pid) - cpu0) / sample.ops * 1e6
                server_cpu.setdefault(name, []).append(cpu_us)
                return sample

            return run

        for call in (open_call, cached_call, uncached_call):
            await closed_loop(call, concurrency=CONCURRENCY, total=WARMUP_CALLS // 3)
        results = await interleave(
            ROUNDS,
            open=variant("open", open_call),
            cached=variant("cached", cached_call),
            uncached=variant("uncached", uncached_call),
        )
    finally:
        parent.send("stop")
        print(f"server verifier {parent.recv()} (full verifications)", flush=True)
        process.join(timeout=10)

    for name, samples in results.items():
        print(
            f"{name:8s} calls/s={median_rate(samples):8.0f} "
            f"p50={latency_us(samples, 0.5):7.0f}us p99={latency_us(samples, 0.99):7.0f}us "
            f"client_cpu={median_cpu_us(samples):6.1f}us/call "
            f"server_cpu={statistics.median(server_cpu[name]):6.1f}us/call",
            flush=True,
        )
    base = statistics.median(server_cpu["open"])
    print(
        f"server cpu added: cached={statistics.median(server_cpu['cached']) - base:.1f}us "
        f"uncached={statistics.median(server_cpu['uncached']) - base:.1f}us per call",
        flush=True,
    )
    ratio = median_rate(results["cached"]) / median_rate(results["open"])
    bench_line("auth_hs256_unary", ratio, median_rate(results["cached"]), "calls/s", "no_auth")
    uncached_ratio = median_rate(results["uncached"]) / median_rate(results["open"])
    bench_line(
        "auth_hs256_uncached_unary",
        uncached_ratio,
        median_rate(results["uncached"]),
        "calls/s",
        "no_auth",
    )


def main() -> None:
    asyncio.run(_run())
