"""Per-method RPC measurements: small histograms with exemplars, updated per call.

`MethodStats` holds what `framework.telemetry.metrics.RpcMetrics` publishes for one
method on one side: calls in flight, and one histogram per outcome (the successful
one in a slot of its own, failures by status code and typed reason), each bucket
remembering the trace and span of its latest sampled call.  A call costs a `bisect`,
a lock and a few additions.
"""

from __future__ import annotations

import asyncio
import threading
import time
from bisect import bisect_left
from typing import Any

import grpc

from framework.errors import code_of
from framework.policy import Method

# Seconds.  The conventions' recommended boundaries, with sub-millisecond ones
# below them: in-process and same-host RPCs finish well under 5 ms.
DEFAULT_BOUNDS_S: tuple[float, ...] = (
    0.00025, 0.0005, 0.001, 0.0025,
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10,
)  # fmt: skip
OK_CODE = grpc.StatusCode.OK.value[0]
# (value in seconds, trace id, span id, time in ns) of the latest sampled call in a bucket
BucketExemplar = tuple[float, int, int, int]


def outcome_code(error: BaseException) -> grpc.StatusCode:
    """The status a failed call ends with; a cancelled task is CANCELLED."""
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return code_of(error)


class BucketHistogram:
    __slots__ = ("count", "counts", "exemplars", "max", "min", "sum")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets
        self.exemplars: list[BucketExemplar | None] = [None] * buckets
        self.count = 0
        self.sum = 0.0
        self.min = float("inf")
        self.max = float("-inf")


class MethodStats:
    """Measurements of one method on one side. Updated under a lock (sync servers use threads)."""

    __slots__ = ("bounds", "failed", "in_flight", "labels", "lock", "method", "ok", "seen")

    def __init__(self, method: Method, labels: dict[str, Any], bounds: tuple[float, ...]) -> None:
        self.method = method
        self.labels = labels
        self.bounds = bounds
        self.ok: BucketHistogram | None = None
        self.failed: dict[tuple[int, str], BucketHistogram] = {}  # (code, reason) -> histogram
        self.in_flight = 0
        self.seen = False
        self.lock = threading.Lock()

    def started(self) -> None:
        with self.lock:
            self.in_flight += 1
            self.seen = True

    def finished(
        self, error: BaseException | None, duration_s: float, trace_id: int = 0, span_id: int = 0
    ) -> None:
        key: tuple[int, str] | None = None
        if error is not None:
            code = outcome_code(error)
            key = (code.value[0], getattr(error, "reason", None) or code.name)
        bucket = bisect_left(self.bounds, duration_s)
        with self.lock:
            self.in_flight -= 1
            if key is None:
                hist = self.ok
                if hist is None:
                    hist = self.ok = BucketHistogram(len(self.bounds) + 1)
            else:
                hist = self.failed.get(key)
                if hist is None:
                    hist = self.failed[key] = BucketHistogram(len(self.bounds) + 1)
            hist.counts[bucket] += 1
            hist.count += 1
            hist.sum += duration_s
            if duration_s < hist.min:
                hist.min = duration_s
            if duration_s > hist.max:
                hist.max = duration_s
            if trace_id:
                hist.exemplars[bucket] = (duration_s, trace_id, span_id, time.time_ns())

    def snapshot(self) -> list[tuple[int, str | None, BucketHistogram]]:
        """(code, reason or None, a copy of the histogram) for each outcome seen."""
        out: list[tuple[int, str | None, BucketHistogram]] = []
        with self.lock:
            items: list[tuple[int, str | None, BucketHistogram]] = []
            if self.ok is not None:
                items.append((OK_CODE, None, self.ok))
            items.extend((code, reason, h) for (code, reason), h in self.failed.items())
            for code, reason, hist in items:
                copy = BucketHistogram(0)
                copy.counts, copy.exemplars = list(hist.counts), list(hist.exemplars)
                copy.count, copy.sum, copy.min, copy.max = hist.count, hist.sum, hist.min, hist.max
                out.append((code, reason, copy))
        return out


def merge(total: BucketHistogram, hist: BucketHistogram) -> None:
    """Merge `hist` into `total` (the latest exemplar per bucket wins)."""
    for i, count in enumerate(hist.counts):
        total.counts[i] += count
        mine, theirs = total.exemplars[i], hist.exemplars[i]
        if theirs is not None and (mine is None or theirs[3] > mine[3]):
            total.exemplars[i] = theirs
    total.count += hist.count
    total.sum += hist.sum
    total.min = min(total.min, hist.min)
    total.max = max(total.max, hist.max)
