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


def _pool(balancer: object = None, clock: ManualClock | None = None, **outlier: object) -> Pool:
    config = {"consecutive_failures": 2, "ejection_s": 30, "return_after_probes": 0} | outlier
    return Pool(
        balancer or RoundRobin(),  # type: ignore[arg-type]
        OutlierConfig(**config),  # type: ignore[arg-type]
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


async def test_failing_instance_is_ejected_for_a_while_then_returns() -> None:
    """Two failures in a row eject for 30 s; success resets the count; time up = back."""
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
    clock.advance(29)
    await pool.outlier.probe_due()
    assert _count(pool, 10) == {"b": 10}
    clock.advance(2)
    await pool.outlier.probe_due()
    assert _count(pool, 10) == {"a": 5, "b": 5}


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ],
)
def test_timeouts_and_overload_count_as_failures_but_app_errors_do_not(
    code: grpc.StatusCode,
) -> None:
    """DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED eject like UNAVAILABLE; NOT_FOUND resets."""
    pool = _pool()
    a, b, c = _endpoints(("a", "", 1), ("b", "", 1), ("c", "", 1))
    pool.rebuild(ServiceView("s", 1), [a, b, c])
    pool.observe(b, code)
    pool.observe(b, grpc.StatusCode.NOT_FOUND)  # the instance answered: not a failure
    pool.observe(b, code)
    assert not b.outlier.ejected
    pool.observe(a, code)
    pool.observe(a, code)
    assert a.outlier.ejected and "a" not in _count(pool, 20)


def test_at_most_max_ejection_percent_are_out_and_all_out_means_use_all() -> None:
    """With 4 instances and 50%, a third failing instance stays in; with 1 instance
    ejected it is still used (a guess beats certain failure)."""
    pool = _pool()
    eps = _endpoints(("a", "", 1), ("b", "", 1), ("c", "", 1), ("d", "", 1))
    pool.rebuild(ServiceView("s", 1), eps)
    for e in eps[:3]:
        pool.observe(e, grpc.StatusCode.UNAVAILABLE)
        pool.observe(e, grpc.StatusCode.UNAVAILABLE)
    assert [e.outlier.ejected for e in eps] == [True, True, False, False]
    alone = _pool()
    [only] = _endpoints(("z", "", 1))
    alone.rebuild(ServiceView("s", 1), [only])
    alone.observe(only, grpc.StatusCode.UNAVAILABLE)
    alone.observe(only, grpc.StatusCode.UNAVAILABLE)
    assert only.outlier.ejected and _count(alone, 3) == {"z": 3}


async def test_each_ejection_lasts_longer_and_good_intervals_shorten_it_again() -> None:
    """The n-th ejection lasts n x ejection_s (capped); each clean interval lowers n."""
    clock = ManualClock()
    pool = _pool(clock=clock, ejection_s=10, max_ejection_s=25, interval_s=5)
    a, b = _endpoints(("a", "", 1), ("b", "", 1))
    pool.rebuild(ServiceView("s", 1), [a, b])
    durations = []
    for _ in range(3):
        start = clock.monotonic()
        pool.observe(a, grpc.StatusCode.UNAVAILABLE)
        pool.observe(a, grpc.StatusCode.UNAVAILABLE)
        durations.append(a.outlier.ejected_until - start)
        clock.advance(a.outlier.ejected_until - start)
        await pool.outlier.probe_due()
        assert not a.outlier.ejected
    assert durations == [10, 20, 25]
    for _ in range(3):
        pool.outlier.evaluate()  # three intervals without trouble
    assert a.outlier.ejections == 0


async def test_an_ejected_instance_returns_only_after_n_successful_probes_in_a_row() -> None:
    """Time up is not enough: 3 health probes in a row must succeed; a failed one resets."""
    clock = ManualClock()
    answers = iter([True, False, True, True, True])
    probed: list[str] = []

    async def probe(endpoint: object, timeout_s: float) -> bool:
        probed.append(getattr(endpoint, "address", ""))
        return next(answers)

    pool = Pool(
        RoundRobin(),
        OutlierConfig(consecutive_failures=1, ejection_s=5, return_after_probes=3),
        clock,
        random.Random(1),
        probe=probe,
    )
    a, b = _endpoints(("a", "", 1), ("b", "", 1))
    pool.rebuild(ServiceView("s", 1), [a, b])
    pool.observe(a, grpc.StatusCode.DEADLINE_EXCEEDED)
    await pool.outlier.probe_due()
    assert probed == []  # not probed before its time is up
    clock.advance(5)
    states = []
    for _ in range(5):
        await pool.outlier.probe_due()
        states.append(a.outlier.ejected)
    assert probed == ["a"] * 5
    assert states == [True, True, True, True, False]


def test_success_rate_ejects_the_instance_far_below_the_fleet() -> None:
    """Of 6 instances, the one succeeding 50% while the rest succeed ~100% is ejected
    at the end of the interval; failure percentage ejects 90% failures in a pair."""
    pool = _pool(success_rate_request_volume=20, failure_percentage_threshold=0)
    eps = _endpoints(*[(f"i{n}", "", 1) for n in range(6)])
    pool.rebuild(ServiceView("s", 1), eps)
    for n, e in enumerate(eps):
        for k in range(40):
            bad = (n == 0 and k % 2 == 0) or (n == 1 and k == 7)
            pool.observe(e, grpc.StatusCode.UNAVAILABLE if bad else grpc.StatusCode.OK)
    assert [e.address for e in pool.outlier.evaluate()] == ["i0"]
    pair = _pool(failure_percentage_request_volume=10, consecutive_failures=100)
    x, y = _endpoints(("x", "", 1), ("y", "", 1))
    pair.rebuild(ServiceView("s", 1), [x, y])
    for k in range(20):
        pair.observe(x, grpc.StatusCode.UNAVAILABLE if k % 10 else grpc.StatusCode.OK)
        pair.observe(y, grpc.StatusCode.OK)
    assert [e.address for e in pair.outlier.evaluate()] == ["x"]


def test_excluded_instances_are_not_picked_again() -> None:
    """A retry excludes the instances already tried; none left gives None."""
    pool = _pool()
    a, b = _endpoints(("a", "", 1), ("b", "", 1))
    pool.rebuild(ServiceView("s", 1), [a, b])
    assert pool.pick([a]) is b
    assert pool.pick([a, b]) is None


@pytest.mark.parametrize(
    "bad",
    [
        {"consecutive_failures": 0},
        {"ejection_s": -1},
        {"max_ejection_percent": 101},
        {"failure_percentage_threshold": 85},
        {"return_after_probes": -1},
    ],
)
def test_outlier_config_rejects_nonsense(bad: dict[str, float]) -> None:
    """Config validation names the field."""
    with pytest.raises(ValueError, match=next(iter(bad))):
        OutlierConfig(**bad)  # type: ignore[arg-type]
