"""The server chain's own CPU per call, in a tight loop: no network, no grpc call.

    python -m tests.bench.chain_tight_loop             # adapters, each policy alone, all
    python -m tests.bench.chain_tight_loop tracing metrics

Builds the production chain of `bench_production_chain` (the same policies and
settings), wraps the Echo servicer with `framework.server_adapter` exactly as a
`Server` does, and awaits the wrapped handler with a stand-in servicer context
carrying the production client's metadata.  Prints the median CPU time per call
(this process, every thread: the span and access-log writer threads included) of
the adapters alone, each policy alone on top of them, and the whole chain.

A busy server pays several times these figures end to end (cold caches between
grpc's own work, the kernel and its threads; see docs/observability.md, "Where the
time goes"); use this to see what a change does to the chain's own work, with far
less noise than `make bench`.  Not a `bench_` module: it prints no BENCH line.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from typing import Any

from gen.echo.v1 import echo_pb2, echo_pb2_grpc
from tests.bench.bench_production_chain import AUDIENCE, ISSUER, SECRET, _drop_exporter, _token

ROUNDS = 7
CALLS_PER_ROUND = 20_000
WARMUP_CALLS = 2_000
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
POLICIES = (
    "tracing",
    "metrics",
    "accesslog",
    "auth",
    "ratelimit",
    "bulkhead",
    "faults",
    "validation",
    "idempotency",
)


class StandInContext:
    """What the wrapped handler and the policies read from a grpc.aio servicer context."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return "ipv4:127.0.0.1:54321"

    def code(self) -> None:
        return None

    def details(self) -> str:
        return ""

    def time_remaining(self) -> float:
        return 29.5

    def peer_identities(self) -> None:
        return None

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def done(self) -> bool:
        return False


def _policies(names: tuple[str, ...], telemetry: Any) -> list[Any]:
    from framework.auth.keyset import KeySet, StaticKeys, VerificationKey
    from framework.auth.policy import AuthPolicy, JwtConfig, JwtVerifier
    from framework.policies.accesslog import AccessLogPolicy, AccessLogWriter
    from framework.policies.bulkhead import BulkheadConfig, BulkheadPolicy
    from framework.policies.faults import FaultInjectionPolicy
    from framework.policies.idempotency import IdempotencyKeyPolicy
    from framework.policies.ratelimit import Limit, RateLimitConfig, RateLimitPolicy
    from framework.policies.validation import ValidationPolicy

    tracing, metrics = telemetry.policies()
    made: dict[str, Any] = {
        "tracing": lambda: tracing,
        "metrics": lambda: metrics,
        "accesslog": lambda: AccessLogPolicy(AccessLogWriter(open(os.devnull, "w"))),  # noqa: SIM115
        "auth": lambda: AuthPolicy(
            JwtVerifier(
                KeySet(StaticKeys([VerificationKey.hmac("k1", SECRET)])),
                JwtConfig(issuer=ISSUER, audience=AUDIENCE),
            )
        ),
        "ratelimit": lambda: RateLimitPolicy(
            RateLimitConfig(default=Limit(rate_per_s=1e9, burst=1_000_000_000))
        ),
        "bulkhead": lambda: BulkheadPolicy(BulkheadConfig(max_concurrency=10_000)),
        "faults": FaultInjectionPolicy,
        "validation": ValidationPolicy,
        "idempotency": IdempotencyKeyPolicy,
    }
    return [made[name]() for name in POLICIES if name in names]


async def measure(names: tuple[str, ...]) -> float:
    """Median CPU microseconds per call of the adapters with the named policies."""
    from framework.policies.error_mapping import ErrorMappingPolicy
    from framework.policy import Chain, Side
    from framework.server_adapter import MethodTable, Registrar, Serving
    from framework.telemetry.sdk import Telemetry, TelemetryConfig
    from framework.testing.echo import EchoServicer

    telemetry = Telemetry.build(
        TelemetryConfig(service_name="bench", metrics_exporter="none"),
        span_exporter=_drop_exporter(),
    )
    table = MethodTable(
        Chain(_policies(names, telemetry), Side.SERVER), Serving(ErrorMappingPolicy().outcome)
    )
    registrar = Registrar()
    echo_pb2_grpc.add_EchoServiceServicer_to_server(EchoServicer(), registrar)
    table.add(registrar)
    handle = table.service(_Details("/echo.v1.EchoService/Echo")).unary_unary  # type: ignore[union-attr]
    raw = echo_pb2.EchoRequest(text="hello").SerializeToString()
    context = StandInContext(
        (
            ("user-agent", "grpc-python-asyncio/1.85.3 grpc-c/51.0.0 (linux; chttp2)"),
            ("traceparent", TRACEPARENT),
            ("authorization", f"Bearer {_token()}"),
        )
    )
    for _ in range(WARMUP_CALLS):
        await handle(raw, context)
    samples = []
    for _ in range(ROUNDS):
        cpu0 = time.process_time()
        for _ in range(CALLS_PER_ROUND):
            await handle(raw, context)
        samples.append((time.process_time() - cpu0) / CALLS_PER_ROUND * 1e6)
    telemetry.shutdown()
    return statistics.median(samples)


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


async def run(names: list[str]) -> None:
    unknown = sorted(set(names) - set(POLICIES))
    if unknown:
        raise SystemExit(f"unknown policies {unknown}; known: {', '.join(POLICIES)}")
    base = await measure(())
    print(f"adapters alone          {base:6.2f} us/call", flush=True)
    for name in names or POLICIES:
        cost = await measure((name,))
        print(f"+ {name:21s} {cost:6.2f} us/call ({cost - base:+.2f})", flush=True)
    if not names:
        every = await measure(POLICIES)
        print(f"production chain        {every:6.2f} us/call ({every - base:+.2f})", flush=True)


if __name__ == "__main__":
    asyncio.run(run(sys.argv[1:]))
