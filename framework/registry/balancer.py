"""Per-request instance choice: balancers, version routing and outlier ejection.

grpcio exposes no custom load-balancing API in Python (grpc/grpc#11685), so the
balanced channel keeps one channel per instance and asks a `Pool` for an
instance on every call.

* Version routing: when the service has version weights (canary, blue/green),
  a version is drawn first with probability weight / sum of the weights of the
  versions that have instances; the balancer then picks inside that version.
  Versions without weight get no traffic.
* Balancers: `LeastOutstanding` (the default: power of two choices on calls in
  flight, so a slow instance that piles up calls gets fewer new ones),
  `RoundRobin` and `WeightedRandom` (instance weight, so an instance's share
  is version weight x its weight within the version). Instances of weight 0
  never get traffic.
* Outlier detection (outlier.py): ejected instances get no traffic; if every
  candidate is ejected they are used anyway (a guess beats certain failure).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Collection, Sequence
from typing import Any, Protocol

import grpc

from framework.clock import Clock
from framework.registry.model import Instance, ServiceView
from framework.registry.outlier import OutlierConfig, OutlierDetector, OutlierState, Probe

logger = logging.getLogger(__name__)

__all__ = ["OutlierConfig"]


class Endpoint:
    """One instance as the client sees it: its channel, load and outlier record."""

    __slots__ = ("_callables", "address", "channel", "instance", "outlier", "outstanding")

    def __init__(self, instance: Instance, channel: Any) -> None:
        self.instance = instance
        self.address = instance.address
        self.channel = channel
        self.outstanding = 0
        self.outlier = OutlierState()
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

    @property
    def takes_traffic(self) -> bool:
        """Weight above 0 and not ejected."""
        return self.instance.weight > 0 and not self.outlier.ejected

    def __repr__(self) -> str:
        return f"Endpoint({self.address}, outstanding={self.outstanding})"


def _usable(endpoints: Sequence[Endpoint], exclude: Collection[Endpoint]) -> list[Endpoint]:
    """Candidates that take traffic: not excluded, weight > 0, not ejected (unless all are)."""
    allowed = [e for e in endpoints if e.instance.weight > 0 and e not in exclude]
    healthy = [e for e in allowed if not e.outlier.ejected]
    return healthy or allowed


class Picker(Protocol):
    def pick(self, exclude: Collection[Endpoint]) -> Endpoint | None: ...


class Balancer(Protocol):
    """Builds a picker for a set of endpoints (rebuilt whenever the set changes)."""

    def build(self, endpoints: Sequence[Endpoint], rng: random.Random) -> Picker: ...


class _RoundRobinPicker:
    __slots__ = ("_endpoints", "_next")

    def __init__(self, endpoints: Sequence[Endpoint], start: int) -> None:
        self._endpoints = tuple(endpoints)
        self._next = start

    def pick(self, exclude: Collection[Endpoint]) -> Endpoint | None:
        endpoints = self._endpoints
        n = len(endpoints)
        for offset in range(n):  # the fast path: the next one is usable
            e = endpoints[(self._next + offset) % n]
            if e.takes_traffic and e not in exclude:
                self._next = (self._next + offset + 1) % n
                return e
        candidates = _usable(endpoints, exclude)
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

    def pick(self, exclude: Collection[Endpoint]) -> Endpoint | None:
        endpoints = self._endpoints
        n = len(endpoints)
        if n >= 2:  # the fast path: two distinct random instances, both usable
            i = int(self._rng.random() * n)
            j = int(self._rng.random() * (n - 1))
            a, b = endpoints[i], endpoints[j + 1 if j >= i else j]
            if a.takes_traffic and b.takes_traffic and a not in exclude and b not in exclude:
                return a if a.outstanding <= b.outstanding else b
        elif n == 1 and endpoints[0].takes_traffic and endpoints[0] not in exclude:
            return endpoints[0]
        candidates = _usable(endpoints, exclude)
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

    def pick(self, exclude: Collection[Endpoint]) -> Endpoint | None:
        candidates = _usable(self._endpoints, exclude)
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
        self,
        balancer: Balancer,
        outlier: OutlierConfig,
        clock: Clock,
        rng: random.Random,
        *,
        probe: Probe | None = None,
    ) -> None:
        self.balancer = balancer
        self.outlier = (
            OutlierDetector(outlier, clock)
            if probe is None
            else OutlierDetector(outlier, clock, probe)
        )
        self.clock = clock
        self.rng = rng
        self._groups: list[tuple[str, int, Picker]] = []
        self._weights: list[int] = []
        self.version_weights: dict[str, int] = {}

    def rebuild(self, view: ServiceView, endpoints: Sequence[Endpoint]) -> None:
        self.version_weights = dict(view.version_weights)
        self.outlier.track(endpoints)
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
        groups = self._groups
        if len(groups) == 1:
            return groups[0][2].pick(exclude)
        if not groups:
            return None
        first = self.rng.choices(range(len(groups)), weights=self._weights)[0]
        chosen = groups[first][2].pick(exclude)
        if chosen is not None:
            return chosen
        for index, (_, _, picker) in enumerate(groups):  # the drawn version is exhausted
            if index != first and (chosen := picker.pick(exclude)) is not None:
                return chosen
        return None

    def observe(self, endpoint: Endpoint, code: grpc.StatusCode) -> None:
        """Record a call's outcome for outlier detection."""
        self.outlier.observe(endpoint, code)
