"""RPC metrics on OpenTelemetry: duration histograms, in-flight gauge, errors by reason.

`MetricsPolicy` works on both sides and records into an `RpcMetrics` store:

- `rpc.server.duration` / `rpc.client.duration`: histograms in milliseconds by
  `rpc.system`, `rpc.service`, `rpc.method`, `rpc.grpc.status_code` (their count
  is the call count);
- `rpc.server.in_flight` / `rpc.client.in_flight`: calls started and not finished;
- `rpc.server.errors` / `rpc.client.errors`: failed calls by `error.type`, the
  typed error's reason (`RATE_LIMITED`, `CIRCUIT_OPEN`, `BULKHEAD_FULL`, ...).
  Other policies reject by raising typed errors, so counting reasons here counts
  their decisions without coupling them to metrics.
- hooks other policies may call directly: `breaker_state()`, `rejected()`, `retry()`.
  `breaker_listener()` adapts `breaker_state()` to the circuit breaker's
  `on_state_change(target, method, old, new)` callback, so wiring a breaker is
  `CircuitBreakerPolicy(config, on_state_change=metrics.breaker_listener())`
  and neither module imports the other.

Why a store instead of calling the SDK's synchronous instruments per call: one
SDK `Histogram.record()` copies and hashes the attribute dict, takes a lock and
offers an exemplar, which costs about as much CPU as a whole span (measured
15-20 us here), and the in-flight counter would need two more.  The store keeps
one small histogram per (side, method, status code), found through a list
indexed by the code, so a call costs a `bisect` and a few integer additions.
The in-flight gauge, errors and hook values are ordinary OpenTelemetry observable
instruments on the given `MeterProvider`; the histograms are merged into the
metric data by the readers in this module (`StoreReader`, `StorePeriodicReader`),
which `framework.telemetry.sdk` builds, the role the OpenTelemetry spec calls a
MetricProducer (not yet in the Python SDK).
"""

from __future__ import annotations

import asyncio
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

import grpc
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    MetricsData,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from framework.errors import code_of
from framework.policy import Call, Exit, Method, Side

# Milliseconds; sub-millisecond resolution matters for in-process RPCs.
DEFAULT_BOUNDS_MS: tuple[float, ...] = (
    0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000,
)  # fmt: skip
SCOPE = InstrumentationScope("framework.telemetry.metrics")
_N_CODES = 17

# The shape of `framework.policies.breaker.StateListener`: (target, method, old, new), where
# the states are enums whose `.value` is "closed" / "open" / "half_open".
BreakerListener = Callable[[str, str, Any, Any], None]


def _ignore_breaker(target: str, method: str, old: Any, new: Any) -> None:
    """The listener of disabled metrics: nothing to record."""


def outcome_code(error: BaseException) -> grpc.StatusCode:
    """The status a failed call ends with; a cancelled task is CANCELLED."""
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return code_of(error)


class _Histogram:
    __slots__ = ("count", "counts", "max", "min", "sum")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets
        self.count = 0
        self.sum = 0.0
        self.min = float("inf")
        self.max = float("-inf")


class MethodStats:
    """Measurements of one method on one side. Updated under a lock (sync servers use threads)."""

    __slots__ = ("attrs", "bounds", "errors", "hists", "in_flight", "lock", "seen")

    def __init__(self, service: str, method: str, bounds: tuple[float, ...]) -> None:
        self.attrs: dict[str, Any] = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": method,
        }
        self.bounds = bounds
        self.hists: list[_Histogram | None] = [None] * _N_CODES
        self.errors: dict[tuple[int, str], int] = {}
        self.in_flight = 0
        self.seen = False
        self.lock = threading.Lock()

    def started(self) -> None:
        with self.lock:
            self.in_flight += 1
            self.seen = True

    def finished(self, error: BaseException | None, duration_s: float) -> None:
        ms = duration_s * 1000.0
        code = grpc.StatusCode.OK if error is None else outcome_code(error)
        index = code.value[0]
        with self.lock:
            self.in_flight -= 1
            hist = self.hists[index]
            if hist is None:
                hist = self.hists[index] = _Histogram(len(self.bounds) + 1)
            hist.counts[bisect_left(self.bounds, ms)] += 1
            hist.count += 1
            hist.sum += ms
            if ms < hist.min:
                hist.min = ms
            if ms > hist.max:
                hist.max = ms
            if error is not None:
                key = (index, getattr(error, "reason", None) or code.name)
                self.errors[key] = self.errors.get(key, 0) + 1


class RpcMetrics:
    """The store behind `MetricsPolicy`, published through `meter_provider`.

    Also the hook surface for other policies: `breaker_state`, `rejected`, `retry`.
    """

    def __init__(
        self,
        meter_provider: MeterProvider | None = None,
        *,
        bounds_ms: Sequence[float] = DEFAULT_BOUNDS_MS,
    ) -> None:
        bounds = tuple(float(b) for b in bounds_ms)
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError(f"bounds_ms must be strictly increasing, got {bounds_ms!r}")
        self.bounds = bounds
        self.start_ns = time.time_ns()
        self._stats: dict[tuple[Side, str], MethodStats] = {}
        self._breakers: dict[str, tuple[str, set[str]]] = {}
        self._rejections: dict[tuple[str, str], int] = {}
        self._retries: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        if meter_provider is not None:
            self.publish(meter_provider)

    def publish(self, meter_provider: MeterProvider) -> None:
        """Register the observable instruments (in-flight, errors, hooks) on a provider."""
        meter = meter_provider.get_meter("framework.telemetry.metrics")
        for side in Side:
            meter.create_observable_up_down_counter(
                f"rpc.{side.value}.in_flight",
                callbacks=[self._in_flight_callback(side)],
                unit="{call}",
                description=f"{side.value.title()} calls started and not finished",
            )
            meter.create_observable_counter(
                f"rpc.{side.value}.errors",
                callbacks=[self._errors_callback(side)],
                unit="{call}",
                description="Failed calls by error.type (the typed error's reason)",
            )
        meter.create_observable_gauge(
            "breaker.state",
            callbacks=[self._breaker_callback],
            description="1 for the state each circuit breaker is in, 0 for the others",
        )
        meter.create_observable_counter(
            "policy.rejections",
            callbacks=[self._rejections_callback],
            unit="{call}",
            description="Calls a policy refused, by policy and reason",
        )
        meter.create_observable_counter(
            "rpc.client.retries",
            callbacks=[self._retries_callback],
            unit="{attempt}",
            description="Retry attempts by method",
        )

    def stats(self, side: Side, method: Method) -> MethodStats:
        key = (side, method.full_name)
        with self._lock:
            stats = self._stats.get(key)
            if stats is None:
                stats = self._stats[key] = MethodStats(method.service, method.name, self.bounds)
        return stats

    # ----- hooks for other policies (rare events: plain dict updates)
    def breaker_state(self, breaker: str, state: str) -> None:
        """A circuit breaker named `breaker` moved to `state` ("closed", "open", "half_open")."""
        with self._lock:
            _, known = self._breakers.get(breaker, ("", set()))
            self._breakers[breaker] = (state, known | {state})

    def breaker_listener(self) -> BreakerListener:
        """A `CircuitBreakerPolicy(on_state_change=...)` callback feeding `breaker_state`.

        The breaker is named `<target><method>` (e.g. `127.0.0.1:5000/echo.v1.EchoService/Echo`);
        the state is the enum's value, so this module needs no import of the breaker.
        """

        def listener(target: str, method: str, old: Any, new: Any) -> None:
            name = f"{target}{method}"
            with self._lock:
                known = name in self._breakers
            if not known:  # first change: show the state it left at 0, not nothing
                self.breaker_state(name, str(getattr(old, "value", old)))
            self.breaker_state(name, str(getattr(new, "value", new)))

        return listener

    def rejected(self, policy: str, reason: str) -> None:
        """A policy refused a call (counted also by `rpc.*.errors` when it raised)."""
        with self._lock:
            key = (policy, reason)
            self._rejections[key] = self._rejections.get(key, 0) + 1

    def retry(self, service: str, method: str) -> None:
        """A client retried a call."""
        with self._lock:
            key = (service, method)
            self._retries[key] = self._retries.get(key, 0) + 1

    # ----- observable callbacks
    def _in_flight_callback(self, side: Side) -> Any:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            for (s, _), stats in list(self._stats.items()):
                if s is side and stats.seen:
                    yield Observation(stats.in_flight, stats.attrs)

        return callback

    def _errors_callback(self, side: Side) -> Any:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            for (s, _), stats in list(self._stats.items()):
                if s is not side:
                    continue
                with stats.lock:
                    errors = list(stats.errors.items())
                for (code, reason), count in errors:
                    attrs = {**stats.attrs, "rpc.grpc.status_code": code, "error.type": reason}
                    yield Observation(count, attrs)

        return callback

    def _breaker_callback(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            breakers = list(self._breakers.items())
        for name, (state, known) in breakers:
            for seen in sorted(known):
                yield Observation(int(seen == state), {"breaker": name, "state": seen})

    def _rejections_callback(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            items = list(self._rejections.items())
        for (policy, reason), count in items:
            yield Observation(count, {"policy": policy, "reason": reason})

    def _retries_callback(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            items = list(self._retries.items())
        for (service, method), count in items:
            yield Observation(count, {"rpc.service": service, "rpc.method": method})

    # ----- the producer: histograms as OpenTelemetry metric data
    def produce(self) -> list[Metric]:
        """Cumulative duration histograms, one metric per side that has data."""
        now = time.time_ns()
        points: dict[Side, list[HistogramDataPoint]] = {side: [] for side in Side}
        for (side, _), stats in list(self._stats.items()):
            with stats.lock:
                hists = [(code, h, list(h.counts), h.count, h.sum, h.min, h.max)
                         for code, h in enumerate(stats.hists) if h is not None]  # fmt: skip
            for code, _h, counts, count, total, low, high in hists:
                points[side].append(
                    HistogramDataPoint(
                        attributes={**stats.attrs, "rpc.grpc.status_code": code},
                        start_time_unix_nano=self.start_ns,
                        time_unix_nano=now,
                        count=count,
                        sum=total,
                        bucket_counts=counts,
                        explicit_bounds=self.bounds,
                        min=low,
                        max=high,
                    )
                )
        return [
            Metric(
                name=f"rpc.{side.value}.duration",
                description=f"Duration of {side.value} RPCs",
                unit="ms",
                data=Histogram(points[side], AggregationTemporality.CUMULATIVE),
            )
            for side in Side
            if points[side]
        ]

    def merge_into(self, data: MetricsData | None, resource: Resource) -> MetricsData:
        """`data` with this store's histograms added under the `framework.telemetry.metrics`
        scope."""
        produced = self.produce()
        if data is None or not data.resource_metrics:
            rm = ResourceMetrics(resource, [ScopeMetrics(SCOPE, produced, "")], "")
            return MetricsData([rm])
        first, *rest = data.resource_metrics
        scopes = list(first.scope_metrics)
        for i, scope in enumerate(scopes):
            if scope.scope.name == SCOPE.name:
                scopes[i] = replace(scope, metrics=[*scope.metrics, *produced])
                break
        else:
            scopes.append(ScopeMetrics(SCOPE, produced, ""))
        return MetricsData([replace(first, scope_metrics=scopes), *rest])


class StoreReader(InMemoryMetricReader):
    """A pull reader (Prometheus, tests) whose data includes the store's histograms."""

    def __init__(self, store: RpcMetrics, resource: Resource | None = None) -> None:
        super().__init__()
        self.store = store
        self.resource = resource or Resource.create({})

    def get_metrics_data(self) -> MetricsData:
        return self.store.merge_into(super().get_metrics_data(), self.resource)


class StorePeriodicReader(PeriodicExportingMetricReader):
    """A push reader (OTLP, console) whose exports include the store's histograms."""

    def __init__(self, store: RpcMetrics, resource: Resource, *args: Any, **kwargs: Any) -> None:
        self.store = store
        self.resource = resource
        super().__init__(*args, **kwargs)

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        merged = self.store.merge_into(metrics_data, self.resource)
        super()._receive_metrics(merged, timeout_millis, **kwargs)


class MetricsPolicy:
    """Duration, in-flight and errors of every RPC, on either side (put it after tracing)."""

    def __init__(self, store: RpcMetrics | None) -> None:
        self.store = store

    def bind(self, method: Method) -> _MetricsEnter | None:
        if self.store is None:
            return None
        return _MetricsEnter(self.store, method)

    def breaker_listener(self) -> BreakerListener:
        """`RpcMetrics.breaker_listener()` of this policy's store (a no-op when disabled)."""
        if self.store is None:
            return _ignore_breaker
        return self.store.breaker_listener()


class _MetricsEnter:
    __slots__ = ("client", "method", "server", "store")

    def __init__(self, store: RpcMetrics, method: Method) -> None:
        self.store = store
        self.method = method
        self.server: MethodStats | None = None
        self.client: MethodStats | None = None

    def __call__(self, call: Call) -> Exit:
        if call.side is Side.SERVER:
            stats = self.server or self._stats(Side.SERVER)
        else:
            stats = self.client or self._stats(Side.CLIENT)
        stats.started()
        started = time.perf_counter()
        finished = stats.finished

        def exit_(error: BaseException | None) -> None:
            finished(error, time.perf_counter() - started)

        return exit_

    def _stats(self, side: Side) -> MethodStats:
        stats = self.store.stats(side, self.method)
        if side is Side.SERVER:
            self.server = stats
        else:
            self.client = stats
        return stats
