"""RPC metrics on OpenTelemetry: duration histograms, in-flight gauge, errors by reason.

`MetricsPolicy` works on both sides and records into an `RpcMetrics` store.  Names
follow one of two namings (`framework.telemetry.names`): the OpenTelemetry RPC
semantic conventions (default) or the classic grpc-prometheus families.

- duration histograms in seconds, per method and status code (`otel`:
  `rpc.server.call.duration` with `rpc.response.status_code` and `error.type`;
  `grpc_prometheus`: `grpc_server_handling_seconds` per method, plus the counters
  `grpc_server_started` and `grpc_server_handled` by `grpc_code`), with exemplars:
  each bucket remembers the trace and span of its latest sampled call;
- `rpc.server.in_flight` / `rpc.client.in_flight`: calls started and not finished;
- `rpc.server.errors` / `rpc.client.errors`: failed calls by status code and
  error type, the typed error's reason (`RATE_LIMITED`, `CIRCUIT_OPEN`,
  `BULKHEAD_FULL`, ...).  Other policies reject by raising typed errors, so
  counting reasons here counts their decisions without coupling them to metrics.
- hooks other policies may call directly: `breaker_state()`, `rejected()`, `retry()`.
  `breaker_listener()` adapts `breaker_state()` to the circuit breaker's
  `on_state_change(target, method, old, new)` callback, so wiring a breaker is
  `CircuitBreakerPolicy(config, on_state_change=metrics.breaker_listener())`
  and neither module imports the other.

Why a store instead of calling the SDK's synchronous instruments per call: one
SDK `Histogram.record()` copies and hashes the attribute dict, takes a lock and
offers an exemplar, which costs about as much CPU as a whole span (measured
15-20 us here), and the in-flight counter would need two more.  The store keeps
one small histogram per (side, method, status code, reason), the successful one
in a slot of its own, so a call costs a `bisect` and a few integer additions.
The in-flight gauge, errors and hook values are ordinary OpenTelemetry observable
instruments on the given `MeterProvider`; the histograms (and the classic
counters, derived from them) are merged into the metric data by the readers in
this module (`StoreReader`, `StorePeriodicReader`), which
`framework.telemetry.sdk` builds, the role the OpenTelemetry spec calls a
MetricProducer (not yet in the Python SDK).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
from opentelemetry.sdk.metrics import Exemplar
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    MetricsData,
    NumberDataPoint,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import INVALID_SPAN_CONTEXT, SpanContext

from framework.policy import Call, Exit, Method, Side
from framework.telemetry.names import OTEL, MetricNames
from framework.telemetry.rpcstats import DEFAULT_BOUNDS_S, BucketHistogram, MethodStats, merge
from framework.telemetry.tracecontext import SPAN_KEY, current_context

SCOPE = InstrumentationScope("framework.telemetry.metrics")

# The shape of `framework.policies.breaker.StateListener`: (target, method, old, new), where
# the states are enums whose `.value` is "closed" / "open" / "half_open".
BreakerListener = Callable[[str, str, Any, Any], None]


def _ignore_breaker(target: str, method: str, old: Any, new: Any) -> None:
    """The listener of disabled metrics: nothing to record."""


class RpcMetrics:
    """The store behind `MetricsPolicy`, published through `meter_provider`.

    `naming` is `"otel"` (default) or `"grpc_prometheus"` (see `framework.telemetry.names`);
    `exemplars=False` stops recording trace ids on the duration buckets.
    Also the hook surface for other policies: `breaker_state`, `rejected`, `retry`.
    """

    def __init__(
        self,
        meter_provider: MeterProvider | None = None,
        *,
        bounds_s: Sequence[float] = DEFAULT_BOUNDS_S,
        naming: str = OTEL,
        exemplars: bool = True,
    ) -> None:
        bounds = tuple(float(b) for b in bounds_s)
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError(f"bounds_s must be strictly increasing, got {bounds_s!r}")
        self.bounds = bounds
        self.names = MetricNames(naming)
        self.exemplars = exemplars
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
                description="Failed calls by status code and error type (typed error reason)",
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
                labels = self.names.method_labels(method)
                stats = self._stats[key] = MethodStats(method, labels, self.bounds)
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
    def _sides(self, side: Side) -> list[MethodStats]:
        return [stats for (s, _), stats in list(self._stats.items()) if s is side]

    def _in_flight_callback(self, side: Side) -> Any:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            for stats in self._sides(side):
                if stats.seen:
                    yield Observation(stats.in_flight, stats.labels)

        return callback

    def _errors_callback(self, side: Side) -> Any:
        names = self.names

        def callback(options: CallbackOptions) -> Iterable[Observation]:
            for stats in self._sides(side):
                with stats.lock:
                    errors = [(key, hist.count) for key, hist in stats.failed.items()]
                for (code, reason), count in errors:
                    labels = {**stats.labels, **names.status_labels(code)}
                    labels[names.error_type_key] = reason
                    yield Observation(count, labels)

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
            if self.names.classic:
                labels = {"grpc_service": service, "grpc_method": method}
            else:
                labels = {"rpc.system.name": "grpc", "rpc.method": f"{service}/{method}"}
            yield Observation(count, labels)

    # ----- the producer: histograms (and the classic counters) as OpenTelemetry metric data
    def produce(self) -> list[Metric]:
        """Cumulative duration histograms (and, classic naming, started/handled counters)."""
        now = time.time_ns()
        metrics: list[Metric] = []
        for side in Side:
            stats = self._sides(side)
            if not stats:
                continue
            if self.names.classic:
                metrics.extend(self._classic(side, stats, now))
                continue
            points = []
            for method in stats:
                for code, reason, hist in method.snapshot():
                    labels = {**method.labels, **self.names.status_labels(code)}
                    if reason is not None:
                        labels["error.type"] = reason
                    points.append(self._point(labels, hist, now))
            if points:
                name, description = self.names.duration(side)
                metrics.append(self._histogram(name, description, points))
        return metrics

    def _classic(self, side: Side, stats: list[MethodStats], now: int) -> list[Metric]:
        started: list[NumberDataPoint] = []
        handled: list[NumberDataPoint] = []
        durations: list[HistogramDataPoint] = []
        for method in stats:
            outcomes = method.snapshot()
            by_code: dict[int, int] = {}
            merged = BucketHistogram(len(self.bounds) + 1)
            for code, _reason, hist in outcomes:
                by_code[code] = by_code.get(code, 0) + hist.count
                merge(merged, hist)
            total = sum(by_code.values())
            started.append(self._number(method.labels, total + max(0, method.in_flight), now))
            for code, count in sorted(by_code.items()):
                handled.append(
                    self._number({**method.labels, **self.names.status_labels(code)}, count, now)
                )
            if merged.count:
                durations.append(self._point(method.labels, merged, now))
        out = [self._counter(*self.names.started(side), started)]
        if handled:
            out.append(self._counter(*self.names.handled(side), handled))
        if durations:
            out.append(self._histogram(*self.names.duration(side), durations))
        return out

    def _point(self, labels: dict[str, Any], hist: BucketHistogram, now: int) -> HistogramDataPoint:
        exemplars = [
            Exemplar({}, value, at, span_id, trace_id)
            for value, trace_id, span_id, at in filter(None, hist.exemplars)
        ]
        return HistogramDataPoint(
            attributes=labels,
            start_time_unix_nano=self.start_ns,
            time_unix_nano=now,
            count=hist.count,
            sum=hist.sum,
            bucket_counts=hist.counts,
            explicit_bounds=self.bounds,
            min=hist.min,
            max=hist.max,
            exemplars=exemplars,
        )

    def _number(self, labels: dict[str, Any], value: int, now: int) -> NumberDataPoint:
        return NumberDataPoint(labels, self.start_ns, now, value)

    @staticmethod
    def _histogram(name: str, description: str, points: list[HistogramDataPoint]) -> Metric:
        data = Histogram(points, AggregationTemporality.CUMULATIVE)
        return Metric(name=name, description=description, unit="s", data=data)

    @staticmethod
    def _counter(name: str, description: str, points: list[NumberDataPoint]) -> Metric:
        data = Sum(points, AggregationTemporality.CUMULATIVE, is_monotonic=True)
        return Metric(name=name, description=description, unit="", data=data)

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
        if store is not None and not isinstance(store, RpcMetrics):
            raise TypeError(
                "MetricsPolicy(store) must be an RpcMetrics (telemetry.rpc_metrics, or use "
                f"telemetry.policies()), got {type(store).__name__}"
            )
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


def _current_span_context() -> SpanContext:
    """The current span's context (INVALID when none): one lookup in the current Context."""
    span = current_context().get(SPAN_KEY)
    if span is None:
        return INVALID_SPAN_CONTEXT
    return span.get_span_context()  # type: ignore[attr-defined, no-any-return]


class _MetricsEnter:
    __slots__ = ("client", "exemplars", "method", "server", "store")

    def __init__(self, store: RpcMetrics, method: Method) -> None:
        self.store = store
        self.method = method
        self.exemplars = store.exemplars
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
        if not self.exemplars:

            def exit_plain(error: BaseException | None) -> None:
                finished(error, time.perf_counter() - started)

            return exit_plain

        def exit_(error: BaseException | None) -> None:
            duration = time.perf_counter() - started
            context = _current_span_context()  # the call's span: tracing is outer
            if context.trace_flags & 1:
                finished(error, duration, context.trace_id, context.span_id)
            else:
                finished(error, duration)

        return exit_

    def _stats(self, side: Side) -> MethodStats:
        stats = self.store.stats(side, self.method)
        if side is Side.SERVER:
            self.server = stats
        else:
            self.client = stats
        return stats
