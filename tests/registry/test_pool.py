"""Picking an instance per call: version routing, balancers, ejection (no network)."""

from __future__ import annotations

import random
from collections import Counter

import grpc
import pytest

from framework.clock import ManualClock
from framework.registry.balancer import (
    Endpoint,
    LeastOutstanding,
    OutlierConfig,
    Pool,
    RoundRobin,
    WeightedRandom,
)
from framework.registry.model import Instance, ServiceView


def _endpoints(*specs: tuple[str, str, int]) -> list[Endpoint]:
    return [
        Endpoint(Instance("s", address, f"l-{address}", 0.0, 10.0, version=v, weight=w), None)
        for address, v, w in specs
    ]


def _pool(balancer: object = None, clock: ManualClock | None = None) -> Pool:
    return Pool(
        balancer or RoundRobin(),  # type: ignore[arg-type]
        OutlierConfig(consecutive_failures=2, ejection_s=30),
        clock or ManualClock(),
        random.Random(1),
    )


def _count(pool: Pool, n: int) -> Counter[str]:
    picked = (pool.pick() for _ in range(n))
    return Counter(e.address for e in picked if e is not None)


def test_round_robin_takes_turns_and_skips_weight_zero() -> None:
    """Round robin visits each instance in turn; weight 0 gets nothing."""
    pool = _pool()
    eps = _endpoints(("a", "v1", 100), ("b", "v1", 100), ("c", "v1", 0))
    pool.rebuild(ServiceView("s", 1), eps)
    assert _count(pool, 100) == {"a": 50, "b": 50}


def test_version_weights_route_by_share_then_balance_inside() -> None:
    """v1:80 v2:20 sends about 20% to the single v2 instance even though v1 has three."""
    pool = _pool()
    eps = _endpoints(("a", "v1", 1), ("b", "v1", 1), ("c", "v1", 1), ("d", "v2", 1))
    pool.rebuild(ServiceView("s", 1, version_weights={"v1": 80, "v2": 20}), eps)
    counts = _count(pool, 5000)
    assert 0.18 <= counts["d"] / 5000 <= 0.22


def test_unlisted_versions_get_nothing_and_missing_versions_give_way() -> None:
    """With weights set, other versions get no traffic; a weighted version with no
    instances leaves its share to the others."""
    pool = _pool()
    eps = _endpoints(("a", "v1", 1), ("b", "v3", 1))
    pool.rebuild(ServiceView("s", 1, version_weights={"v1": 50, "v2": 50}), eps)
    assert _count(pool, 100) == {"a": 100}
    pool.rebuild(ServiceView("s", 2, version_weights={"v2": 100}), eps)
    assert pool.pick() is None


def test_weighted_random_follows_instance_weight() -> None:
    """Weights 3:1 give about 75%:25%."""
    pool = _pool(WeightedRandom())
    pool.rebuild(ServiceView("s", 1), _endpoints(("a", "", 300), ("b", "", 100)))
    assert 0.72 <= _count(pool, 4000)["a"] / 4000 <= 0.78


def test_least_outstanding_prefers_the_idle_instance() -> None:
    """Of two choices, the one with fewer calls in flight wins."""
    pool = _pool(LeastOutstanding())
    busy, idle = _endpoints(("busy", "", 1), ("idle", "", 1))
    busy.outstanding = 5
    pool.rebuild(ServiceView("s", 1), [busy, idle])
    assert _count(pool, 50) == {"idle": 50}


def test_failing_instance_is_ejected_for_a_while_then_returns() -> None:
    """Two UNAVAILABLE in a row eject for 30 s; success resets the count; all ejected = use all."""
    clock = ManualClock()
    pool = _pool(clock=clock)
    a, b = _endpoints(("a", "", 1), ("b", "", 1))
    pool.rebuild(ServiceView("s", 1), [a, b])
    pool.observe(a, grpc.StatusCode.UNAVAILABLE)
    pool.observe(a, grpc.StatusCode.OK)
    pool.observe(a, grpc.StatusCode.UNAVAILABLE)
    assert _count(pool, 10) == {"a": 5, "b": 5}
    pool.observe(a, grpc.StatusCode.UNAVAILABLE)
    assert _count(pool, 10) == {"b": 10}
    pool.observe(b, grpc.StatusCode.UNAVAILABLE)
    pool.observe(b, grpc.StatusCode.UNAVAILABLE)
    assert set(_count(pool, 10)) == {"a", "b"}  # both ejected: better a guess than nothing
    clock.advance(31)
    assert _count(pool, 10) == {"a": 5, "b": 5}


def test_excluded_instances_are_not_picked_again() -> None:
    """A retry excludes the instances already tried; none left gives None."""
    pool = _pool()
    a, b = _endpoints(("a", "", 1), ("b", "", 1))
    pool.rebuild(ServiceView("s", 1), [a, b])
    assert pool.pick([a]) is b
    assert pool.pick([a, b]) is None


@pytest.mark.parametrize("bad", [{"consecutive_failures": 0}, {"ejection_s": -1}])
def test_outlier_config_rejects_nonsense(bad: dict[str, float]) -> None:
    """Config validation names the field."""
    with pytest.raises(ValueError, match=next(iter(bad))):
        OutlierConfig(**bad)  # type: ignore[arg-type]
