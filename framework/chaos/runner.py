"""Run experiments against one system: load and faults at once, then invariants, then judge.

    results = await run_chaos(RunConfig(experiments, manifest=Path("system.toml"), ...), out)

One system is started for the run (`ChaosSystem`); the experiments run one after
another on it, each starting once every process is ready again.  Per experiment: the
scenario is set up, a baseline is measured (the same load, unrecorded, in windows of
`baseline_s` until one meets `max_error_rate`, at most `baseline_timeout_s`: the system
is warm and steady before any fault, and its p99 on this machine at this moment is
known), the load and every fault start on one clock, the faults are undone,
the invariants are polled until they hold (or the settle time passes), the hypothesis
is judged (`report.evaluate`) and the timeline drawn.  Invariants hold across
experiments, since every experiment's data stays in the stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import random
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from framework.chaos.experiment import Experiment
from framework.chaos.faults import FaultRecord, run_fault
from framework.chaos.invariants import InvariantResult, check_invariants, load_invariants
from framework.chaos.load import (
    LoadContext,
    LoadResult,
    Scenario,
    ScenarioError,
    build_scenario,
    run_load,
)
from framework.chaos.report import ExperimentResult, Window, evaluate, timeline_png
from framework.chaos.system import ChaosSystem, ChaosSystemConfig

__all__ = ["RunConfig", "run_chaos", "run_experiment"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunConfig:
    experiments: Sequence[Experiment]
    manifest: Path
    report_dir: Path
    store: str = ""
    bus: str = ""
    service_env: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    keep: bool = False  # keep the data directory, PostgreSQL schemas and NATS stream
    seed: int = 18
    ready_timeout_s: float = 240.0


def _say(out: TextIO, text: str) -> None:
    out.write(f"chaos: {text}\n")
    out.flush()


async def run_experiment(
    experiment: Experiment, system: ChaosSystem, out: TextIO, *, rng: random.Random
) -> ExperimentResult:
    """One experiment on a running system (see the module docstring)."""
    backend = system.backend
    _say(out, f"{experiment.name} ({backend}): {experiment.description or ''}".rstrip(": "))
    try:
        invariants = load_invariants(experiment.hypothesis.invariants)
        scenario = build_scenario(experiment.load)
    except (ValueError, ScenarioError) as error:
        return ExperimentResult(experiment.name, backend, experiment.description, error=str(error))
    await _all_ready(system)
    load_before = os.getloadavg()[0]
    ctx = LoadContext(
        system.gateway_url,
        timeout_s=experiment.load.timeout_s,
        operator_token=system.operator_token(),
    )
    records: list[FaultRecord] = []
    load = LoadResult()
    try:
        try:
            await scenario.setup(ctx)
        except ScenarioError as error:
            return ExperimentResult(
                experiment.name, backend, experiment.description, error=str(error)
            )
        baseline, why = await measure_baseline(experiment, scenario, system)
        if why:
            return ExperimentResult(experiment.name, backend, experiment.description, error=why)
        if baseline is not None:
            _say(
                out,
                f"{experiment.name}: baseline {baseline.requests} requests, "
                f"p99 {baseline.p99_ms:.0f} ms (load average {os.getloadavg()[0]:.1f})",
            )
        ctx.begin()
        load_task = asyncio.create_task(run_load(experiment.load, scenario, ctx))
        fault_tasks = [
            asyncio.create_task(run_fault(f, system, ctx.now_s, rng=rng)) for f in experiment.faults
        ]
        try:
            records = list(await asyncio.gather(*fault_tasks))
            load = await load_task
        finally:
            for task in (load_task, *fault_tasks):
                task.cancel()
            await asyncio.gather(load_task, *fault_tasks, return_exceptions=True)
    finally:
        await ctx.close()
    _say(
        out,
        f"{experiment.name}: {len(load.samples)} requests, "
        f"{sum(1 for s in load.samples if not s.ok)} failed; checking invariants",
    )
    results: list[InvariantResult] = []
    settle = 0.0
    if invariants:
        results, settle = await check_invariants(
            invariants, system.snapshot, settle_timeout_s=experiment.hypothesis.settle_timeout_s
        )
    return evaluate(
        experiment,
        backend,
        load,
        records,
        results,
        settle,
        baseline=baseline,
        load_average=(load_before, os.getloadavg()[0]),
    )


async def measure_baseline(
    experiment: Experiment, scenario: Scenario, system: ChaosSystem
) -> tuple[Window | None, str]:
    """The experiment's load without faults, unrecorded, in `baseline_s` windows until one
    meets `max_error_rate` (bounded by `baseline_timeout_s`): that window, or why none did."""
    h = experiment.hypothesis
    if h.baseline_s <= 0:
        return None, ""
    spec = dataclasses.replace(experiment.load, duration_s=h.baseline_s)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + h.baseline_timeout_s
    while True:
        ctx = LoadContext(
            system.gateway_url, timeout_s=spec.timeout_s, operator_token=system.operator_token()
        )
        try:
            window = Window.of((await run_load(spec, scenario, ctx)).samples, 0.0, math.inf)
        finally:
            await ctx.close()
        if window.requests and window.error_rate <= h.max_error_rate:
            return window, ""
        if loop.time() >= deadline:
            return None, (
                f"no steady state before the load within {h.baseline_timeout_s:g}s: the last "
                f"{h.baseline_s:g}s window had {window.errors} of {window.requests} requests failed"
            )


async def _all_ready(system: ChaosSystem, timeout_s: float = 120.0) -> None:
    """Every process running and ready (the previous experiment's restarts are over)."""
    for process in system.processes():
        await system.supervisor.wait_ready(process.name, timeout_s=timeout_s)


async def run_chaos(config: RunConfig, out: TextIO) -> list[ExperimentResult]:
    """Start the system, run every experiment that applies to its backend, stop it."""
    config.report_dir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(tempfile.mkdtemp(prefix="chaos-data-"))
    log_path = config.report_dir / "system.log"
    rng = random.Random(config.seed)
    results: list[ExperimentResult] = []
    with log_path.open("w") as log:
        system = ChaosSystem(
            ChaosSystemConfig(
                manifest=config.manifest,
                data_dir=data_dir,
                store=config.store,
                bus=config.bus,
                service_env=config.service_env,
                ready_timeout_s=config.ready_timeout_s,
            ),
            out=log,
        )
        _say(out, f"starting the system of {config.manifest} (process output: {log_path})")
        try:
            await system.start()
            _say(out, f"system {system.name} is up on {system.backend}: {system.gateway_url}")
            for experiment in config.experiments:
                if not experiment.applies_to(system.backend):
                    _say(out, f"{experiment.name}: not for {system.backend}, skipped")
                    continue
                result = await run_experiment(experiment, system, out, rng=rng)
                with contextlib.suppress(OSError):
                    png = config.report_dir / f"{experiment.name}.png"
                    result.png = str(timeline_png(result, png))
                results.append(result)
                _say(out, f"{experiment.name}: {'held' if result.passed else 'FAILED'}")
        finally:
            codes = await system.stop()
            unclean = {n: c for n, c in codes.items() if c not in (0, None, -15, -2)}
            if unclean:
                _say(out, f"stopped; exit codes not clean: {unclean}")
            if not config.keep:
                await system.drop_data()
                shutil.rmtree(data_dir, ignore_errors=True)
            else:
                _say(out, f"data kept in {data_dir} (system {system.name})")
    return results
