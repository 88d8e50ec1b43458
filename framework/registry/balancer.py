"""Per-request instance choice: balancers, version routing and outlier ejection.

grpcio exposes no custom load-balancing API in Python (grpc/grpc#11685), so the
balanced channel keeps one channel per instance and asks a `Pool` for an
instance on every call.

* Version routing: when the service has version weights (canary, blue/green),
  a version is drawn first with probability weight / sum of the weights of the
  versions that have instances; the balancer then picks inside that version.
  Versions without weight get no traffic.
* Balancers: `RoundRobin`, `LeastOutstanding` (power of two choices on
  in-flight calls) and `WeightedRandom` (instance weight, so an instance's share
  is version weight x its weight within the version). Instances of weight 0
  never get traffic.
* Outlier detection: `consecutive_failures` UNAVAILABLE outcomes in a row eject
  an instance for `ejection_s`; if every candidate is ejected they are used
  anyway (a guess beats certain failure).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from framework.clock import Clock
from framework.registry.model import Instance, ServiceView

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """Eject an instance after `consecutive_failures` UNAVAILABLE results, for `ejection_s`."""

    consecutive_failures: int = 3
    ejection_s: float = 10.0

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1:
            raise ValueError(f"consecutive_failures must be >= 1, got {self.consecutive_failures}")
        if self.ejection_s < 0:
            raise ValueError(f"ejection_s must be >= 0, got {self.ejection_s}")


class Endpoint:
    """One instance as the client sees it: its channel, load and failure record."""

    __slots__ = (
        "_callables",
        "address",
        "channel",
        "ejected_until",
        "failures",
        "instance",
        "outstanding",
    )

    def __init__(self, instance: Instance, channel: Any) -> None:
        self.instance = instance
        self.address = instance.address
        self.channel = channel
        self.outstanding = 0
        self.failures = 0
        self.ejected_until = 0.0
        self._callables: dict[tuple[str, str], Any] = {}

    def callable(self, kind: str, method: str, serializer: Any, deserializer: Any) -> Any:
        """The channel's multicallable for `method` (created once per kind and method)."""
        key = (kind, method)
        found = self._callables.get(key)
        if found is None:
            factory: Callable[..., Any] = getattr(self.channel, kind)
            found = self._callables[key] = factory(
                method, request_serializer=serializer, response_deserializer=deserializer
            )
        return found

    def __repr__(self) -> str:
        return f"Endpoint({self.address}, outstanding={self.outstanding})"


def _usable(
    endpoints: Sequence[Endpoint], now: float, exclude: Collection[Endpoint]
) -> list[Endpoint]:
    """Candidates that take traffic: not excluded, weight > 0, not ejected (unless all are)."""
    allowed = [e for e in endpoints if e.instance.weight > 0 and e not in exclude]
    healthy = [e for e in allowed if e.ejected_until <= now]
    return healthy or allowed


class Picker(Protocol):
    def pick(self, now: float, exclude: Collection[Endpoint]) -> Endpoint | None: ...


class Balancer(Protocol):
    """Builds a picker for a set of endpoints (rebuilt whenever the set changes)."""

    def build(self, endpoints: Sequence[Endpoint], rng: random.Random) -> Picker: ...


class _RoundRobinPicker:
    __slots__ = ("_endpoints", "_next")

    def __init__(self, endpoints: Sequence[Endpoint], start: int) -> None:
        self._endpoints = tuple(endpoints)
        self._next = start

    def pick(self, now: float, exclude: Collection[Endpoint]) -> Endpoint | None:
        endpoints = self._endpoints
        n = len(endpoints)
        for offset in range(n):  # the fast path: the next one is usable
            e = endpoints[(self._next + offset) % n]
            if e.instance.weight > 0 and e.ejected_until <= now and e not in exclude:
                self._next = (self._next + offset + 1) % n
                return e
        candidates = _usable(endpoints, now, exclude)
        if not candidates:
            return None
        self._next += 1
        return candidates[self._next % len(candidates)]


class RoundRobin:
    """Each instance in turn (instance weights other than 0 are ignored)."""

    def build(self, endpoints: Sequence[Endpoint], rng: random.Random) -> Picker:
        return _RoundRobinPicker(endpoints, rng.randrange(len(endpoints)) if endpoints else 0)


class _LeastOutstandingPicker:
    __slots__ = ("_endpoints", "_rng")

    def __init__(self, endpoints: Sequence[Endpoint], rng: random.Random) -> None:
        self._endpoints = tuple(endpoints)
        self._rng = rng

    def pick(self, now: float, exclude: Collection[Endpoint]) -> Endpoint | None:
        candidates = _usable(self._endpoints, now, exclude)
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        a, b = self._rng.sample(candidates, 2)
        return a if a.outstanding <= b.outstanding else b


class LeastOutstanding:
    """Power of two choices: of two random instances, the one with fewer calls in flight."""

    def build(self, endpoints: Sequence[Endpoint], rng: random.Random) -> Picker:
        return _LeastOutstandingPicker(endpoints, rng)


class _WeightedPicker:
    __slots__ = ("_endpoints", "_rng")

    def __init__(self, endpoints: Sequence[Endpoint], rng: random.Random) -> None:
        self._endpoints = tuple(endpoints)
        self._rng = rng

    def pick(self, now: float, exclude: Collection[Endpoint]) -> Endpoint | None:
        candidates = _usable(self._endpoints, now, exclude)
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        weights = [e.instance.weight for e in candidates]
        return self._rng.choices(candidates, weights=weights)[0]


class WeightedRandom:
    """Random choice in proportion to instance weight."""

    def build(self, endpoints: Sequence[Endpoint], rng: random.Random) -> Picker:
        return _WeightedPicker(endpoints, rng)


class Pool:
    """The endpoints of one service view, grouped by version weight, ready to pick from."""

    def __init__(
        self, balancer: Balancer, outlier: OutlierConfig, clock: Clock, rng: random.Random
    ) -> None:
        self.balancer = balancer
        self.outlier = outlier
        self.clock = clock
        self.rng = rng
        self._groups: list[tuple[str, int, Picker]] = []
        self._weights: list[int] = []
        self.version_weights: dict[str, int] = {}

    def rebuild(self, view: ServiceView, endpoints: Sequence[Endpoint]) -> None:
        self.version_weights = dict(view.version_weights)
        if not view.version_weights:
            self._groups = [("", 1, self.balancer.build(endpoints, self.rng))] if endpoints else []
        else:
            groups = []
            for version, weight in sorted(view.version_weights.items()):
                members = [e for e in endpoints if e.instance.version == version]
                if weight > 0 and members:
                    groups.append((version, weight, self.balancer.build(members, self.rng)))
            self._groups = groups
        self._weights = [w for _, w, _ in self._groups]

    def pick(self, exclude: Collection[Endpoint] = ()) -> Endpoint | None:
        """An instance for one call, or None when none can take it."""
        now = self.clock.monotonic()
        groups = self._groups
        if len(groups) == 1:
            return groups[0][2].pick(now, exclude)
        if not groups:
            return None
        first = self.rng.choices(range(len(groups)), weights=self._weights)[0]
        chosen = groups[first][2].pick(now, exclude)
        if chosen is not None:
            return chosen
        for index, (_, _, picker) in enumerate(groups):  # the drawn version is exhausted
            if index != first and (chosen := picker.pick(now, exclude)) is not None:
                return chosen
        return None

    def observe(self, endpoint: Endpoint, code: grpc.StatusCode) -> None:
        """Record a call's outcome for outlier detection."""
        if code is not grpc.StatusCode.UNAVAILABLE:
            endpoint.failures = 0
            return
        endpoint.failures += 1
        if endpoint.failures >= self.outlier.consecutive_failures:
            endpoint.failures = 0
            endpoint.ejected_until = self.clock.monotonic() + self.outlier.ejection_s
            logger.warning(
                "ejecting %s for %.1fs after %d UNAVAILABLE calls in a row",
                endpoint.address,
                self.outlier.ejection_s,
                self.outlier.consecutive_failures,
            )
