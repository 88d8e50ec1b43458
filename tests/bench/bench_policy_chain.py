"""Full policy chain vs bare grpc.aio, unary Echo, 32 calls in flight.

Server process (pinned to core 0) runs two servers on 127.0.0.1 with the same
`EchoServicer`: a bare `grpc.aio` server, and a framework `Server` with the
server chain (error mapping (pinned) -> access log -> auth HS256 -> rate limit
in-memory -> bulkhead).  The client process (this one, pinned to core 1) calls
the bare server through a bare channel, and the framework server through
`connect()` with the client chain (breaker -> retry (service config) -> bearer
token -> deadline (pinned)).  A third server runs the same chain without the
access log, to price the log record apart.  Rounds are interleaved; medians are reported.
Server CPU per call is read from /proc/<pid>/stat around each round.

Access log records are really formatted and written (to /dev/null), as in
production, by the framework's batched `AccessLogWriter` (`LOG_HANDLER=logging` writes
them through stdlib logging instead, `LOG_HANDLER=buffered` through a `MemoryHandler`);
the JWT is the same on every call, as a real client's would be
until it refreshes, so the verifier's token cache is exercised.

Diagnosis knobs: `PROFILE=server` (or `client`) runs cProfile in that process
(one profile per variant, over every round) and prints the top functions by own
time;
`SKIP=accesslog,auth,ratelimit,bulkhead,breaker,retry,bearer` leaves those
policies out, to price each one.
"""

from __future__ import annotations

import asyncio
import cProfile
import logging
import logging.handlers
import multiprocessing
import multiprocessing.connection
import os
import pstats
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
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
CALLS_PER_ROUND = 4000
ROUNDS = 7
SERIAL_CALLS_PER_ROUND = 400  # one call in flight: latency without queueing
WARMUP_CALLS = 1000
SECRET = b"bench-secret-bench-secret-bench-secret!!"
ISSUER, AUDIENCE = "https://id.bench.local", "echo"


def _token() -> str:
    claims = {
        "sub": "bench-client",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "scope": "echo:read",
        "exp": int(time.time()) + 3600,
    }
    return jwt.encode(claims, SECRET, algorithm="HS256", headers={"kid": "k1"})


SKIP = frozenset(filter(None, os.environ.get("SKIP", "").split(",")))


_SINKS: dict[str, Any] = {}


def _access_sink() -> Any:
    """One access-log sink per process, writing to /dev/null as a real deployment writes
    to a file: the framework's batched writer, or stdlib logging with LOG_HANDLER=logging
    (LOG_HANDLER=buffered: logging through a MemoryHandler, batches of 512)."""
    from framework.policies.accesslog import AccessLogWriter

    if "sink" in _SINKS:
        return _SINKS["sink"]
    kind = os.environ.get("LOG_HANDLER", "writer")
    if kind == "writer":
        sink: Any = AccessLogWriter(open(os.devnull, "w"))  # noqa: SIM115 - lives for the process
    else:
        sink = logging.getLogger("bench.access")
        sink.setLevel(logging.INFO)
        sink.propagate = False
        handler: logging.Handler = logging.FileHandler(os.devnull)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        if kind == "buffered":  # write in batches; WARNING+ at once
            handler = logging.handlers.MemoryHandler(512, logging.WARNING, target=handler)
        sink.addHandler(handler)
    _SINKS["sink"] = sink
    return sink


def _server_chain(access_log: bool = True) -> tuple[list[Any], str]:
    """The server policies, and a note saying what is in the chain."""
    from framework.policies.accesslog import AccessLogPolicy
    from framework.policies.bulkhead import BulkheadConfig, BulkheadPolicy
    from framework.policies.ratelimit import Limit, RateLimitConfig, RateLimitPolicy

    sink: Any = _access_sink()
    logged = access_log and "accesslog" not in SKIP
    policies: list[Any] = [AccessLogPolicy(sink)] if logged else []
    try:
        from framework.auth.keyset import KeySet, StaticKeys, VerificationKey
        from framework.auth.policy import AuthPolicy, JwtConfig, JwtVerifier
    except ImportError:
        note = "auth=absent"
    else:
        note = "auth=hs256"
    if "auth" in SKIP:
        note = "auth=skipped"
    elif note == "auth=hs256":
        keys = KeySet(StaticKeys([VerificationKey.hmac("k1", SECRET)]))
        policies.append(AuthPolicy(JwtVerifier(keys, JwtConfig(issuer=ISSUER, audience=AUDIENCE))))
    if "ratelimit" not in SKIP:
        limit = Limit(rate_per_s=1e9, burst=1_000_000_000)
        policies.append(RateLimitPolicy(RateLimitConfig(default=limit)))
    if "bulkhead" not in SKIP:
        policies.append(BulkheadPolicy(BulkheadConfig(max_concurrency=10_000)))
    if SKIP:
        note += ",skipped=" + "+".join(sorted(SKIP))
    return policies, note


async def _serve(conn: multiprocessing.connection.Connection, profile: bool) -> None:
    from framework.config import ServerConfig
    from framework.server import Server
    from framework.testing.echo import EchoServicer
    from gen.echo.v1 import echo_pb2_grpc

    bare = grpc.aio.server()
    echo_pb2_grpc.add_EchoServiceServicer_to_server(EchoServicer(), bare)
    bare_port = bare.add_insecure_port("127.0.0.1:0")
    await bare.start()
    policies, note = _server_chain()
    server = Server(
        ServerConfig(name="bench", host="127.0.0.1", port=0, grace_s=0.5, insecure_dev=True),
        policies=policies,
    )
    server.add(EchoServicer())
    chain_port = await server.start()
    # The same chain without the access log, to show what writing a record costs.
    quiet = Server(
        ServerConfig(name="bench-quiet", host="127.0.0.1", port=0, grace_s=0.5, insecure_dev=True),
        policies=_server_chain(access_log=False)[0],
    )
    quiet.add(EchoServicer())
    quiet_port = await quiet.start()
    conn.send((bare_port, chain_port, quiet_port, note))
    loop = asyncio.get_running_loop()
    profilers: dict[str, Any] = {}
    while True:
        command, _, name = (await loop.run_in_executor(None, conn.recv)).partition(":")
        if command == "profile-on" and profile:
            profilers.setdefault(name, cProfile.Profile()).enable()
        elif command == "profile-off" and name in profilers:
            profilers[name].disable()
        elif command == "stop":
            break
        conn.send("ok")
    await server.stop(grace_s=0)
    await quiet.stop(grace_s=0)
    await bare.stop(0)
    for name, profiler in profilers.items():
        print(f"---- server profile: {name}", flush=True)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    conn.send("stopped")


def _server_main(conn: multiprocessing.connection.Connection, profile: bool) -> None:
    pin_to_cpu(0)
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_serve(conn, profile))


def _process_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


async def _run(profile_server: bool, profile_client: bool) -> None:
    from framework.client import connect
    from framework.policies.breaker import BreakerConfig, CircuitBreakerPolicy
    from framework.policies.retry import RetryConfig, RetryPolicy
    from gen.echo.v1.echo_pb2 import EchoRequest
    from gen.echo.v1.echo_pb2_grpc import EchoServiceStub

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_server_main, args=(child, profile_server), daemon=True)
    process.start()
    try:
        bare_port, chain_port, quiet_port, note = parent.recv()
        assert process.pid is not None
        pid = process.pid
        pin_to_cpu(1)

        client_policies: list[Any] = []
        if "breaker" not in SKIP:
            client_policies.append(CircuitBreakerPolicy(BreakerConfig()))
        if "retry" not in SKIP:
            client_policies.append(RetryPolicy(RetryConfig(services=["echo.v1.EchoService"])))
        try:
            from framework.auth.bearer import BearerToken
        except ImportError:
            note += ",bearer=absent"
        else:
            if "bearer" not in SKIP:
                client_policies.append(BearerToken(_token()))
        bare_channel = grpc.aio.insecure_channel(f"127.0.0.1:{bare_port}")
        chain_channel = connect(f"127.0.0.1:{chain_port}", policies=client_policies)
        quiet_channel = connect(f"127.0.0.1:{quiet_port}", policies=client_policies)
        request = EchoRequest(text="hello")
        bare_stub, chain_stub = EchoServiceStub(bare_channel), EchoServiceStub(chain_channel)
        # Both variants get a deadline, as every production call should.
        timeout_s = 30.0

        async def bare_call() -> object:
            return await bare_stub.Echo(request, timeout=timeout_s)

        async def chain_call() -> object:
            return await chain_stub.Echo(request)

        quiet_stub = EchoServiceStub(quiet_channel)

        async def quiet_call() -> object:
            return await quiet_stub.Echo(request)

        server_cpu: dict[str, list[float]] = {}
        client_profiles: dict[str, cProfile.Profile] = {}

        def variant(
            name: str, call: Callable[[], Awaitable[object]], concurrency: int, total: int
        ) -> Callable[[], Any]:
            async def run() -> Sample:
                parent.send(f"profile-on:{name}")
                parent.recv()
                if profile_client:
                    client_profiles.setdefault(name, cProfile.Profile()).enable()
                cpu0 = _process_cpu_s(pid)
                sample = await closed_loop(call, concurrency=concurrency, total=total)
                cpu_us = (_process_cpu_s(pid) - cpu0) / sample.ops * 1e6
                if profile_client:
                    client_profiles[name].disable()
                server_cpu.setdefault(name, []).append(cpu_us)
                parent.send(f"profile-off:{name}")
                parent.recv()
                return sample

            return run

        # Warm up connections and caches (token cache, bound chains) first.
        for call in (bare_call, chain_call, quiet_call):
            await closed_loop(call, concurrency=CONCURRENCY, total=WARMUP_CALLS)
        results = await interleave(
            ROUNDS,
            bare=variant("bare", bare_call, CONCURRENCY, CALLS_PER_ROUND),
            chain=variant("chain", chain_call, CONCURRENCY, CALLS_PER_ROUND),
            nolog=variant("nolog", quiet_call, CONCURRENCY, CALLS_PER_ROUND),
            bare_1=variant("bare_1", bare_call, 1, SERIAL_CALLS_PER_ROUND),
            chain_1=variant("chain_1", chain_call, 1, SERIAL_CALLS_PER_ROUND),
        )
        await bare_channel.close()
        await chain_channel.close()
        await quiet_channel.close()
    finally:
        parent.send("stop")
        while True:  # the profile (if any) prints before "stopped"
            if parent.recv() == "stopped":
                break
        process.join(timeout=10)

    for name, profiler in client_profiles.items():
        print(f"---- client profile: {name}", flush=True)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    bare, chain = results["bare"], results["chain"]
    ratio = median_rate(chain) / median_rate(bare)
    p50_added = latency_us(chain, 0.5) - latency_us(bare, 0.5)
    p50_added_1 = latency_us(results["chain_1"], 0.5) - latency_us(results["bare_1"], 0.5)
    for name, samples in results.items():
        print(
            f"{name:7s} calls/s={median_rate(samples):8.0f} "
            f"p50={latency_us(samples, 0.5):7.0f}us p99={latency_us(samples, 0.99):7.0f}us "
            f"client_cpu={median_cpu_us(samples):6.1f}us/call "
            f"server_cpu={statistics.median(server_cpu[name]):6.1f}us/call",
            flush=True,
        )
    server_added = statistics.median(server_cpu["chain"]) - statistics.median(server_cpu["bare"])
    log_cost = statistics.median(server_cpu["chain"]) - statistics.median(server_cpu["nolog"])
    print(
        f"chain/bare={ratio:.3f} p50 added: {p50_added:.0f}us at {CONCURRENCY} in flight, "
        f"{p50_added_1:.0f}us at 1 in flight; cpu added per call: server {server_added:.1f}us, "
        f"client {median_cpu_us(chain) - median_cpu_us(bare):.1f}us ({note})",
        flush=True,
    )
    print(
        f"without the access log: "
        f"chain/bare={median_rate(results['nolog']) / median_rate(bare):.3f};"
        f" writing the access record costs {log_cost:.1f}us of server CPU per call",
        flush=True,
    )
    bench_line("policy_chain_unary", ratio, median_rate(chain), "calls/s", "bare_grpc_aio")


def main() -> None:
    where = os.environ.get("PROFILE", "")
    asyncio.run(_run(profile_server=where == "server", profile_client=where == "client"))
