"""Outlier detection for the balanced client, after Envoy's.

Every call's outcome is recorded on its instance (`Endpoint`).  Failures are
the codes that say "this instance is in trouble": UNAVAILABLE,
DEADLINE_EXCEEDED (a slow instance is as bad as a dead one) and
RESOURCE_EXHAUSTED; any other outcome, application errors included, shows the
instance answering, and so does one of those codes that the instance passed on from
its own dependency (`framework.errors.from_dependency`: the balanced calls record it
as a success).  An instance is ejected (gets no traffic):

* at once after `consecutive_failures` failures in a row;
* at the end of an `interval_s`, when its success rate is below the mean of the
  fleet's by more than `success_rate_stdev_factor` standard deviations (needs
  `success_rate_min_hosts` instances with `success_rate_request_volume` calls
  in the interval), or when its failure share is at least
  `failure_percentage_threshold` (`failure_percentage_min_hosts` instances with
  `failure_percentage_request_volume` calls): the rule that works for small fleets.

At most `max_ejection_percent` of the instances are out at once (at least one
may always be), so a fleet-wide problem never empties the pool.  The n-th
ejection of an instance lasts n x `ejection_s` (at most `max_ejection_s`); each
interval an instance stays in lowers n by one.  When its time is up it comes
back only after `return_after_probes` grpc.health.v1 checks in a row succeed
on its channel, which is kept open while it is out (no reconnect storm).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from framework.clock import Clock
from framework.errors import FrameworkError

logger = logging.getLogger(__name__)

FAILURE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """When an instance is ejected, for how long, and what brings it back."""

    consecutive_failures: int = 5
    failure_codes: frozenset[grpc.StatusCode] = field(default=FAILURE_CODES)
    # Success-rate and failure-percentage ejection are evaluated once per interval.
    interval_s: float = 10.0
    success_rate_min_hosts: int = 5
    success_rate_request_volume: int = 100
    success_rate_stdev_factor: float = 1.9
    # 0 turns failure-percentage ejection off.
    failure_percentage_threshold: float = 0.85
    failure_percentage_min_hosts: int = 2
    failure_percentage_request_volume: int = 50
    # The n-th ejection lasts n x ejection_s, at most max_ejection_s.
    ejection_s: float = 30.0
    max_ejection_s: float = 300.0
    max_ejection_percent: float = 50.0
    # Successful health checks in a row before an ejected instance takes traffic again
    # (0: it returns as soon as its ejection time is up).
    return_after_probes: int = 3
    probe_interval_s: float = 1.0
    probe_timeout_s: float = 1.0

    def __post_init__(self) -> None:
        for name in (
            "consecutive_failures",
            "success_rate_min_hosts",
            "success_rate_request_volume",
            "failure_percentage_min_hosts",
            "failure_percentage_request_volume",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("interval_s", "probe_interval_s", "probe_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.ejection_s < 0:
            raise ValueError(f"ejection_s must be >= 0, got {self.ejection_s}")
        if self.max_ejection_s < self.ejection_s:
            raise ValueError(
                f"max_ejection_s ({self.max_ejection_s}) must be >= ejection_s ({self.ejection_s})"
            )
        if not 0 <= self.max_ejection_percent <= 100:
            raise ValueError(
                f"max_ejection_percent must be in [0, 100], got {self.max_ejection_percent}"
            )
        if not 0 <= self.failure_percentage_threshold <= 1:
            raise ValueError(
                "failure_percentage_threshold is a fraction in [0, 1], got "
                f"{self.failure_percentage_threshold}"
            )
        if self.success_rate_stdev_factor <= 0:
            raise ValueError(
                f"success_rate_stdev_factor must be > 0, got {self.success_rate_stdev_factor}"
            )
        if self.return_after_probes < 0:
            raise ValueError(f"return_after_probes must be >= 0, got {self.return_after_probes}")


class OutlierState:
    """One instance's record: failures in a row, this interval's counts, ejection."""

    __slots__ = (
        "consecutive",
        "ejected",
        "ejected_until",
        "ejections",
        "failed",
        "probe_successes",
        "succeeded",
    )

    def __init__(self) -> None:
        self.consecutive = 0
        self.succeeded = 0
        self.failed = 0
        self.ejected = False
        self.ejected_until = 0.0
        self.ejections = 0
        self.probe_successes = 0


class Tracked(Protocol):
    """What the detector needs of an endpoint (balancer.Endpoint)."""

    @property
    def address(self) -> str: ...

    @property
    def channel(self) -> Any: ...

    @property
    def outlier(self) -> OutlierState: ...


Probe = Callable[[Tracked, float], Awaitable[bool]]


async def health_probe(endpoint: Tracked, timeout_s: float) -> bool:
    """One grpc.health.v1 Check over the endpoint's own channel (the policy chain skipped).

    SERVING, or UNIMPLEMENTED (a server without the health service answered in time),
    is a success.
    """
    channel = getattr(endpoint.channel, "raw", endpoint.channel)
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
        )
    except grpc.aio.AioRpcError as error:
        return error.code() is grpc.StatusCode.UNIMPLEMENTED
    except FrameworkError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


class OutlierDetector:
    """Records outcomes, ejects outliers, probes ejected instances back in."""

    def __init__(
        self,
        config: OutlierConfig,
        clock: Clock,
        probe: Probe = health_probe,
    ) -> None:
        self.config = config
        self.clock = clock
        self._probe = probe
        self._endpoints: Sequence[Tracked] = ()
        self._interval_started = clock.monotonic()

    def track(self, endpoints: Sequence[Tracked]) -> None:
        """The instances currently in the pool (those that left keep their record)."""
        self._endpoints = tuple(endpoints)

    @property
    def ejected(self) -> list[Tracked]:
        return [e for e in self._endpoints if e.outlier.ejected]

    # ------------------------------------------------------------- per call
    def observe(self, endpoint: Tracked, code: grpc.StatusCode) -> None:
        """Record one call's outcome (sync, no I/O; on every call)."""
        state = endpoint.outlier
        if code not in self.config.failure_codes:
            state.consecutive = 0
            if not state.ejected:
                state.succeeded += 1
            return
        if state.ejected:
            return  # picked only because every candidate was out; it is being probed
        state.failed += 1
        state.consecutive += 1
        if state.consecutive >= self.config.consecutive_failures:
            self._eject(endpoint, f"{state.consecutive} failures in a row (last {code.name})")

    # ------------------------------------------------------------- ejection
    def _room(self) -> bool:
        """Whether one more instance may be ejected under max_ejection_percent."""
        total = len(self._endpoints)
        allowed = max(1, math.floor(total * self.config.max_ejection_percent / 100))
        return sum(1 for e in self._endpoints if e.outlier.ejected) < allowed

    def _eject(self, endpoint: Tracked, why: str) -> bool:
        state = endpoint.outlier
        if state.ejected or not self._room():
            return False
        state.ejections += 1
        duration = min(self.config.ejection_s * state.ejections, self.config.max_ejection_s)
        state.ejected = True
        state.ejected_until = self.clock.monotonic() + duration
        state.consecutive = 0
        state.probe_successes = 0
        logger.warning(
            "ejecting %s for %.1fs (ejection %d): %s",
            endpoint.address,
            duration,
            state.ejections,
            why,
        )
        return True

    def _return(self, endpoint: Tracked) -> None:
        state = endpoint.outlier
        state.ejected = False
        state.probe_successes = 0
        state.consecutive = 0
        state.succeeded = state.failed = 0
        logger.info("%s takes traffic again after its ejection", endpoint.address)

    # ------------------------------------------------------------- interval
    def evaluate(self) -> list[Tracked]:
        """End of an interval: success-rate and failure-percentage ejection; the ejected."""
        cfg = self.config
        live = [e for e in self._endpoints if not e.outlier.ejected]
        ejected: list[Tracked] = []
        volume = {id(e): e.outlier.succeeded + e.outlier.failed for e in live}

        def rate(e: Tracked) -> float:
            return e.outlier.succeeded / volume[id(e)]

        rated = [e for e in live if volume[id(e)] >= cfg.success_rate_request_volume]
        if len(rated) >= cfg.success_rate_min_hosts:
            rates = [rate(e) for e in rated]
            mean = sum(rates) / len(rates)
            stdev = math.sqrt(sum((r - mean) ** 2 for r in rates) / len(rates))
            floor = mean - cfg.success_rate_stdev_factor * stdev
            for e in sorted(rated, key=rate):
                if rate(e) < floor and self._eject(
                    e,
                    f"success rate {rate(e):.0%} below the fleet's {mean:.0%} - "
                    f"{cfg.success_rate_stdev_factor} x {stdev:.0%}",
                ):
                    ejected.append(e)
        if cfg.failure_percentage_threshold > 0:
            rated = [
                e
                for e in live
                if volume[id(e)] >= cfg.failure_percentage_request_volume and not e.outlier.ejected
            ]
            if len(rated) >= cfg.failure_percentage_min_hosts:
                for e in sorted(rated, key=rate):
                    share = 1 - rate(e)
                    if share >= cfg.failure_percentage_threshold and self._eject(
                        e, f"{share:.0%} of its calls failed in the last interval"
                    ):
                        ejected.append(e)
        for e in self._endpoints:
            state = e.outlier
            state.succeeded = state.failed = 0
            if not state.ejected and state.ejections > 0:
                state.ejections -= 1  # a good interval shortens the next ejection
        return ejected

    async def probe_due(self) -> None:
        """Probe every instance whose ejection time is up; return it after enough successes."""
        now = self.clock.monotonic()
        due = [e for e in self._endpoints if e.outlier.ejected and e.outlier.ejected_until <= now]
        if self.config.return_after_probes == 0:
            for endpoint in due:
                self._return(endpoint)
            return
        results = await asyncio.gather(*(self._probe(e, self.config.probe_timeout_s) for e in due))
        for endpoint, ok in zip(due, results, strict=True):
            state = endpoint.outlier
            if not ok:
                state.probe_successes = 0
                continue
            state.probe_successes += 1
            if state.probe_successes >= self.config.return_after_probes:
                self._return(endpoint)

    async def run(self) -> None:
        """Background loop: interval evaluation and probes of ejected instances."""
        tick = min(self.config.interval_s, self.config.probe_interval_s)
        while True:
            await self.clock.sleep(tick)
            if self.clock.monotonic() - self._interval_started >= self.config.interval_s:
                self._interval_started = self.clock.monotonic()
                self.evaluate()
            await self.probe_due()
