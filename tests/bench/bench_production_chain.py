"""A real deployment's chain vs bare grpc.aio, unary Echo, 32 calls in flight.

Server process (pinned to core 0): a bare `grpc.aio` server, and a framework `Server`
with every policy a production service runs, outermost first: error mapping
(pinned), tracing, metrics, access log (the batched writer, to /dev/null), auth
(HS256 JWT), rate limit (in memory), bulkhead, fault injection (no rule active),
validation, idempotency.  Spans of every call (the client samples them all) go
through the batch processor to an exporter that drops them; metrics go to the
store behind `/metrics`.
Client process (this one, pinned to core 1): a bare channel for the bare server; for
the framework server `connect()` with tracing, metrics, circuit breaker, retries
(service config), bearer token and the pinned deadline policy.  Rounds are
interleaved; medians are reported; server CPU per call is read from /proc.  A third
variant, "adapters", is the framework `Server` and `connect()` with no policy at all,
to tell the adapters' share from the policies'.

BENCH production_chain_unary  ratio = production / bare  (calls/s)
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio
import jwt

from gen.echo.v1 import echo_pb2, echo_pb2_grpc
from tests.bench.harness import Sample, bench_line, closed_loop, interleave, pin_to_cpu

ROUNDS = 7
CALLS_PER_ROUND = 3000
WARMUP_CALLS = 1000
CONCURRENCY = 32
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


def _drop_exporter() -> Any:
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class Drop(SpanExporter):
        def __init__(self) -> None:
            self.exported = 0

        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            self.exported += len(spans)
            return SpanExportResult.SUCCESS

    return Drop()


async def serve() -> None:
    """Server process: start both servers, print their ports, run until stdin closes."""
    from framework.auth.keyset import KeySet, StaticKeys, VerificationKey
    from framework.auth.policy import AuthPolicy, JwtConfig, JwtVerifier
    from framework.config import ServerConfig
    from framework.policies.accesslog import AccessLogPolicy, AccessLogWriter
    from framework.policies.bulkhead import BulkheadConfig, BulkheadPolicy
    from framework.policies.faults import FaultInjectionPolicy
    from framework.policies.idempotency import IdempotencyKeyPolicy
    from framework.policies.ratelimit import Limit, RateLimitConfig, RateLimitPolicy
    from framework.policies.validation import ValidationPolicy
    from framework.server import Server
    from framework.telemetry.sdk import Telemetry, TelemetryConfig
    from framework.testing.echo import EchoServicer

    pin_to_cpu(0)
    bare = grpc.aio.server()
    echo_pb2_grpc.add_EchoServiceServicer_to_server(EchoServicer(), bare)
    bare_port = bare.add_insecure_port("127.0.0.1:0")
    await bare.start()

    exporter = _drop_exporter()
    telemetry = Telemetry.build(
        TelemetryConfig(service_name="bench", metrics_exporter="none"), span_exporter=exporter
    )
    keys = KeySet(StaticKeys([VerificationKey.hmac("k1", SECRET)]))
    policies = [
        *telemetry.policies(),
        AccessLogPolicy(AccessLogWriter(open(os.devnull, "w"))),  # noqa: SIM115, ASYNC230
        AuthPolicy(JwtVerifier(keys, JwtConfig(issuer=ISSUER, audience=AUDIENCE))),
        RateLimitPolicy(RateLimitConfig(default=Limit(rate_per_s=1e9, burst=1_000_000_000))),
        BulkheadPolicy(BulkheadConfig(max_concurrency=10_000)),
        FaultInjectionPolicy(),
        ValidationPolicy(),
        IdempotencyKeyPolicy(),
    ]
    server = Server(
        ServerConfig(name="bench", host="127.0.0.1", port=0, grace_s=0.5), policies=policies
    )
    server.add(EchoServicer())
    production_port = await server.start()
    plain = Server(  # no policy at all, so no authentication: development mode on purpose
        ServerConfig(name="plain", host="127.0.0.1", port=0, grace_s=0.5, insecure_dev=True)
    )
    plain.add(EchoServicer())
    plain_port = await plain.start()
    ports = {"bare": bare_port, "production": production_port, "adapters": plain_port}
    print(json.dumps(ports), flush=True)
    await asyncio.to_thread(sys.stdin.read)  # the client closes stdin when done
    telemetry.flush()
    print(json.dumps({"spans_exported": exporter.exported}), flush=True)
    await server.stop(grace_s=0)
    await plain.stop(grace_s=0)
    await bare.stop(0)
    telemetry.shutdown()


def process_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(ports: dict[str, int], pid: int) -> tuple[dict[str, list[Sample]], Any]:
    from framework.auth.bearer import BearerToken
    from framework.client import connect
    from framework.policies.breaker import BreakerConfig, CircuitBreakerPolicy
    from framework.policies.retry import RetryConfig, RetryPolicy
    from framework.telemetry.sdk import Telemetry, TelemetryConfig

    telemetry = Telemetry.build(
        TelemetryConfig(service_name="bench-client", metrics_exporter="none"),
        span_exporter=_drop_exporter(),
    )
    client_policies = [
        *telemetry.policies(),
        CircuitBreakerPolicy(BreakerConfig()),
        RetryPolicy(RetryConfig(services=["echo.v1.EchoService"])),
        BearerToken(_token()),
    ]
    bare_channel = grpc.aio.insecure_channel(f"127.0.0.1:{ports['bare']}")
    production_channel = connect(f"127.0.0.1:{ports['production']}", policies=client_policies)
    adapters_channel = connect(f"127.0.0.1:{ports['adapters']}")
    request = echo_pb2.EchoRequest(text="hello")
    bare_stub = echo_pb2_grpc.EchoServiceStub(bare_channel)
    production_stub = echo_pb2_grpc.EchoServiceStub(production_channel)
    adapters_stub = echo_pb2_grpc.EchoServiceStub(adapters_channel)

    async def bare_call() -> object:
        return await bare_stub.Echo(request, timeout=30.0)

    async def production_call() -> object:
        return await production_stub.Echo(request)

    async def adapters_call() -> object:
        return await adapters_stub.Echo(request)

    server_cpu: dict[str, list[float]] = {"bare": [], "adapters": [], "production": []}

    def variant(name: str, call: Any) -> Any:
        async def run() -> Sample:
            cpu0 = process_cpu_s(pid)
            sample = await closed_loop(call, concurrency=CONCURRENCY, total=CALLS_PER_ROUND)
            server_cpu[name].append((process_cpu_s(pid) - cpu0) / sample.ops * 1e6)
            return sample

        return run

    for call in (bare_call, adapters_call, production_call):
        await closed_loop(call, concurrency=CONCURRENCY, total=WARMUP_CALLS)
    results = await interleave(
        ROUNDS,
        bare=variant("bare", bare_call),
        adapters=variant("adapters", adapters_call),
        production=variant("production", production_call),
    )
    await bare_channel.close()
    await production_channel.close()
    await adapters_channel.close()
    telemetry.shutdown()
    return results, server_cpu


def main() -> None:
    pin_to_cpu(1)
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.bench_production_chain", "serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None and server.stdin is not None
    try:
        ports: dict[str, int] = json.loads(server.stdout.readline())
        results, server_cpu = asyncio.run(drive(ports, server.pid))
    finally:
        server.stdin.close()
        tail = server.stdout.read()
        server.wait(timeout=30)
    rate = {v: statistics.median(s.rate for s in results[v]) for v in results}
    cpu = {v: statistics.median(server_cpu[v]) for v in results}
    client = {v: statistics.median(s.cpu_us_per_op for s in results[v]) for v in results}
    for v in results:
        print(
            f"{v:10s} {rate[v]:7.0f} calls/s  server cpu {cpu[v]:6.1f} us/call  "
            f"client cpu {client[v]:6.1f} us/call  rounds: "
            + " ".join(f"{s.rate:.0f}" for s in results[v]),
            flush=True,
        )
    print(
        f"production chain adds {cpu['production'] - cpu['bare']:.1f} us of server CPU and "
        f"{client['production'] - client['bare']:.1f} us of client CPU per call, of which the "
        f"framework's adapters with no policy {cpu['adapters'] - cpu['bare']:.1f} us (server) "
        f"and {client['adapters'] - client['bare']:.1f} us (client); "
        f"server exported: {tail.strip()}",
        flush=True,
    )
    bench_line(
        "production_chain_unary",
        rate["production"] / rate["bare"],
        rate["production"],
        "calls/s",
        "bare_grpc_aio",
    )


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        asyncio.run(serve())
    else:
        main()
