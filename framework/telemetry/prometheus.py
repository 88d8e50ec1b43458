"""A Prometheus `/metrics` endpoint per process (optional dependency: prometheus-client).

    endpoint = MetricsEndpoint(telemetry.metric_reader, host="127.0.0.1", port=9464)
    endpoint.start()          # or server.add_hook(endpoint): started/stopped with the server
    ...
    endpoint.close()

The endpoint renders, on each scrape, what an OpenTelemetry pull reader
collects (`framework.telemetry.metrics.StoreReader`, whose data includes the RPC duration
histograms) in the Prometheus text format, through a private
`prometheus_client.CollectorRegistry`: nothing is registered in
prometheus-client's global registry, so several endpoints (tests) can live in
one process.  Names follow the OpenTelemetry-to-Prometheus rules: dots become
underscores, the unit is appended (`rpc.server.call.duration` in s becomes
`rpc_server_call_duration_seconds`), counters end in `_total`, and the resource
becomes a `target_info` metric.  Duration buckets carry exemplars (the trace and
span of the latest sampled call in each bucket) in the OpenMetrics format, which
the endpoint serves when the scraper asks for it (`Accept:
application/openmetrics-text`, as Prometheus does with exemplar storage on); the
classic text format has no exemplars.  Binds 127.0.0.1 by default; port 0 picks a
free port (see `.port`).
"""

from __future__ import annotations

import logging
import re
import threading
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Any, Protocol
from wsgiref.simple_server import WSGIServer

from opentelemetry.sdk.metrics.export import Gauge, Histogram, MetricsData, Sum
from prometheus_client import start_wsgi_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Exemplar

_UNITS = {
    "ms": "milliseconds",
    "s": "seconds",
    "us": "microseconds",
    "ns": "nanoseconds",
    "By": "bytes",
    "1": "ratio",
}
_INVALID_NAME = re.compile(r"[^a-zA-Z0-9_:]")
_INVALID_LABEL = re.compile(r"[^a-zA-Z0-9_]")


logger = logging.getLogger(__name__)


class PullReader(Protocol):
    def get_metrics_data(self) -> MetricsData | None: ...


def metric_name(name: str, unit: str | None) -> str:
    """The Prometheus name of an OpenTelemetry metric (without the counter's `_total`)."""
    base = _INVALID_NAME.sub("_", name)
    suffix = _UNITS.get(unit or "", "")
    if not suffix and unit and not unit.startswith("{"):
        suffix = _INVALID_NAME.sub("_", unit)
    if suffix and not base.endswith(suffix):
        base = f"{base}_{suffix}"
    return base


def label_name(key: str) -> str:
    return _INVALID_LABEL.sub("_", key)


class OtelCollector(Collector):
    """A prometheus-client collector reading an OpenTelemetry pull reader on each scrape."""

    def __init__(self, reader: PullReader) -> None:
        self.reader = reader
        self._lock = threading.Lock()  # scrapes may arrive on several threads

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            data = self.reader.get_metrics_data()
        if data is None:
            return
        for resource_metrics in data.resource_metrics:
            attrs = dict(resource_metrics.resource.attributes)
            if attrs:
                info = GaugeMetricFamily(
                    "target_info", "Target metadata", labels=[label_name(k) for k in attrs]
                )
                info.add_metric([str(v) for v in attrs.values()], 1)
                yield info
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    family = _family(metric)
                    if family is not None:
                        yield family


def _keys(points: Sequence[Any]) -> list[str]:
    keys: dict[str, None] = {}
    for point in points:
        keys.update(dict.fromkeys(point.attributes or {}))
    return list(keys)


def _values(point: Any, keys: list[str]) -> list[str]:
    attributes = point.attributes or {}
    return [str(attributes.get(k, "")) for k in keys]


def _family(metric: Any) -> Metric | None:
    name = metric.name
    doc = metric.description or name
    prom = metric_name(name, metric.unit)
    data = metric.data
    points = list(data.data_points)
    keys = _keys(points)
    labels = [label_name(k) for k in keys]
    if isinstance(data, Histogram):
        hist = HistogramMetricFamily(prom, doc, labels=labels)
        for p in points:
            exemplars = _exemplars(p)
            cumulative, buckets = 0, []
            bounds = [*(_float_text(b) for b in p.explicit_bounds), "+Inf"]
            for i, (bound, count) in enumerate(zip(bounds, p.bucket_counts, strict=False)):
                cumulative += count
                exemplar = exemplars.get(i)
                buckets.append((bound, cumulative, exemplar) if exemplar else (bound, cumulative))
            hist.add_metric(_values(p, keys), buckets, p.sum)
        return hist
    if isinstance(data, Sum) and data.is_monotonic:
        counter = CounterMetricFamily(prom.removesuffix("_total"), doc, labels=labels)
        for p in points:
            counter.add_metric(_values(p, keys), p.value)
        return counter
    if isinstance(data, Sum | Gauge):
        gauge = GaugeMetricFamily(prom, doc, labels=labels)
        for p in points:
            gauge.add_metric(_values(p, keys), p.value)
        return gauge
    return None  # exponential histograms: not rendered


def _exemplars(point: Any) -> dict[int, Exemplar]:
    """The point's exemplars by bucket index, as OpenMetrics exemplars (trace and span ids)."""
    out: dict[int, Exemplar] = {}
    for exemplar in getattr(point, "exemplars", None) or ():
        if not exemplar.trace_id:
            continue
        labels = {"trace_id": f"{exemplar.trace_id:032x}", "span_id": f"{exemplar.span_id:016x}"}
        index = bisect_left(point.explicit_bounds, exemplar.value)
        out[index] = Exemplar(labels, exemplar.value, exemplar.time_unix_nano / 1e9)
    return out


def _float_text(value: float) -> str:
    return repr(float(value))


class MetricsEndpoint:
    """HTTP `/metrics` for one process; also a server hook (started and stopped with it)."""

    def __init__(self, reader: PullReader, *, host: str = "127.0.0.1", port: int = 9464) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be 0..65535, got {port}")
        self.host = host
        self.requested_port = port
        self.reader = reader
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(OtelCollector(reader))
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the metrics endpoint is not started; call start() first")
        return int(self._server.server_port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def start(self) -> int:
        """Serve on a daemon thread; returns the bound port."""
        if self._server is None:
            self._server, self._thread = start_wsgi_server(
                self.requested_port, self.host, self.registry
            )
            logger.info("metrics on %s", self.url, extra={"metrics_url": self.url})
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._server = self._thread = None

    async def on_started(self, server: object) -> None:
        self.start()

    async def on_stopped(self, server: object) -> None:
        self.close()

    # worker processes (framework.workers): each worker serves its own series on an
    # ephemeral loopback port; the supervisor serves this endpoint's address for them all
    def for_worker(self, slot: Any) -> MetricsEndpoint:
        return _WorkerEndpoint(self.reader, slot)

    def for_supervisor(self, supervisor: object) -> object:
        from framework.workers.metrics import WorkersMetricsEndpoint

        return WorkersMetricsEndpoint(supervisor, host=self.host, port=self.requested_port)


class _WorkerEndpoint(MetricsEndpoint):
    """A worker's own endpoint (127.0.0.1, port 0); tells the supervisor its URL."""

    def __init__(self, reader: PullReader, slot: Any) -> None:
        super().__init__(reader, host="127.0.0.1", port=0)
        self.slot = slot

    async def on_started(self, server: object) -> None:
        self.start()
        self.slot.notes["metrics_url"] = self.url
