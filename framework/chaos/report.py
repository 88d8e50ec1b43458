"""Results of experiments: the hypotheses judged, per-fault figures, a table, JSON and PNGs.

Steady state is judged where the system should be steady: before the first fault
(when there is time before it) and in the last `steady_tail_s` of the offered load
(after recovery; with the requests retried after it).  The p99 limit is relative to
the machine of the moment: `max(max_p99_ms, p99_over_baseline x the baseline's p99)`,
the baseline being the unrecorded window the runner measured just before the load
(see `runner`), so a machine loaded by others does not fail a hypothesis that still
holds relative to it.  Each fault gets its own figures: the requests still running
when it began or started after it, until the next fault's start (or the load's end),
how many failed, and its recovery time: from the fault's end to the last failed
request attributed to it (0 when none failed).  The steady state before faults counts
only the requests that ended before the first one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from framework.chaos.experiment import Experiment
from framework.chaos.faults import FaultRecord
from framework.chaos.invariants import InvariantResult
from framework.chaos.load import LoadResult, Sample

__all__ = [
    "Check",
    "ExperimentResult",
    "FaultFigures",
    "Window",
    "evaluate",
    "p99",
    "print_table",
    "timeline_png",
    "write_json",
]


def p99(latencies: Sequence[float]) -> float:
    """The 99th percentile (nearest rank) of `latencies`; 0 for none."""
    if not latencies:
        return 0.0
    ordered = sorted(latencies)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


@dataclass(frozen=True, slots=True)
class Window:
    """Requests started in [start_s, end_s)."""

    start_s: float
    end_s: float
    requests: int
    errors: int
    p99_ms: float

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @classmethod
    def of(cls, samples: Sequence[Sample], start_s: float, end_s: float) -> Window:
        inside = [s for s in samples if start_s <= s.started_s < end_s]
        ok = [s.latency_s for s in inside if s.ok]
        return cls(start_s, end_s, len(inside), sum(1 for s in inside if not s.ok), p99(ok) * 1000)


@dataclass(frozen=True, slots=True)
class Check:
    """One judged hypothesis or invariant."""

    name: str
    expected: str
    observed: str
    held: bool


@dataclass(frozen=True, slots=True)
class FaultFigures:
    fault: str
    target: str
    started_s: float
    ended_s: float
    requests: int
    errors: int
    recovery_s: float
    restart_s: float | None
    detail: str
    error: str = ""


@dataclass(slots=True)
class ExperimentResult:
    name: str
    backend: str
    description: str = ""
    requests: int = 0
    errors: int = 0
    iterations: int = 0
    skipped: int = 0
    duration_s: float = 0.0
    p99_ms: float = 0.0
    checks: list[Check] = field(default_factory=list)
    faults: list[FaultFigures] = field(default_factory=list)
    invariants: list[InvariantResult] = field(default_factory=list)
    settle_s: float = 0.0
    timeline: list[dict[str, float]] = field(default_factory=list)
    error: str = ""  # the experiment could not run
    png: str = ""
    baseline: Window | None = None  # measured before the load (unrecorded)
    p99_limit_ms: float = 0.0  # the steady-state p99 limit applied
    load_average: tuple[float, float] = (0.0, 0.0)  # 1-min load average at start, end

    @property
    def passed(self) -> bool:
        return (
            not self.error
            and all(c.held for c in self.checks)
            and all(i.held for i in self.invariants)
        )

    def failed_names(self) -> list[str]:
        names = [c.name for c in self.checks if not c.held]
        names += [f"invariant {i.name}" for i in self.invariants if not i.held]
        if self.error:
            names.append(f"error: {self.error}")
        return names


def _pct(value: float) -> str:
    return f"{value * 100:.1f}%"


def timeline(
    samples: Sequence[Sample], duration_s: float, bucket_s: float = 1.0
) -> list[dict[str, float]]:
    """Per `bucket_s`: ok requests per second, error rate and p99 (ms) of the requests started."""
    buckets = max(1, math.ceil(duration_s / bucket_s))
    rows = []
    for b in range(buckets):
        w = Window.of(samples, b * bucket_s, (b + 1) * bucket_s)
        rows.append(
            {
                "t_s": b * bucket_s,
                "ok_per_s": (w.requests - w.errors) / bucket_s,
                "error_rate": w.error_rate,
                "p99_ms": w.p99_ms,
            }
        )
    return rows


def evaluate(
    experiment: Experiment,
    backend: str,
    load: LoadResult,
    faults: Sequence[FaultRecord],
    invariants: Sequence[InvariantResult],
    settle_s: float,
    *,
    baseline: Window | None = None,
    load_average: tuple[float, float] = (0.0, 0.0),
) -> ExperimentResult:
    """Judge the hypothesis of `experiment` on what was observed."""
    h = experiment.hypothesis
    samples = load.samples
    end = max(load.duration_s, experiment.load.duration_s)
    whole = Window.of(samples, 0.0, math.inf)
    p99_limit = h.max_p99_ms
    limit_text = f"<= {h.max_p99_ms:g} ms"
    if baseline is not None and baseline.p99_ms * h.p99_over_baseline > h.max_p99_ms:
        p99_limit = baseline.p99_ms * h.p99_over_baseline
        limit_text = f"<= {p99_limit:.0f} ms ({h.p99_over_baseline:g}x baseline)"
    res = ExperimentResult(
        experiment.name,
        backend,
        experiment.description,
        requests=whole.requests,
        errors=whole.errors,
        iterations=load.iterations,
        skipped=load.skipped,
        duration_s=load.duration_s,
        p99_ms=whole.p99_ms,
        invariants=list(invariants),
        settle_s=settle_s,
        timeline=timeline(samples, end),
        baseline=baseline,
        p99_limit_ms=p99_limit,
        load_average=load_average,
    )
    windows: list[tuple[str, Window]] = []
    first = min((f.started_s for f in faults), default=None)
    if first is None:
        windows.append(("steady state (whole load)", whole))
    elif first >= 2.0:
        # the requests that ended before the first fault: one still in flight when it
        # began (e.g. on the process killed) is the fault's
        ended = [s for s in samples if s.started_s + s.latency_s < first]
        windows.append(("steady state before faults", Window.of(ended, 0.0, first)))
    if faults and h.steady_tail_s > 0:
        # the last steady_tail_s of the offered load (no iteration starts after it, only
        # retries), never before the last fault ended
        last_end = max(f.ended_s for f in faults)
        tail_start = max(experiment.load.duration_s - h.steady_tail_s, last_end)
        windows.append(
            (f"steady state, last {h.steady_tail_s:g}s", Window.of(samples, tail_start, math.inf))
        )
    for label, w in windows:
        res.checks.append(
            Check(
                f"error rate, {label}",
                f"<= {_pct(h.max_error_rate)}",
                f"{_pct(w.error_rate)} of {w.requests}",
                w.error_rate <= h.max_error_rate,
            )
        )
        res.checks.append(
            Check(f"p99, {label}", limit_text, f"{w.p99_ms:.0f} ms", w.p99_ms <= p99_limit)
        )
        if w.requests == 0:
            res.checks.append(Check(f"requests, {label}", "> 0", "0", False))
    if h.max_error_rate_during is not None:
        res.checks.append(
            Check(
                "error rate, whole load",
                f"<= {_pct(h.max_error_rate_during)}",
                f"{_pct(whole.error_rate)} of {whole.requests}",
                whole.error_rate <= h.max_error_rate_during,
            )
        )
    ordered = sorted(faults, key=lambda f: f.started_s)
    for index, fault in enumerate(ordered):
        until = ordered[index + 1].started_s if index + 1 < len(ordered) else math.inf
        # started before the next fault, and still running when this one began
        inside = [
            s
            for s in samples
            if s.started_s < until and s.started_s + s.latency_s >= fault.started_s
        ]
        failed = [s for s in inside if not s.ok]
        last_error = max((s.started_s + s.latency_s for s in failed), default=fault.ended_s)
        recovery = max(0.0, last_error - fault.ended_s) if failed else 0.0
        figures = FaultFigures(
            fault.spec.describe(),
            fault.target,
            fault.started_s,
            fault.ended_s,
            len(inside),
            len(failed),
            recovery,
            fault.restart_s,
            fault.detail,
            fault.error,
        )
        res.faults.append(figures)
        label = f"fault @{fault.spec.at_s:g}s {fault.spec.describe()}"
        res.checks.append(Check(f"{label}: applied", "yes", fault.error or "yes", not fault.error))
        if h.max_recovery_s is not None:
            res.checks.append(
                Check(
                    f"{label}: recovery",
                    f"<= {h.max_recovery_s:g} s",
                    f"{recovery:.1f} s",
                    recovery <= h.max_recovery_s,
                )
            )
    return res


# ---------------------------------------------------------------- output


def _table(out: TextIO, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [list(map(str, header)), *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for row in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def print_table(results: Sequence[ExperimentResult], out: TextIO) -> None:
    """Every check of every experiment, then the faults' figures, then a verdict line."""
    rows: list[list[object]] = []
    for r in results:
        if r.error:
            rows.append([r.name, r.backend, "experiment ran", "yes", r.error, "FAIL"])
        for c in r.checks:
            rows.append(
                [r.name, r.backend, c.name, c.expected, c.observed, "ok" if c.held else "FAIL"]
            )
        for i in r.invariants:
            rows.append(
                [
                    r.name,
                    r.backend,
                    f"invariant {i.name}",
                    "holds",
                    i.detail,
                    "ok" if i.held else "FAIL",
                ]
            )
    out.write("\n")
    _table(out, ("EXPERIMENT", "BACKEND", "CHECK", "EXPECTED", "OBSERVED", "RESULT"), rows)
    fault_rows = [
        [
            r.name,
            f.fault,
            f.target,
            f"{f.started_s:.1f}-{f.ended_s:.1f}",
            f.requests,
            f.errors,
            f"{f.recovery_s:.1f}",
            "-" if f.restart_s is None else f"{f.restart_s:.1f}",
        ]
        for r in results
        for f in r.faults
    ]
    if fault_rows:
        out.write("\n")
        _table(
            out,
            (
                "EXPERIMENT",
                "FAULT",
                "TARGET",
                "AT (s)",
                "REQUESTS",
                "ERRORS",
                "RECOVERY (s)",
                "RESTART (s)",
            ),
            fault_rows,
        )
    load_rows = [
        [
            r.name,
            r.requests,
            r.errors,
            _pct(r.errors / r.requests if r.requests else 0),
            f"{r.p99_ms:.0f}",
            "-" if r.baseline is None else f"{r.baseline.p99_ms:.0f}",
            r.skipped,
            f"{r.settle_s:.1f}",
            f"{r.load_average[0]:.1f}-{r.load_average[1]:.1f}",
        ]
        for r in results
    ]
    out.write("\n")
    _table(
        out,
        (
            "EXPERIMENT",
            "REQUESTS",
            "ERRORS",
            "ERROR RATE",
            "P99 (ms)",
            "BASELINE P99",
            "SKIPPED",
            "SETTLE (s)",
            "LOAD AVG",
        ),
        load_rows,
    )
    failed = [r for r in results if not r.passed]
    out.write("\n")
    if failed:
        for r in failed:
            out.write(f"FAILED {r.name} ({r.backend}): {'; '.join(r.failed_names())}\n")
    else:
        checks = sum(len(r.checks) + len(r.invariants) for r in results)
        out.write(f"all {len(results)} experiments held ({checks} checks)\n")
    out.flush()


def to_json(results: Sequence[ExperimentResult]) -> dict[str, Any]:
    return {
        "passed": all(r.passed for r in results),
        "experiments": [{**asdict(r), "passed": r.passed} for r in results],
    }


def write_json(results: Sequence[ExperimentResult], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(results), indent=2) + "\n")
    return path


def timeline_png(result: ExperimentResult, path: Path) -> Path:
    """Throughput, error rate and p99 over time, each fault marked (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [row["t_s"] for row in result.timeline]
    fig, axes = plt.subplots(3, 1, figsize=(10, 7), sharex=True)
    try:
        series = (
            ("ok requests/s", [row["ok_per_s"] for row in result.timeline], "tab:blue"),
            ("error rate (%)", [row["error_rate"] * 100 for row in result.timeline], "tab:red"),
            ("p99 (ms)", [row["p99_ms"] for row in result.timeline], "tab:purple"),
        )
        for ax, (label, values, color) in zip(axes, series, strict=True):
            ax.step(t, values, where="post", color=color)
            ax.set_ylabel(label)
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            for fault in result.faults:
                if fault.ended_s - fault.started_s > 0.05:
                    ax.axvspan(fault.started_s, fault.ended_s, color="orange", alpha=0.25)
                else:
                    ax.axvline(fault.started_s, color="orange", linewidth=2)
        for fault in result.faults:
            axes[0].annotate(
                fault.fault,
                (fault.started_s, 1.0),
                xycoords=("data", "axes fraction"),
                rotation=0,
                fontsize=8,
                va="bottom",
            )
        axes[-1].set_xlabel("seconds since the load began")
        verdict = "held" if result.passed else "FAILED"
        fig.suptitle(f"{result.name} ({result.backend}): {verdict}")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=90)
    finally:
        plt.close(fig)
    return path
