"""Experiment files: parsed into frozen objects, every mistake named by file and key; the
hypothesis judged on recorded samples (steady-state windows, per-fault recovery)."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import tomllib
from pathlib import Path

import pytest

from framework.chaos.experiment import ExperimentError, load_experiments, parse_experiment
from framework.chaos.faults import FaultRecord, resolve_process
from framework.chaos.load import LoadResult, Sample
from framework.chaos.report import evaluate, p99

ROOT = Path(__file__).resolve().parents[2]
BASE = """
[experiment]
name = "x"
[load]
rate_per_s = 2
duration_s = 10
[hypothesis]
max_error_rate = 0.1
max_recovery_s = 2
"""


def _parse(text: str) -> object:
    return parse_experiment(tomllib.loads(text), Path("x.toml"))


def test_the_standard_set_parses_and_names_are_unique() -> None:
    """Every experiment `make chaos` runs is valid; one is PostgreSQL-only."""
    experiments = load_experiments([ROOT / "services/chaos/experiments"])
    assert len(experiments) >= 10
    assert {f.action for e in experiments for f in e.faults} >= {
        "kill",
        "pause",
        "stop",
        "rpc",
        "proxy",
    }
    assert [e.name for e in experiments if not e.applies_to("sqlite")] == ["postgres-cut"]


def test_every_standard_steady_tail_begins_after_the_recovery_it_allows() -> None:
    """A steady tail inside the recovery its own hypothesis allows would fail a system that
    recovered in time (postgres-cut on a loaded machine: 7.4 s of 15 allowed, tail at 15 s)."""
    for e in load_experiments([ROOT / "services/chaos/experiments"]):
        h = e.hypothesis
        assert h.max_recovery_s is not None, e.name
        last_end = max(f.ends_s for f in e.faults)
        tail_start = e.load.duration_s - h.steady_tail_s
        assert tail_start >= last_end + h.max_recovery_s, (e.name, tail_start, last_end)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[[faults]]\nat_s = 1\naction = "explode"', "faults[0].action must be one of"),
        (
            '[[faults]]\nat_s = 1\naction = "pause"\nprocess = "a"',
            "faults[0].duration_s is required",
        ),
        ('[[faults]]\nat_s = 11\naction = "kill"\nprocess = "a"', "faults[0].at_s must be"),
        ('[[faults]]\nat_s = 1\naction = "rpc"\nservice = "p"\nduration_s = 1', "does nothing"),
        (
            '[[faults]]\nat_s = 1\naction = "proxy"\nproxy = "redis"\nduration_s = 1',
            'faults[0].proxy must be "postgres" or "nats"',
        ),
        (
            '[[faults]]\nat_s = 1\naction = "kill"\nprocess = "a"\ncolour = 1',
            "unknown key(s) in [faults[0]]: colour",
        ),
    ],
)
def test_a_bad_fault_is_refused_naming_its_key(extra: str, message: str) -> None:
    """Each mistake in a fault table raises ExperimentError naming the key."""
    with pytest.raises(
        ExperimentError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
    ):
        _parse(BASE + extra)


def test_a_bad_load_and_hypothesis_are_refused() -> None:
    """Rates, durations and invariant references are checked."""
    with pytest.raises(ExperimentError, match=re.escape("load.rate_per_s must be > 0")):
        _parse(BASE.replace("rate_per_s = 2", "rate_per_s = 0"))
    with pytest.raises(ExperimentError, match=re.escape("hypothesis.invariants[0]")):
        _parse(BASE + 'invariants = ["not a reference"]')


def test_random_process_choices_stay_within_the_named_service() -> None:
    """ "random" never picks the registry; "random:payment" picks a payment replica."""
    import random

    names = ["registry", "payment-1", "payment-2", "order-1"]
    rng = random.Random(1)
    assert all(resolve_process("random", names, rng) != "registry" for _ in range(30))
    assert {resolve_process("random:payment", names, rng) for _ in range(30)} == {
        "payment-1",
        "payment-2",
    }
    with pytest.raises(ValueError, match="no process 'nope'"):
        resolve_process("nope", names, rng)


def test_the_hypothesis_is_judged_per_window_and_per_fault() -> None:
    """Errors only during a fault: steady state holds, recovery is fault end to last error."""
    text = (
        BASE
        + 'steady_tail_s = 3\n[[faults]]\nat_s = 4\naction = "pause"\nprocess = "a"\nduration_s = 1'
    )
    experiment = _parse(text)
    samples = [Sample("r", t / 2, 0.1, not (4.0 <= t / 2 < 6.5), "200") for t in range(20)]
    load = LoadResult(samples=samples, iterations=20, duration_s=10.0)
    fault = FaultRecord(experiment.faults[0], "a", started_s=4.0, ended_s=5.0)  # type: ignore[attr-defined]
    result = evaluate(experiment, "sqlite", load, [fault], [], 0.0)  # type: ignore[arg-type]
    checks = {c.name: c for c in result.checks}
    assert checks["error rate, steady state before faults"].held
    assert checks["error rate, steady state, last 3s"].observed == "0.0% of 6"
    figures = result.faults[0]
    assert (figures.requests, figures.errors) == (12, 5)
    assert figures.recovery_s == pytest.approx(1.1)  # the last error began at 6.0 s, took 0.1 s
    assert result.passed  # 1.1 s <= max_recovery_s 2
    assert p99([0.1] * 99 + [5.0]) == 0.1 and p99([0.1] * 98 + [5.0, 5.0]) == 5.0


def test_the_steady_tail_is_the_end_of_the_offered_load_even_when_the_load_overran() -> None:
    """Requests in flight at the end stretch the load past duration_s: the tail window is
    still the last steady_tail_s of the offered load (where iterations started), not empty."""
    text = BASE + 'steady_tail_s = 3\n[[faults]]\nat_s = 2\naction = "kill"\nprocess = "a"'
    experiment = _parse(text)
    samples = [Sample("r", t / 2, 0.1, True, "200") for t in range(20)]  # started 0..9.5 s
    load = LoadResult(samples=samples, iterations=20, duration_s=25.0)  # waited for stragglers
    fault = FaultRecord(experiment.faults[0], "a", started_s=2.0, ended_s=2.1)  # type: ignore[attr-defined]
    result = evaluate(experiment, "sqlite", load, [fault], [], 0.0)  # type: ignore[arg-type]
    checks = {c.name: c for c in result.checks}
    assert checks["error rate, steady state, last 3s"].observed == "0.0% of 6"
    assert "requests, steady state, last 3s" not in checks
    assert result.passed


def test_the_p99_limit_is_relative_to_the_baseline_when_the_machine_is_slow() -> None:
    """A slow baseline (a loaded machine) raises the p99 limit to p99_over_baseline x its p99;
    a fast one leaves max_p99_ms; the limit applied is reported."""
    from framework.chaos.report import Window

    text = BASE + "max_p99_ms = 1000\np99_over_baseline = 2\nsteady_tail_s = 3\n"
    experiment = _parse(text)
    samples = [Sample("r", t / 2, 1.5, True, "200") for t in range(20)]  # 1500 ms each
    load = LoadResult(samples=samples, iterations=20, duration_s=10.0)
    slow = Window(0.0, 3.0, 9, 0, 900.0)
    result = evaluate(experiment, "sqlite", load, [], [], 0.0, baseline=slow)  # type: ignore[arg-type]
    check = next(c for c in result.checks if c.name.startswith("p99"))
    assert (check.expected, check.held, result.p99_limit_ms) == (
        "<= 1800 ms (2x baseline)",
        True,
        1800.0,
    )
    fast = Window(0.0, 3.0, 9, 0, 100.0)
    result = evaluate(experiment, "sqlite", load, [], [], 0.0, baseline=fast)  # type: ignore[arg-type]
    check = next(c for c in result.checks if c.name.startswith("p99"))
    assert (check.expected, check.held, result.passed) == ("<= 1000 ms", False, False)


async def test_a_kill_happens_at_its_time_even_when_the_registry_answers_late() -> None:
    """kill-inventory on a loaded machine: the registry took longer than at_s to list the
    leases; the process is still killed at at_s (the lease query never delays the fault)."""
    from framework.chaos.faults import run_fault
    from framework.chaos.system import ProcessView, RegisteredInstance

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    listener = socket.create_server(("127.0.0.1", 0))  # where the "restarted" process listens
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    answered = asyncio.Event()
    events: list[str] = []

    class SlowRegistrySystem:
        """The runner's view of a system whose registry answers after the fault's time."""

        def __init__(self) -> None:
            self.supervisor = self
            self.current = 1

        def processes(self) -> list[ProcessView]:
            return [ProcessView("order-1", self.current, "running", 0)]

        def snapshot(self) -> SlowRegistrySystem:
            return self

        async def registered(self) -> list[RegisteredInstance]:
            if not answered.is_set():
                await asyncio.sleep(0.5)  # the fault is due at 0.05 s
                events.append("registry answered")
                answered.set()
            return [RegisteredInstance("order.v1.OrderService", "order-1", address, "SERVING")]

        def signal(self, name: str, sig: object) -> int:
            events.append("killed")
            self.current = os.getpid()  # back at once, listening on `address`
            return 1

        def pid(self, name: str) -> int:
            return self.current

        async def wait_ready(self, name: str, timeout_s: float) -> None:
            return None

    experiment = _parse(BASE + '[[faults]]\nat_s = 0.05\naction = "kill"\nprocess = "order-1"')
    try:
        record = await run_fault(
            experiment.faults[0],  # type: ignore[attr-defined]
            SlowRegistrySystem(),
            lambda: loop.time() - t0,
            ready_timeout_s=30,
        )
    finally:
        listener.close()
    assert events == ["killed", "registry answered"]
    assert record.error == "" and record.ready_s is not None
    assert record.started_s <= record.ended_s <= record.ready_s


def test_a_request_in_flight_when_the_fault_begins_is_the_faults() -> None:
    """kill-order on a loaded machine: requests started just before the kill failed with it;
    they count against the fault (and its recovery), not the steady state before it."""
    text = BASE + '[[faults]]\nat_s = 3\naction = "kill"\nprocess = "a"'
    experiment = _parse(text)
    ok_before = [Sample("r", t / 2, 0.1, True, "200") for t in range(5)]  # 0.0..2.0 s
    in_flight = [Sample("r", 2.6, 0.8, False, "503"), Sample("r", 2.8, 0.5, True, "200")]
    after = [Sample("r", 3.0 + t / 2, 0.1, True, "200") for t in range(14)]
    load = LoadResult(samples=ok_before + in_flight + after, iterations=21, duration_s=10.0)
    fault = FaultRecord(experiment.faults[0], "a", started_s=3.0, ended_s=3.0)  # type: ignore[attr-defined]
    result = evaluate(experiment, "sqlite", load, [fault], [], 0.0)  # type: ignore[arg-type]
    checks = {c.name: c for c in result.checks}
    assert checks["error rate, steady state before faults"].observed == "0.0% of 5"
    assert (result.faults[0].requests, result.faults[0].errors) == (16, 1)
    assert result.faults[0].recovery_s == pytest.approx(0.4)  # the failed one ended at 3.4 s


def test_stock_balances_reads_the_inventory_from_the_systems_database() -> None:
    """On PostgreSQL the inventory keeps its rows in its schema (not the SQLite file its
    environment still names): the invariant reads there (a make chaos run on PostgreSQL
    reported every confirmed order without a reservation)."""
    from framework.chaos.system import Database, ProcessView, SystemView
    from services.chaos.invariants import _inventory_db

    schema = Database(dsn="postgresql://postgres@127.0.0.1:5432/test", schema="c_inventory")
    stale = {"INVENTORY_DB_PATH": "/tmp/unused/inventory.sqlite3"}
    view = SystemView(
        {"inventory": schema}, processes=[ProcessView("inventory-1", 1, "running", 0, stale)]
    )
    assert _inventory_db(view) == schema
    standalone = SystemView({}, processes=[ProcessView("inventory-1", 1, "running", 0, stale)])
    assert _inventory_db(standalone) == Database(sqlite_path="/tmp/unused/inventory.sqlite3")
