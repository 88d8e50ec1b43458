"""Worker processes: calls/s with 2 workers against 1, for a CPU-bound handler.

Two servers run side by side, each `python -m framework serve tests.framework.workers_app`
(Echo spins `SPIN_MS` of CPU per call): one with `--workers 1` (one process), one with
`--workers 2` (a supervisor and two workers sharing the port). Load comes from `CLIENTS`
separate client processes, each opening `CONNECTIONS` connections of its own (the kernel
spreads connections over the workers) with `IN_FLIGHT` calls in flight on each, so the
server, not the client, is the bottleneck. Rounds alternate between the two servers
(A B A B ...); the idle one costs nothing.

BENCH ratio = median calls/s with 2 workers / median with 1 (goal >= 1.7 on 2 free
cores). Printed beside it: each side's server CPU per call (all its processes, from
/proc) and the load average, since on a shared 2-core machine other processes take
the second core from the workers.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tests.bench.harness import bench_line

SPIN_MS = 2.0
CLIENTS = 2
CONNECTIONS = 6
IN_FLIGHT = 2
ROUND_S = 4.0
ROUNDS = 3
ROOT = Path(__file__).resolve().parents[2]


def _client(
    address: str, start_at: float, stop_at: float, out: multiprocessing.connection.Connection
) -> None:
    import grpc.aio

    from gen.echo.v1 import echo_pb2, echo_pb2_grpc

    async def run() -> int:
        local = [("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.aio.insecure_channel(address, options=local) for _ in range(CONNECTIONS)]
        stubs = [echo_pb2_grpc.EchoServiceStub(c) for c in channels]
        for stub in stubs:  # connect before the round starts
            await stub.Echo(echo_pb2.EchoRequest(text="warm"), timeout=60, wait_for_ready=True)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        done = 0

        async def loop(stub: echo_pb2_grpc.EchoServiceStub) -> None:
            nonlocal done
            request = echo_pb2.EchoRequest(text="x")
            while time.time() < stop_at:
                await stub.Echo(request, timeout=30)
                done += 1

        await asyncio.gather(*(loop(s) for s in stubs for _ in range(IN_FLIGHT)))
        for channel in channels:
            await channel.close()
        return done

    out.send(asyncio.run(run()))


def _cpu_s(root_pid: int) -> float:
    """utime + stime of the process and its children (the workers), in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid, ppid = int(stat.parent.name), int(fields[1])
        if pid == root_pid or ppid == root_pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _start_server(workers: int) -> tuple[subprocess.Popen[str], str]:
    env = {
        **os.environ,
        "SERVICE_HOST": "127.0.0.1",
        "SERVICE_PORT": "0",
        "SERVICE_INSECURE_DEV": "1",
        "WORKERS_APP_SPIN_MS": str(SPIN_MS),
        "PYTHONWARNINGS": "ignore",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "framework", "serve", "tests.framework.workers_app",
         "--workers", str(workers)],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stderr is not None
    pattern = r"serving on (\S+) with 2 workers" if workers > 1 else r"serving on (\S+) \("
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            raise RuntimeError(f"server with {workers} workers ended before serving")
        if match := re.search(pattern, line):
            return process, match.group(1)
    raise RuntimeError(f"server with {workers} workers did not serve within 300 s")


def _round(address: str, server_pid: int) -> tuple[float, float]:
    """(calls/s, server CPU microseconds per call) of one round against `address`."""
    context = multiprocessing.get_context("spawn")
    start_at = time.time() + 8.0  # clients import grpc and connect first
    stop_at = start_at + ROUND_S
    pipes, processes = [], []
    for _ in range(CLIENTS):
        receive, send = context.Pipe(duplex=False)
        process = context.Process(target=_client, args=(address, start_at, stop_at, send))
        process.start()
        pipes.append(receive)
        processes.append(process)
    time.sleep(max(0.0, start_at - time.time()))
    cpu_before = _cpu_s(server_pid)
    time.sleep(max(0.0, stop_at - time.time()))
    cpu_after = _cpu_s(server_pid)
    calls = sum(pipe.recv() for pipe in pipes)
    for process in processes:
        process.join(timeout=60)
    return calls / ROUND_S, (cpu_after - cpu_before) / max(calls, 1) * 1e6


def main() -> None:
    one, one_address = _start_server(1)
    two, two_address = _start_server(2)
    rates: dict[int, list[float]] = {1: [], 2: []}
    cpus: dict[int, list[float]] = {1: [], 2: []}
    try:
        for _ in range(ROUNDS):
            for workers, process, address in ((1, one, one_address), (2, two, two_address)):
                rate, cpu = _round(address, process.pid)
                rates[workers].append(rate)
                cpus[workers].append(cpu)
    finally:
        for process in (one, two):
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
    r1, r2 = statistics.median(rates[1]), statistics.median(rates[2])
    load = os.getloadavg()
    c1, c2 = statistics.median(cpus[1]), statistics.median(cpus[2])
    print(
        f"workers_scaling: 1 worker {r1:.0f} calls/s ({c1:.0f} us CPU/call), "
        f"2 workers {r2:.0f} calls/s ({c2:.0f} us CPU/call); "
        f"rounds 1={[round(r) for r in rates[1]]} 2={[round(r) for r in rates[2]]}; "
        f"handler {SPIN_MS} ms CPU; {CLIENTS} client processes x {CONNECTIONS} connections x "
        f"{IN_FLIGHT} in flight; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} "
        f"on {os.cpu_count()} cores",
        flush=True,
    )
    bench_line("workers_scaling", r2 / r1 if r1 else 0.0, r2, "calls/s", "1_worker_same_handler")


if __name__ == "__main__":
    main()
