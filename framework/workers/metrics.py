"""One `/metrics` for all the workers of a server (optional dependency: prometheus-client).

Each worker serves its own series on an ephemeral port on 127.0.0.1 (the
`MetricsEndpoint` it was given, moved there by `for_worker`) and reports that URL to the
supervisor. The supervisor serves the configured host and port; on each scrape it reads
every serving worker's endpoint and returns their series together, each sample labelled
`worker="<index>"` (sum over `worker` in PromQL for the server's totals), with two series
of its own: `framework_workers` (workers serving now) and
`framework_worker_restarts_total`. A worker that does not answer within
`worker_timeout_s` is left out of that scrape and logged. Exemplars are not carried over
(the classic text format has none).
"""

from __future__ import annotations

import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_wsgi_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = ["WorkersCollector", "WorkersMetricsEndpoint"]

logger = logging.getLogger(__name__)


class WorkersCollector(Collector):
    """Collects every worker's series, labelled by worker, on each scrape."""

    def __init__(
        self,
        urls: Callable[[], list[tuple[int, str]]],
        restarts: Callable[[], int],
        *,
        worker_timeout_s: float = 2.0,
    ) -> None:
        self.urls = urls
        self.restarts = restarts
        self.worker_timeout_s = worker_timeout_s

    def collect(self) -> Iterator[Metric]:
        urls = self.urls()
        families: dict[str, Metric] = {}
        for index, url in urls:
            try:
                with urllib.request.urlopen(url, timeout=self.worker_timeout_s) as reply:
                    text = reply.read().decode()
            except (OSError, urllib.error.URLError) as error:
                logger.warning("metrics of worker %d (%s) not read: %s", index, url, error)
                continue
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                for sample in family.samples:
                    merged.add_sample(
                        sample.name, {**sample.labels, "worker": str(index)}, sample.value
                    )
        yield from families.values()
        serving = GaugeMetricFamily("framework_workers", "Worker processes serving now")
        serving.add_metric([], float(len(urls)))
        yield serving
        restarts = CounterMetricFamily(
            "framework_worker_restarts", "Worker processes restarted after they exited"
        )
        restarts.add_metric([], float(self.restarts()))
        yield restarts


class WorkersMetricsEndpoint:
    """The supervisor's `/metrics`: every worker's series in one scrape; a supervisor hook."""

    def __init__(self, supervisor: object, *, host: str = "127.0.0.1", port: int = 9464) -> None:
        self.host = host
        self.requested_port = port
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(
            WorkersCollector(
                getattr(supervisor, "metrics_urls"),  # noqa: B009 (duck-typed supervisor)
                lambda: int(getattr(supervisor, "restarts")),  # noqa: B009
            )
        )
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the metrics endpoint is not started")
        return int(self._server.server_port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    async def on_started(self, supervisor: object) -> None:
        if self._server is None:
            self._server, self._thread = start_wsgi_server(
                self.requested_port, self.host, self.registry
            )
            logger.info("metrics of every worker on %s", self.url, extra={"metrics_url": self.url})

    async def on_stopped(self, supervisor: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._server = self._thread = None
