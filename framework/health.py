"""Standard `grpc.health.v1` health that reflects dependencies.

Checks (a store reachable, a bus connected, CPU or memory under a threshold) run
periodically in background tasks, never on the request path.  While a required
check fails, the services it gates are NOT_SERVING; they return to SERVING when
it recovers.  Draining turns every service NOT_SERVING for good.  Operators get
each check's status, latency and last error from `HealthReportService`: the
checks are in the report only for a caller whose verified token holds the
`operator` scope (`OPERATOR_SCOPE`); anyone else gets the services' statuses
and whether the server is draining, no more (a probe's error text can name a
database role, a host or a path).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from google.protobuf import timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from framework.errors import NotFoundError
from framework.policy import current_call
from gen.framework.v1 import health_pb2 as report_pb2
from gen.framework.v1 import health_pb2_grpc as report_pb2_grpc

logger = logging.getLogger(__name__)

OPERATOR_SCOPE = "operator"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@runtime_checkable
class HealthCheck(Protocol):
    """A dependency probe: `probe()` returns when healthy and raises when not."""

    @property
    def name(self) -> str: ...

    @property
    def required(self) -> bool: ...

    @property
    def services(self) -> tuple[str, ...]:  # empty: gates every service of the process
        ...

    @property
    def interval_s(self) -> float: ...

    @property
    def timeout_s(self) -> float: ...

    async def probe(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Check:
    """A check from any async callable, e.g. `Check("postgres", store.ping)`."""

    name: str
    fn: Callable[[], Awaitable[object]]
    required: bool = True
    services: tuple[str, ...] = ()
    interval_s: float = 5.0
    timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("Check.name must not be empty")
        if not callable(self.fn):
            raise TypeError(
                f"Check({self.name!r}, fn) must be an async callable such as store.ping, "
                f"got {type(self.fn).__name__}"
            )
        if self.interval_s <= 0:
            raise ValueError(f"Check.interval_s must be > 0, got {self.interval_s}")
        if self.timeout_s <= 0:
            raise ValueError(f"Check.timeout_s must be > 0, got {self.timeout_s}")

    async def probe(self) -> None:
        await self.fn()


class UnhealthyError(Exception):
    """Raised by a probe to say why a dependency is unhealthy."""


@dataclass(frozen=True, slots=True)
class LoadCheck:
    """Fails while the 1-minute load average per core is above `max_load_per_cpu`."""

    max_load_per_cpu: float = 4.0
    name: str = "cpu"
    required: bool = False
    services: tuple[str, ...] = ()
    interval_s: float = 10.0
    timeout_s: float = 1.0

    async def probe(self) -> None:
        load = os.getloadavg()[0] / (os.cpu_count() or 1)
        if load > self.max_load_per_cpu:
            raise UnhealthyError(f"load {load:.2f} per CPU exceeds {self.max_load_per_cpu}")


@dataclass(frozen=True, slots=True)
class MemoryCheck:
    """Fails while the machine's available memory is below `min_available_fraction`."""

    min_available_fraction: float = 0.05
    name: str = "memory"
    required: bool = False
    services: tuple[str, ...] = ()
    interval_s: float = 10.0
    timeout_s: float = 1.0
    meminfo_path: str = "/proc/meminfo"

    async def probe(self) -> None:
        fields: dict[str, int] = {}
        text = await asyncio.to_thread(Path(self.meminfo_path).read_text)
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            fields[key] = int(rest.split()[0])
        available = fields.get("MemAvailable", 0) / max(1, fields.get("MemTotal", 1))
        if available < self.min_available_fraction:
            raise UnhealthyError(
                f"available memory {available:.1%} is below {self.min_available_fraction:.1%}"
            )


@dataclass(slots=True)
class _CheckState:
    check: HealthCheck
    healthy: bool = False
    checked: bool = False
    latency_ms: float = 0.0
    last_error: str = ""
    checked_at: datetime | None = None
    consecutive_failures: int = 0


class HealthMonitor:
    """Runs the checks and keeps the standard health service's statuses current."""

    def __init__(self, checks: Sequence[HealthCheck] = ()) -> None:
        for check in checks:
            if not isinstance(check, HealthCheck):
                raise TypeError(
                    'health_checks items must be checks such as Check("db", store.ping), '
                    f"got {type(check).__name__}"
                )
        names = [c.name for c in checks]
        if len(set(names)) != len(names):
            raise ValueError(f"health check names must be unique, got {names}")
        self.servicer = _HealthServicer(self)
        self._changed = asyncio.Condition()
        self.report_servicer = _ReportServicer(self)
        self._states = [_CheckState(c) for c in checks]
        self._services: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._draining = False
        self._status: dict[str, int] = {"": SERVING}

    @property
    def draining(self) -> bool:
        return self._draining

    async def start(self, services: Iterable[str]) -> None:
        """Run every check once, publish statuses, then keep checking in the background."""
        self._services = list(services)
        await asyncio.gather(*(self._run_once(s) for s in self._states))
        await self._publish()
        self._tasks = [asyncio.create_task(self._loop(s)) for s in self._states]

    async def check_now(self) -> None:
        """Run every check once now and publish (for operators and tests)."""
        await asyncio.gather(*(self._run_once(s) for s in self._states))
        await self._publish()

    async def drain(self) -> None:
        """Every service NOT_SERVING from now on (graceful shutdown)."""
        self._draining = True
        async with self._changed:
            for service in ["", *self._services]:
                self._status[service] = NOT_SERVING
            self._changed.notify_all()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks = []

    def status(self, service: str = "") -> int:
        return int(self._status.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN))

    async def _loop(self, state: _CheckState) -> None:
        while True:
            await asyncio.sleep(state.check.interval_s)
            before = state.healthy
            await self._run_once(state)
            if state.healthy != before:
                await self._publish()

    async def _run_once(self, state: _CheckState) -> None:
        check = state.check
        started = time.perf_counter()
        try:
            await asyncio.wait_for(check.probe(), timeout=check.timeout_s)
        except TimeoutError:
            self._record(state, started, f"timed out after {check.timeout_s}s")
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - a probe's failure is data: recorded, reported
            self._record(state, started, f"{type(error).__name__}: {error}")
        else:
            self._record(state, started, None)

    def _record(self, state: _CheckState, started: float, error: str | None) -> None:
        was = state.healthy if state.checked else None
        state.checked = True
        state.latency_ms = (time.perf_counter() - started) * 1000
        state.checked_at = datetime.now(UTC)
        state.healthy = error is None
        if error is None:
            state.consecutive_failures = 0
        else:
            state.last_error = error
            state.consecutive_failures += 1
        if was is not None and was != state.healthy:
            level = logging.INFO if state.healthy else logging.WARNING
            logger.log(
                level,
                "health check %s is now %s%s",
                state.check.name,
                "healthy" if state.healthy else "failing",
                "" if error is None else f": {error}",
                extra={"check": state.check.name},
            )

    def _gated(self, service: str) -> bool:
        for state in self._states:
            check = state.check
            if (check.required and not state.healthy) and (
                not check.services or service in check.services
            ):
                return True
        return False

    async def _publish(self) -> None:
        if self._draining:
            return
        for service in ["", *self._services]:
            if service == "":
                down = any(s.check.required and not s.healthy for s in self._states)
            else:
                down = self._gated(service)
            status = NOT_SERVING if down else SERVING
            if self._status.get(service) != status:
                async with self._changed:
                    self._status[service] = status
                    self._changed.notify_all()

    def report(self, *, detail: bool = True) -> report_pb2.GetHealthReportResponse:
        """Statuses and draining; with `detail`, every check with latency and last error."""
        response = report_pb2.GetHealthReportResponse(
            draining=self._draining, checks_withheld=not detail
        )
        for state in self._states if detail else ():
            item = response.checks.add(
                name=state.check.name,
                required=state.check.required,
                healthy=state.healthy,
                latency_ms=round(state.latency_ms, 3),
                last_error=state.last_error,
                consecutive_failures=state.consecutive_failures,
                services=list(state.check.services),
            )
            if state.checked_at is not None:
                stamp = timestamp_pb2.Timestamp()
                stamp.FromDatetime(state.checked_at)
                item.checked_at.CopyFrom(stamp)
        for service in ["", *self._services]:
            name = health_pb2.HealthCheckResponse.ServingStatus.Name(self.status(service))
            response.services.add(service=service, status=name)
        return response


class _HealthServicer(health_pb2_grpc.HealthServicer):
    """grpc.health.v1 over the monitor's statuses.

    Unlike grpcio-health-checking's servicer, Watch streams end once draining has
    been announced, so open watches do not hold a graceful shutdown for its whole
    grace period.
    """

    def __init__(self, monitor: HealthMonitor) -> None:
        self._monitor = monitor

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> health_pb2.HealthCheckResponse:
        status = self._monitor._status.get(request.service)
        if status is None:
            raise NotFoundError(
                f"unknown service {request.service!r}; ask for one this server runs"
            )
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        monitor, last = self._monitor, None
        while True:
            async with monitor._changed:
                status = monitor.status(request.service)
                while status == last and not monitor.draining:
                    await monitor._changed.wait()
                    status = monitor.status(request.service)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            if monitor.draining:
                return


class _ReportServicer(report_pb2_grpc.HealthReportServiceServicer):
    def __init__(self, monitor: HealthMonitor) -> None:
        self._monitor = monitor

    async def GetHealthReport(
        self, request: report_pb2.GetHealthReportRequest, context: Any
    ) -> report_pb2.GetHealthReportResponse:
        call = current_call()
        scopes = getattr(call.principal if call is not None else None, "scopes", ())
        return self._monitor.report(detail=OPERATOR_SCOPE in scopes)


@dataclass(frozen=True, slots=True)
class HealthSummary:
    """What `python -m framework health` prints."""

    target: str
    status: str
    report: report_pb2.GetHealthReportResponse

    @property
    def healthy(self) -> bool:
        return self.status == "SERVING"

    def __str__(self) -> str:
        lines = [f"{self.target}: {self.status}" + (" (draining)" if self.report.draining else "")]
        for svc in self.report.services:
            lines.append(f"  service {svc.service or '<process>'}: {svc.status}")
        for c in self.report.checks:
            state = "ok" if c.healthy else f"FAILING ({c.last_error})"
            kind = "required" if c.required else "advisory"
            lines.append(f"  check {c.name} [{kind}]: {state}, {c.latency_ms:.1f} ms")
        if self.report.checks_withheld:
            lines.append(
                "  checks: withheld (the server reports them to callers with the "
                f"'{OPERATOR_SCOPE}' scope: give such a token with --token-file)"
            )
        return "\n".join(lines)


async def fetch_report(target: str, *, timeout_s: float = 5.0, token: str = "") -> HealthSummary:
    """Ask a server for its standard health status and its report (checks need a `token`
    with the operator scope)."""
    import grpc.aio
    from grpc_health.v1 import health_pb2_grpc

    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    async with grpc.aio.insecure_channel(target) as channel:
        check = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
        )
        report = await report_pb2_grpc.HealthReportServiceStub(channel).GetHealthReport(
            report_pb2.GetHealthReportRequest(), timeout=timeout_s, metadata=metadata
        )
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(check.status)
    return HealthSummary(target, status, report)
