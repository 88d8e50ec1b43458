"""Cost of tracing + metrics on unary calls, against bare grpc.aio and the OTel contrib.

One server process (pinned to core 0) runs four servers on the same minimal Echo
servicer:
- bare: `grpc.aio.server()` with no interceptor;
- ours: `framework.server.Server` with `TracingPolicy` + `MetricsPolicy`
  (every call sampled: the client sends a sampled `traceparent`; spans go
  through a `BatchSpanProcessor` to an exporter that drops them);
- contrib: `grpc.aio.server(interceptors=[aio_server_interceptor(...)])` from
  opentelemetry-instrumentation-grpc, same processor and exporter (no metrics).
- framework: `Server` with no policy at all (only to show how much of "ours"
  is the server adapter rather than tracing + metrics);
- ours_unsampled: the "ours" server called with a traceparent whose caller did
  not sample the trace (flags 00): what tracing costs for a sampled-out call
  (metrics still recorded).
The client process (this one, pinned to core 1) drives each server in turn with
a closed loop of bare grpc.aio calls carrying the same `traceparent`, several
interleaved rounds; ratios of the medians (per-round paired ratios are printed
too).  Server CPU per call is read from /proc for the server process, so it shows
where the time goes.

BENCH_TRACING_DETAIL=1 adds servers with a no-op policy, tracing only (batch and
synchronous export), metrics only, and a late-started copy of "framework" (to see
position effects); BENCH_TRACING_GC=1 applies gc.freeze() and a higher gen-0
threshold in the server process, for every variant alike.

BENCH tracing_unary           ratio = ours / bare      (calls/s)
BENCH tracing_vs_otel_contrib ratio = ours / contrib   (calls/s)
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio

from gen.echo.v1 import echo_pb2, echo_pb2_grpc
from tests.bench.harness import Sample, bench_line, closed_loop, interleave, pin_to_cpu

ROUNDS = 9
CALLS_PER_ROUND = 2000
WARMUP_CALLS = 500
CONCURRENCY = 32
TRACEPARENT = (("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),)
UNSAMPLED = (("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),)
VARIANTS: tuple[str, ...] = ("bare", "framework", "ours", "ours_unsampled", "contrib")
if os.environ.get("BENCH_TRACING_DETAIL"):  # split "ours" into its two policies
    VARIANTS = (
        *VARIANTS,
        "framework_late",
        "noop_policy",
        "tracing_only",
        "tracing_sync_export",
        "metrics_only",
    )


class Echo(echo_pb2_grpc.EchoServiceServicer):
    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        return echo_pb2.EchoResponse(text=request.text)


# ------------------------------------------------------------------ server side


class NoopPolicy:
    """An enter with an exit that do nothing: the cost of the chain machinery itself."""

    def bind(self, method: Any) -> Any:
        def exit_(error: BaseException | None) -> None:
            return None

        def enter(call: Any) -> Any:
            return exit_

        return enter


async def serve() -> None:
    """Server process: start the three servers, print their ports, wait for stdin EOF."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    from framework.config import ServerConfig
    from framework.server import Server
    from framework.telemetry.sdk import Telemetry, TelemetryConfig

    class Drop(SpanExporter):
        def __init__(self) -> None:
            self.exported = 0

        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            self.exported += len(spans)
            return SpanExportResult.SUCCESS

    pin_to_cpu(0)
    ports: dict[str, int] = {}
    bare = grpc.aio.server()
    echo_pb2_grpc.add_EchoServiceServicer_to_server(Echo(), bare)
    ports["bare"] = bare.add_insecure_port("127.0.0.1:0")
    await bare.start()

    plain = Server(
        ServerConfig(name="plain", host="127.0.0.1", port=0, grace_s=0.5, insecure_dev=True)
    )
    plain.add(Echo())
    ports["framework"] = await plain.start()

    ours_exporter = Drop()
    telemetry = Telemetry.build(
        TelemetryConfig(service_name="bench", metrics_exporter="none"), span_exporter=ours_exporter
    )
    ours = Server(
        ServerConfig(name="bench", host="127.0.0.1", port=0, grace_s=0.5, insecure_dev=True),
        policies=telemetry.policies(),
    )
    ours.add(Echo())
    ports["ours"] = await ours.start()

    keep: list[Server] = []  # servers stop when garbage-collected
    if "tracing_only" in VARIANTS:
        sync_telemetry = Telemetry.build(  # SimpleSpanProcessor: no export thread
            TelemetryConfig(service_name="bench", metrics_exporter="none", batch_spans=False),
            span_exporter=Drop(),
        )
        for variant, policies in (
            ("noop_policy", [NoopPolicy()]),
            ("tracing_only", telemetry.policies()[:1]),
            ("tracing_sync_export", sync_telemetry.policies()[:1]),
            ("metrics_only", telemetry.policies()[1:]),
        ):
            extra = Server(
                ServerConfig(
                    name=variant, host="127.0.0.1", port=0, grace_s=0.5, insecure_dev=True
                ),
                policies=policies,
            )
            extra.add(Echo())
            ports[variant] = await extra.start()
            keep.append(extra)

    contrib_exporter = Drop()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(contrib_exporter))
    contrib = grpc.aio.server(interceptors=[aio_server_interceptor(tracer_provider=provider)])
    echo_pb2_grpc.add_EchoServiceServicer_to_server(Echo(), contrib)
    ports["contrib"] = contrib.add_insecure_port("127.0.0.1:0")
    await contrib.start()

    if "framework_late" in VARIANTS:  # same as "framework", started last: position effects
        late = Server(
            ServerConfig(name="late", host="127.0.0.1", port=0, grace_s=0.5, insecure_dev=True)
        )
        late.add(Echo())
        ports["framework_late"] = await late.start()
        keep.append(late)

    if os.environ.get("BENCH_TRACING_GC"):  # deployment tuning, same for every variant
        import gc

        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
    print(json.dumps(ports), flush=True)
    await asyncio.to_thread(sys.stdin.read)  # the client closes stdin when done
    telemetry.flush()
    provider.force_flush()
    print(
        json.dumps(
            {"ours_spans": ours_exporter.exported, "contrib_spans": contrib_exporter.exported}
        ),
        flush=True,
    )
    await ours.stop(grace_s=0)
    await plain.stop(grace_s=0)
    await bare.stop(0)
    await contrib.stop(0)
    telemetry.shutdown()
    provider.shutdown()


# ------------------------------------------------------------------ client side


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of another process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def main() -> None:
    pin_to_cpu(1)
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.bench_tracing", "serve"],
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
    report(results, server_cpu, tail)


async def drive(
    ports: dict[str, int], server_pid: int
) -> tuple[dict[str, list[Sample]], dict[str, list[float]]]:
    """Interleaved rounds against each server; per-round server CPU per call (us)."""
    ports = {**ports, "ours_unsampled": ports["ours"]}
    channels = {v: grpc.aio.insecure_channel(f"127.0.0.1:{ports[v]}") for v in VARIANTS}
    stubs = {v: echo_pb2_grpc.EchoServiceStub(c) for v, c in channels.items()}
    request = echo_pb2.EchoRequest(text="bench")
    server_cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}

    def round_of(variant: str, total: int) -> Any:
        echo = stubs[variant].Echo
        metadata = UNSAMPLED if variant == "ours_unsampled" else TRACEPARENT

        async def call() -> object:
            return await echo(request, metadata=metadata)

        async def run() -> Sample:
            cpu0 = process_cpu_s(server_pid)
            sample = await closed_loop(call, concurrency=CONCURRENCY, total=total)
            server_cpu[variant].append((process_cpu_s(server_pid) - cpu0) / sample.ops * 1e6)
            return sample

        return run

    for variant in VARIANTS:  # warm up every path (method binding, caches)
        await round_of(variant, WARMUP_CALLS)()
    for cpu in server_cpu.values():
        cpu.clear()
    results = await interleave(ROUNDS, **{v: round_of(v, CALLS_PER_ROUND) for v in VARIANTS})
    for channel in channels.values():
        await channel.close()
    return results, server_cpu


def paired_ratio(results: dict[str, list[Sample]], a: str, b: str) -> float:
    """Median over rounds of a/b within each round (shown next to the ratio of medians)."""
    return statistics.median(x.rate / y.rate for x, y in zip(results[a], results[b], strict=True))


def report(results: dict[str, list[Sample]], server_cpu: dict[str, list[float]], tail: str) -> None:
    rate = {v: statistics.median(s.rate for s in results[v]) for v in VARIANTS}
    cpu = {v: statistics.median(server_cpu[v]) for v in VARIANTS}
    print(
        f"sampled-out call, tracing+metrics: +{cpu['ours_unsampled'] - cpu['framework']:.1f} us "
        f"server cpu over the framework server; sampled: +{cpu['ours'] - cpu['framework']:.1f} us",
        flush=True,
    )
    for v in VARIANTS:
        print(
            f"{v:9s} {rate[v]:7.0f} calls/s  server cpu {cpu[v]:6.1f} us/call "
            f"(+{cpu[v] - cpu['bare']:6.1f} us over bare)  rounds: "
            + " ".join(f"{s.rate:.0f}" for s in results[v]),
            flush=True,
        )
    print(f"server exported: {tail.strip()}", flush=True)
    print(
        f"server cpu ratios: bare/ours {cpu['bare'] / cpu['ours']:.3f}  "
        f"contrib/ours {cpu['contrib'] / cpu['ours']:.3f}  "
        f"bare/framework {cpu['bare'] / cpu['framework']:.3f}",
        flush=True,
    )
    print(
        f"paired per-round ratios (median): ours/bare {paired_ratio(results, 'ours', 'bare'):.3f}"
        f"  ours/contrib {paired_ratio(results, 'ours', 'contrib'):.3f}",
        flush=True,
    )
    # The conventions' estimator: ratio of the per-variant medians over interleaved rounds.
    bench_line(
        "tracing_unary", rate["ours"] / rate["bare"], rate["ours"], "calls/s", "bare grpc.aio"
    )
    bench_line(
        "tracing_vs_otel_contrib",
        rate["ours"] / rate["contrib"],
        rate["ours"],
        "calls/s",
        "opentelemetry-instrumentation-grpc aio server interceptor",
    )


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        asyncio.run(serve())
    else:
        main()
