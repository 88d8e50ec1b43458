"""Shared benchmark tools: interleaved rounds, medians, CPU time, the BENCH line.

Every benchmark measures the framework and its baseline in the same process run,
interleaved (A B A B ...), and reports medians so machine noise cancels out.
"""

from __future__ import annotations

import asyncio
import os
import resource
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Sample:
    """One timed round: operations done, wall seconds, CPU seconds of this process."""

    ops: int
    wall_s: float
    cpu_s: float
    latencies_s: tuple[float, ...] = ()

    @property
    def rate(self) -> float:
        return self.ops / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def cpu_us_per_op(self) -> float:
        return self.cpu_s / self.ops * 1e6 if self.ops else 0.0


def cpu_seconds() -> float:
    """CPU time of this process (user + system), children excluded."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def timed(run: Callable[[], Awaitable[int]]) -> Sample:
    """Time one round of `run`, which returns how many operations it did."""
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    ops = await run()
    return Sample(ops, time.perf_counter() - t0, cpu_seconds() - cpu0)


async def closed_loop(
    call: Callable[[], Awaitable[object]], *, concurrency: int, total: int
) -> Sample:
    """`total` calls through `concurrency` workers; records each call's latency."""
    latencies: list[float] = []
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            start = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - start)

    cpu0, t0 = cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Sample(len(latencies), time.perf_counter() - t0, cpu_seconds() - cpu0, tuple(latencies))


async def interleave(
    rounds: int, **variants: Callable[[], Awaitable[Sample]]
) -> dict[str, list[Sample]]:
    """Run each variant once per round, in turn (A B A B ...), and collect the samples."""
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    out: dict[str, list[Sample]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            out[name].append(await run())
    return out


def median_rate(samples: Sequence[Sample]) -> float:
    return statistics.median(s.rate for s in samples)


def median_cpu_us(samples: Sequence[Sample]) -> float:
    return statistics.median(s.cpu_us_per_op for s in samples)


def latency_us(samples: Sequence[Sample], q: float) -> float:
    """Median over rounds of the q-quantile latency, in microseconds."""
    return statistics.median(percentile(s.latencies_s, q) for s in samples) * 1e6


def pin_to_cpu(cpu: int) -> None:
    """Pin this process to one core when the machine has more than one (Linux only)."""
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {cpu % (os.cpu_count() or 1)})


def bench_line(name: str, ratio: float, value: float, unit: str, baseline: str) -> str:
    """Print and return the one summary line the conventions define."""
    line = f"BENCH name={name} ratio={ratio:.3f} value={value:.1f} unit={unit} baseline={baseline}"
    print(line, flush=True)
    return line
