"""Bounded load against the gateway: a scenario's iterations at a fixed rate, every request timed.

A scenario is any object with `async setup(ctx)` (before the clock starts: register
customers, log in) and `async iteration(ctx, index)` (one unit of work: a few
requests made with `ctx.request`, each recorded as a `Sample`).  The loop starts
`rate_per_s` iterations per second (open loop: a slow system does not slow the
offered load) with at most `concurrency` in flight (beyond that an iteration is
counted as skipped, not queued), for `duration_s`, then waits for those in flight
(at most one request timeout) and cancels the rest.  127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from framework.chaos.experiment import LoadSpec

__all__ = [
    "HttpScenario",
    "LoadContext",
    "LoadResult",
    "Sample",
    "Scenario",
    "ScenarioError",
    "build_scenario",
    "run_load",
]

logger = logging.getLogger(__name__)


class ScenarioError(RuntimeError):
    """The scenario could not be set up (the experiment cannot run)."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One request: when it started (seconds since the load began), how long, the outcome."""

    name: str
    started_s: float
    latency_s: float
    ok: bool
    status: str


@dataclass(slots=True)
class LoadResult:
    samples: list[Sample] = field(default_factory=list)
    iterations: int = 0
    skipped: int = 0  # not started: `concurrency` iterations were in flight
    cancelled: int = 0  # still running when the load ended
    duration_s: float = 0.0


class LoadContext:
    """What a scenario uses: the gateway client that records every request, and state."""

    def __init__(
        self,
        gateway_url: str,
        *,
        timeout_s: float,
        operator_token: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        host = urlsplit(gateway_url).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"load goes to 127.0.0.1 only, got {gateway_url}")
        import httpx

        self.gateway_url = gateway_url
        self.operator_token = operator_token
        self.timeout_s = timeout_s
        self.http = httpx.AsyncClient(
            base_url=gateway_url,
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        )
        self.state: dict[str, Any] = {}
        self.result = LoadResult()
        self.recording = False
        self._clock = clock
        self._t0 = clock()

    def begin(self) -> None:
        self._t0 = self._clock()
        self.recording = True

    def now_s(self) -> float:
        return self._clock() - self._t0

    async def request(
        self,
        name: str,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        expect: Sequence[int] = (200,),
    ) -> Any:
        """Send one request through the gateway and record it; the response, or None when
        it did not complete (timeout, connection refused or reset)."""
        import httpx

        started = self.now_s()
        begun = self._clock()
        try:
            response = await self.http.request(method, path, json=json, headers=headers)
        except httpx.TimeoutException:
            self._record(name, started, begun, False, "timeout")
            return None
        except httpx.TransportError as error:
            self._record(name, started, begun, False, type(error).__name__)
            return None
        self._record(
            name, started, begun, response.status_code in expect, str(response.status_code)
        )
        return response

    def _record(self, name: str, started: float, begun: float, ok: bool, status: str) -> None:
        if self.recording:
            self.result.samples.append(Sample(name, started, self._clock() - begun, ok, status))

    def record_failure(self, name: str, status: str) -> None:
        """Record a failed unit of work that was not a request (e.g. a scenario error)."""
        self._record(name, self.now_s(), self._clock(), False, status)

    async def close(self) -> None:
        await self.http.aclose()


class Scenario(Protocol):
    async def setup(self, ctx: LoadContext) -> None: ...

    async def iteration(self, ctx: LoadContext, index: int) -> None: ...


class HttpScenario:
    """The built-in scenario: one request per iteration (`{uuid}` in the path or in string
    values of the body is replaced by a fresh UUID; an `Idempotency-Key: {uuid}` header too)."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec

    async def setup(self, ctx: LoadContext) -> None:
        return None

    async def iteration(self, ctx: LoadContext, index: int) -> None:
        s = self.spec
        fresh = str(uuid.uuid4())
        body = _fill(s.body, fresh) if s.body is not None else None
        headers = {k: v.replace("{uuid}", fresh) for k, v in s.headers.items()}
        await ctx.request(
            f"{s.method} {s.path}",
            s.method,
            s.path.replace("{uuid}", fresh),
            json=body,
            headers=headers,
            expect=s.expect,
        )


def _fill(value: Any, fresh: str) -> Any:
    if isinstance(value, str):
        return value.replace("{uuid}", fresh)
    if isinstance(value, Mapping):
        return {k: _fill(v, fresh) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, fresh) for v in value]
    return value


def build_scenario(spec: LoadSpec) -> Scenario:
    """The scenario an experiment names: "http", or `module:factory` called with `params`."""
    if spec.scenario == "http":
        return HttpScenario(spec)
    module_name, _, attribute = spec.scenario.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ScenarioError(f"load.scenario {spec.scenario!r}: {error}") from None
    try:
        scenario: Scenario = factory(**dict(spec.params))
    except TypeError as error:
        raise ScenarioError(f"load.scenario {spec.scenario!r} with load.params: {error}") from None
    return scenario


async def run_load(spec: LoadSpec, scenario: Scenario, ctx: LoadContext) -> LoadResult:
    """Run the scenario's iterations for `spec.duration_s` at `spec.rate_per_s` (see module)."""
    result = ctx.result
    in_flight: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    if not ctx.recording:
        ctx.begin()
    start = loop.time() - ctx.now_s()
    interval = 1.0 / spec.rate_per_s
    index = 0

    async def one(i: int) -> None:
        try:
            await scenario.iteration(ctx, i)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - a scenario bug must not stop the load
            logger.warning("load iteration %s failed: %r", i, error)
            ctx.record_failure("iteration", type(error).__name__)

    while True:
        due = start + index * interval
        if due - start >= spec.duration_s:
            break
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(in_flight) >= spec.concurrency:
            result.skipped += 1
        else:
            task = asyncio.create_task(one(index), name=f"load-{index}")
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            result.iterations += 1
        index += 1
    if in_flight:
        _, pending = await asyncio.wait(set(in_flight), timeout=spec.timeout_s * 2)
        for task in pending:
            task.cancel()
        result.cancelled = len(pending)
        await asyncio.gather(*pending, return_exceptions=True)
    ctx.recording = False
    result.duration_s = loop.time() - start
    return result
