"""Registry Watch fan-out: unrelated watchers must cost (almost) nothing.

A registry runs in a subprocess (pinned to another core; SQLite, no health
probing) holding 5,000 instances over 50 services.  This process opens 100
Watch streams on one service (S, deltas on, as `Discovery` does) and then
measures how long one change of S (a Register, then a Deregister) takes to
reach all 100 of them:

* isolated: only S's 100 watchers are open;
* crowded: 100 more watchers spread over the 49 other services are open too.

Rounds are interleaved (isolated, crowded, ...) and medians taken.  The BENCH
line is isolated / crowded time (1.0 = unrelated watchers cost nothing; the
goal is >= 0.8).  Also printed: the registry's CPU per change (its own
`process_time`, asked over stdin), and its idle CPU with 200 watchers open and
nothing changing (goal < 0.5%).

`python -m tests.bench.bench_registry_watch curve` measures the same at
N = 10, 100, 1,000 and 5,000 instances (the table in framework/registry/README.md).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before grpc loads: no GOAWAY info lines

import grpc
import grpc.aio

from gen.registry.v1 import registry_pb2 as pb
from gen.registry.v1.registry_pb2_grpc import RegistryServiceStub
from tests.bench.harness import bench_line, pin_to_cpu

ROUNDS = 5
CHANGES_PER_ROUND = 10  # a Register and a Deregister each count as one
WATCHERS = 100  # of the changed service
OTHERS = 100  # of the other services (crowded rounds, idle measurement)
SERVICES = 50
IDLE_S = 10.0
TARGET = "svc-00"


# ------------------------------------------------------------------ the registry
async def _serve(instances: int, services: int) -> None:
    """Subprocess: a registry with `instances` over `services`; prints its address; then
    answers "cpu" on stdin with its process CPU seconds; stops when stdin closes."""
    from framework.config import ServerConfig
    from framework.registry.health_probe import ProbeConfig
    from framework.registry.registry import Registry, RegistryConfig
    from framework.registry.service import RegistryServicer
    from framework.registry.sqlite import SqliteStore
    from framework.server import Server

    pin_to_cpu(1)
    with tempfile.TemporaryDirectory() as tmp:
        registry = Registry(
            SqliteStore(Path(tmp) / "registry.sqlite"),
            RegistryConfig(max_ttl_s=3600, probe=ProbeConfig(interval_s=0)),
        )
        await registry.start()
        for n in range(instances):
            service = f"svc-{n % services:02d}"
            await registry.register(service, f"10.{n // 250}.{n % 250}.1:5000", ttl_s=3600)
        server = Server(
            ServerConfig(name="registry", grace_s=0, reflection=False, insecure_dev=True)
        )
        server.add(RegistryServicer(registry))
        await server.start()
        print(server.address, flush=True)
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            if line.strip() == "cpu":
                print(f"{time.process_time():.6f}", flush=True)
        await server.stop(0)
        await registry.close()


@dataclass
class RegistryProcess:
    process: asyncio.subprocess.Process
    address: str

    async def cpu(self) -> float:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(b"cpu\n")
        await self.process.stdin.drain()
        return float(await self.process.stdout.readline())

    async def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        await asyncio.wait_for(self.process.wait(), 30)


async def start_registry(instances: int, services: int) -> RegistryProcess:
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.bench.bench_registry_watch",
        "serve",
        str(instances),
        str(services),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    line = await asyncio.wait_for(child.stdout.readline(), 300)
    return RegistryProcess(child, line.decode().strip())


# ------------------------------------------------------------------ the watchers
@dataclass
class Watcher:
    """One Watch stream; notes when an address joins or leaves its view."""

    stream: Any
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    seen: dict[str, float] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None

    async def follow(self) -> None:
        addresses: set[str] = set()
        async for message in self.stream:
            now = time.perf_counter()
            if getattr(message, "delta", False):
                joined = {i.address for i in message.instances}
                left = set(message.removed)
                addresses = (addresses - left) | joined
            else:  # a full view (the first message; every message of older registries)
                current = {i.address for i in message.instances}
                joined, left = current - addresses, addresses - current
                addresses = current
            if self.ready.is_set():
                for address in joined:
                    self.seen[f"+{address}"] = now
                for address in left:
                    self.seen[f"-{address}"] = now
            self.ready.set()


async def open_watchers(stubs: list[Any], services: list[str]) -> list[Watcher]:
    watchers = []
    for n, service in enumerate(services):
        request = pb.WatchRequest(service=service)
        if "deltas" in pb.WatchRequest.DESCRIPTOR.fields_by_name:
            request.deltas = True
        watcher = Watcher(stubs[n % len(stubs)].Watch(request))
        watcher.task = asyncio.create_task(watcher.follow())
        watchers.append(watcher)
    await asyncio.gather(*(w.ready.wait() for w in watchers))
    return watchers


async def close_watchers(watchers: list[Watcher]) -> None:
    for w in watchers:
        w.stream.cancel()
    await asyncio.gather(*(w.task for w in watchers if w.task), return_exceptions=True)


async def one_change(
    stub: Any, watchers: list[Watcher], n: int, lease: list[tuple[str, str]]
) -> float:
    """Register (or, every other time, deregister) an instance of TARGET; the seconds
    until every watcher of TARGET has the change."""
    start = time.perf_counter()
    if not lease:
        address = f"10.250.{n % 250}.9:6000"
        reply = await stub.Register(pb.RegisterRequest(service=TARGET, address=address, ttl_s=600))
        lease.append((reply.lease_id, address))
        key = f"+{address}"
    else:
        lease_id, address = lease.pop()
        await stub.Deregister(pb.DeregisterRequest(lease_id=lease_id))
        key = f"-{address}"
    for _ in range(20000):  # bounded: 20 s at most
        if all(key in w.seen for w in watchers):
            break
        await asyncio.sleep(0.001)
    else:
        raise RuntimeError(f"change {key} did not reach every watcher")
    return max(w.seen.pop(key) for w in watchers) - start


async def measure(
    registry: RegistryProcess, stub: Any, watchers: list[Watcher], changes: int, first: int
) -> tuple[list[float], float]:
    """`changes` changes of TARGET: their times, and the registry's CPU per change."""
    lease: list[tuple[str, str]] = []
    cpu0 = await registry.cpu()
    times = [await one_change(stub, watchers, first + i, lease) for i in range(changes)]
    return times, (await registry.cpu() - cpu0) / changes


async def run(instances: int, services: int, rounds: int, idle_s: float) -> dict[str, float]:
    registry = await start_registry(instances, services)
    channels = [grpc.aio.insecure_channel(registry.address) for _ in range(4)]
    stubs = [RegistryServiceStub(c) for c in channels]
    stub = stubs[0]
    others = [f"svc-{1 + n % (services - 1):02d}" for n in range(OTHERS)] if services > 1 else []
    try:
        targets = await open_watchers(stubs, [TARGET] * WATCHERS)
        isolated: list[float] = []
        crowded: list[float] = []
        cpu_isolated: list[float] = []
        cpu_crowded: list[float] = []
        await measure(registry, stub, targets, 4, 0)  # warm-up
        for r in range(rounds):
            times, cpu = await measure(registry, stub, targets, CHANGES_PER_ROUND, 1000 * r)
            isolated += times
            cpu_isolated.append(cpu)
            extra = await open_watchers(stubs, others)
            times, cpu = await measure(registry, stub, targets, CHANGES_PER_ROUND, 1000 * r + 500)
            crowded += times
            cpu_crowded.append(cpu)
            await close_watchers(extra)
        extra = await open_watchers(stubs, others)
        await asyncio.sleep(1.0)  # let the opening settle before measuring idle
        cpu0, t0 = await registry.cpu(), time.perf_counter()
        await asyncio.sleep(idle_s)
        idle = (await registry.cpu() - cpu0) / (time.perf_counter() - t0)
        await close_watchers(extra + targets)
    finally:
        for c in channels:
            await c.close()
        await registry.stop()
    return {
        "isolated_ms": statistics.median(isolated) * 1e3,
        "crowded_ms": statistics.median(crowded) * 1e3,
        "cpu_isolated_ms": statistics.median(cpu_isolated) * 1e3,
        "cpu_crowded_ms": statistics.median(cpu_crowded) * 1e3,
        "idle_percent": idle * 100,
    }


async def main() -> None:
    pin_to_cpu(0)
    result = await run(WATCHERS * 50, SERVICES, ROUNDS, IDLE_S)
    print(
        f"one change of a service with {WATCHERS} watchers, 5,000 instances over {SERVICES} "
        f"services: {result['isolated_ms']:.1f} ms alone, {result['crowded_ms']:.1f} ms with "
        f"{OTHERS} watchers of other services open"
    )
    print(
        f"registry CPU per change: {result['cpu_isolated_ms']:.2f} ms alone, "
        f"{result['cpu_crowded_ms']:.2f} ms crowded"
    )
    print(
        f"registry idle CPU with {WATCHERS + OTHERS} watchers open, no changes, "
        f"{IDLE_S:.0f} s: {result['idle_percent']:.3f}% of a core (goal < 0.5%)"
    )
    bench_line(
        "registry_watch_fanout",
        result["isolated_ms"] / result["crowded_ms"],
        result["crowded_ms"],
        "ms",
        f"the same change with only its service's {WATCHERS} watchers open, same run",
    )


async def curve() -> None:
    pin_to_cpu(0)
    print(
        "| instances | services | change -> 100 watchers | +100 other watchers | "
        "registry CPU / change | idle CPU, 200 watchers |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for instances in (10, 100, 1000, 5000):
        services = min(SERVICES, instances)
        r = await run(instances, services, 3, 5.0)
        print(
            f"| {instances:,} | {services} | {r['isolated_ms']:.1f} ms | {r['crowded_ms']:.1f} ms "
            f"| {r['cpu_crowded_ms']:.2f} ms | {r['idle_percent']:.2f}% |",
            flush=True,
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        asyncio.run(_serve(int(sys.argv[2]), int(sys.argv[3])))
    elif sys.argv[1:2] == ["curve"]:
        asyncio.run(curve())
