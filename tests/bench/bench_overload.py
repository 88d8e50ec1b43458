"""Goodput under 3x overload with adaptive shedding vs the best rate at capacity.

The server process (pinned to core 0) runs two framework servers whose Echo handler
queries a simulated database: `SLOTS` connections, each busy `QUERY_S` per query
(capacity SLOTS / QUERY_S calls/s).  Waiting for a connection can be cancelled; a
query once started runs to its end, as a real one does on the database, even if
the caller has gone.  One server has `LoadSheddingPolicy` (defaults), the other none.

The client (this process, pinned to core 1) measures, interleaved over rounds:

* `capacity`: the best rate the shedding server serves (closed loop, 3 x SLOTS
  calls in flight: the pool always busy, nothing shed), the baseline;
* `shed`, `noshed`: open loop at 3x that rate, evenly spaced calls, each with a
  deadline of `DEADLINE_S`, for `RUN_S` seconds; goodput = calls answered OK (so
  within their deadline) per second, after the first `WARMUP_S` seconds (the
  limit's first estimate).

BENCH ratio = shed goodput / capacity (goal >= 0.85).  Printed beside it: p99
latency of the calls each server admitted (answered OK or past their deadline, not
refused), which without shedding shows the collapse: every call waits in the
pool's queue until its deadline.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import statistics
import time
from typing import Any

import grpc

from tests.bench.harness import bench_line, percentile, pin_to_cpu

SLOTS = 4
QUERY_S = 0.010
DEADLINE_S = 0.2
OVERLOAD = 3.0
RUN_S = 4.0
WARMUP_S = 1.0
ROUNDS = 3


class _Database:
    """`slots` connections; a query holds one for `query_s` even if its caller is cancelled."""

    def __init__(self, slots: int, query_s: float) -> None:
        self.free = slots
        self.query_s = query_s
        self.waiters: list[asyncio.Future[None]] = []

    async def query(self) -> None:
        loop = asyncio.get_running_loop()
        if self.free > 0:
            self.free -= 1
        else:
            waiter: asyncio.Future[None] = loop.create_future()
            self.waiters.append(waiter)
            try:
                await waiter  # a slot is handed over directly
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._release()  # handed a slot we will not use
                elif waiter in self.waiters:
                    self.waiters.remove(waiter)
                raise
        done: asyncio.Future[None] = loop.create_future()
        loop.call_later(self.query_s, self._finish, done)
        await asyncio.shield(done)

    def _finish(self, done: asyncio.Future[None]) -> None:
        done.set_result(None)
        self._release()

    def _release(self) -> None:
        while self.waiters:
            waiter = self.waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1


async def _serve(conn: multiprocessing.connection.Connection) -> None:
    from framework.config import ServerConfig
    from framework.policies.shedding import LoadSheddingPolicy
    from framework.server import Server
    from gen.echo.v1 import echo_pb2, echo_pb2_grpc

    class Servicer(echo_pb2_grpc.EchoServiceServicer):
        def __init__(self) -> None:
            self.db = _Database(SLOTS, QUERY_S)

        async def Echo(self, request: Any, context: Any) -> Any:
            await self.db.query()
            return echo_pb2.EchoResponse(text=request.text)

    shedding = LoadSheddingPolicy()
    ports = []
    servers = []
    for policies in ([shedding], []):
        server = Server(
            ServerConfig(name="overload", host="127.0.0.1", port=0, grace_s=0.5, insecure_dev=True),
            policies=policies,
        )
        server.add(Servicer())
        ports.append(await server.start())
        servers.append(server)
    conn.send(tuple(ports))
    loop = asyncio.get_running_loop()
    while (await loop.run_in_executor(None, conn.recv)) != "stop":
        conn.send(
            f"limit={shedding.limit} best={1000 * (shedding.limiter.baseline_s or 0):.1f}ms "
            f"probes={shedding.limiter.probes}"
        )
    for server in servers:
        await server.stop(grace_s=0)
    conn.send("stopped")


def _server_main(conn: multiprocessing.connection.Connection) -> None:
    pin_to_cpu(0)
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_serve(conn))


class _Run:
    def __init__(self) -> None:
        self.ok = 0
        self.refused = 0
        self.late = 0
        self.other = 0
        self.admitted_latencies: list[float] = []


async def _open_loop(stub: Any, rate_per_s: float) -> _Run:
    from framework.errors import FrameworkError, code_of
    from gen.echo.v1.echo_pb2 import EchoRequest

    run = _Run()
    request = EchoRequest(text="x")
    start = time.perf_counter()
    counted_from = start + WARMUP_S

    async def one(at: float) -> None:
        began = time.perf_counter()
        try:
            await stub.Echo(request, timeout=DEADLINE_S)
        except (grpc.RpcError, FrameworkError) as error:
            code = code_of(error)
            if at < counted_from:
                return
            if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                run.refused += 1
                return
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                run.late += 1
            else:
                run.other += 1
        else:
            if at < counted_from:
                return
            run.ok += 1
        run.admitted_latencies.append(time.perf_counter() - began)

    tasks: list[asyncio.Task[None]] = []
    sent = 0
    total = int(RUN_S * rate_per_s)
    while sent < total:
        due = min(total, int((time.perf_counter() - start) * rate_per_s) + 1)
        while sent < due:
            tasks.append(asyncio.ensure_future(one(start + sent / rate_per_s)))
            sent += 1
        await asyncio.sleep(0.001)
    await asyncio.gather(*tasks)
    return run


async def _capacity(stub: Any, seconds: float) -> float:
    """Closed-loop calls/s, counting only successes (the shedding server may refuse some)."""
    from framework.errors import OverloadedError
    from gen.echo.v1.echo_pb2 import EchoRequest

    request = EchoRequest(text="x")
    done = 0
    end = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < end:
            try:
                await stub.Echo(request, timeout=5)
            except OverloadedError:  # the shedding server refused: not capacity; back off
                await asyncio.sleep(QUERY_S)
                continue
            done += 1

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(3 * SLOTS)))
    return done / (time.perf_counter() - began)


async def _run() -> None:
    from framework.client import connect
    from gen.echo.v1.echo_pb2_grpc import EchoServiceStub

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_server_main, args=(child,), daemon=True)
    process.start()
    try:
        shed_port, plain_port = parent.recv()
        pin_to_cpu(1)
        shed_channel = connect(f"127.0.0.1:{shed_port}")
        plain_channel = connect(f"127.0.0.1:{plain_port}")
        shed_stub, plain_stub = EchoServiceStub(shed_channel), EchoServiceStub(plain_channel)
        await _capacity(shed_stub, 1.0)  # warm up
        await _capacity(plain_stub, 0.5)
        capacities: list[float] = []
        shed_runs: list[_Run] = []
        plain_runs: list[_Run] = []
        for _ in range(ROUNDS):
            capacity = await _capacity(shed_stub, 2.0)
            capacities.append(capacity)
            rate = OVERLOAD * SLOTS / QUERY_S
            shed_runs.append(await _open_loop(shed_stub, rate))
            parent.send("state")
            state = parent.recv()
            plain_runs.append(await _open_loop(plain_stub, rate))
            print(
                f"round: capacity={capacity:.0f}/s shed: ok={shed_runs[-1].ok} "
                f"refused={shed_runs[-1].refused} late={shed_runs[-1].late} ({state}); "
                f"noshed: ok={plain_runs[-1].ok} late={plain_runs[-1].late}",
                flush=True,
            )
        await shed_channel.close()
        await plain_channel.close()
    finally:
        parent.send("stop")
        while parent.recv() != "stopped":
            pass
        process.join(timeout=10)

    counted_s = RUN_S - WARMUP_S
    best = max(capacities)
    goodput = statistics.median(r.ok / counted_s for r in shed_runs)
    plain_goodput = statistics.median(r.ok / counted_s for r in plain_runs)
    p99 = statistics.median(percentile(r.admitted_latencies, 0.99) for r in shed_runs)
    plain_p99 = statistics.median(percentile(r.admitted_latencies, 0.99) for r in plain_runs)
    print(
        f"offered {OVERLOAD:.0f}x capacity ({OVERLOAD * SLOTS / QUERY_S:.0f}/s, deadline "
        f"{DEADLINE_S * 1000:.0f} ms); best rate at capacity {best:.0f}/s; "
        f"with shedding: goodput {goodput:.0f}/s, p99 of admitted calls {p99 * 1000:.1f} ms; "
        f"without: goodput {plain_goodput:.0f}/s ({plain_goodput / best:.3f}), p99 of admitted "
        f"calls {plain_p99 * 1000:.1f} ms; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    bench_line("overload_goodput", goodput / best, goodput, "calls/s", "best_rate_at_capacity")


def main() -> None:
    asyncio.run(_run())
