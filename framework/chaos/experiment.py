"""Experiments as TOML files: a steady-state hypothesis, a bounded load, faults at given times.

```toml
[experiment]
name = "kill-payment"                     # letters, digits, '-', '_'
description = "a payment replica is killed under load; the supervisor restarts it"
backends = ["sqlite", "postgres"]         # where it applies (default: both)

[load]
scenario = "services.chaos.scenario:Orders"   # module:factory, or "http" (see below)
rate_per_s = 4.0                          # iterations started per second (open loop)
duration_s = 20.0                         # stops by itself
concurrency = 8                           # at most this many iterations in flight
timeout_s = 15.0                          # per request
[load.params]                             # keyword arguments of the factory
customers = 4

[hypothesis]
max_error_rate = 0.01           # steady state: before the first fault and in the last steady_tail_s
max_p99_ms = 3000.0             # idem
steady_tail_s = 5.0
max_error_rate_during = 0.5     # over the whole load (optional)
max_recovery_s = 20.0           # each fault: from its end until requests succeed again
invariants = ["services.chaos.invariants:invariants"]
settle_timeout_s = 60.0         # invariants are polled until they hold or this passes
baseline_s = 3.0                # before the load: unrecorded windows of this length until one
baseline_timeout_s = 60.0       #   meets max_error_rate (at most this long; 0 s: no baseline)
p99_over_baseline = 3.0         # steady-state p99 limit: max(max_p99_ms, this x baseline p99)

[[faults]]
at_s = 5.0
action = "kill"                 # kill | pause | stop | rpc | proxy
process = "payment-1"           # a process of the manifest, "random" or "random:payment"
```

Fault actions and their keys (`at_s` always; `duration_s` for those that last):

* `kill`: `process`, `signal` (default SIGKILL); the supervisor restarts it.
* `pause`: `process`, `duration_s` (SIGSTOP, then SIGCONT): slow, not dead.
* `stop`: `process`, `duration_s`: stopped (SIGTERM) and held down, then started again
  (e.g. the registry down for longer than a lease).
* `rpc`: `service` (manifest name), `method` (pattern, default every method),
  `delay_s` and/or `abort` (a status code name), `percent` (default 100), `duration_s`:
  through each instance's fault-injection admin RPC, cleared afterwards.
* `proxy`: `proxy` ("postgres" or "nats"), `mode` (latency | reset | blackhole),
  `latency_ms`, `duration_s`: the fault proxy in front of the engine.

The built-in `http` scenario sends one request per iteration: `[load] method`, `path`,
`body` (a table sent as JSON), `headers`, `expect` (statuses counted as success, default
[200]).  `load_experiment(path)` returns frozen objects; every error names the file and key.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ACTIONS",
    "Experiment",
    "ExperimentError",
    "FaultSpec",
    "Hypothesis",
    "LoadSpec",
    "load_experiment",
    "load_experiments",
    "parse_experiment",
]

ACTIONS = ("kill", "pause", "stop", "rpc", "proxy")
BACKENDS = ("sqlite", "postgres")
PROXY_MODES = ("latency", "reset", "blackhole")
SIGNALS = ("SIGKILL", "SIGTERM", "SIGINT", "SIGQUIT", "SIGABRT")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_STATUS_NAMES = (
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)
MAX_DURATION_S = 600.0


class ExperimentError(ValueError):
    """An experiment file is unreadable or invalid; the message names the file and key."""


@dataclass(frozen=True, slots=True)
class LoadSpec:
    scenario: str = "http"
    rate_per_s: float = 2.0
    duration_s: float = 20.0
    concurrency: int = 8
    timeout_s: float = 15.0
    params: Mapping[str, Any] = field(default_factory=dict)
    # the built-in http scenario
    method: str = "GET"
    path: str = "/readyz"
    body: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    expect: tuple[int, ...] = (200,)


@dataclass(frozen=True, slots=True)
class Hypothesis:
    max_error_rate: float = 0.01
    max_p99_ms: float = 5000.0
    steady_tail_s: float = 5.0
    max_error_rate_during: float | None = None
    max_recovery_s: float | None = None
    invariants: tuple[str, ...] = ()
    settle_timeout_s: float = 60.0
    baseline_s: float = 3.0  # 0: no baseline
    baseline_timeout_s: float = 60.0
    p99_over_baseline: float = 3.0


@dataclass(frozen=True, slots=True)
class FaultSpec:
    at_s: float
    action: str
    process: str = ""
    signal: str = "SIGKILL"
    duration_s: float = 0.0
    service: str = ""
    method: str = ""
    delay_s: float = 0.0
    abort: str = ""
    percent: float = 100.0
    proxy: str = ""
    mode: str = ""
    latency_ms: float = 0.0

    @property
    def ends_s(self) -> float:
        return self.at_s + self.duration_s

    def describe(self) -> str:
        if self.action == "kill":
            return f"kill {self.process} ({self.signal})"
        if self.action in ("pause", "stop"):
            return f"{self.action} {self.process} {self.duration_s:g}s"
        if self.action == "rpc":
            what = []
            if self.delay_s:
                what.append(f"delay {self.delay_s:g}s")
            if self.abort:
                what.append(f"abort {self.abort}")
            method = self.method or "*"
            return (
                f"rpc {self.service} {method}: {' + '.join(what)} "
                f"{self.percent:g}% for {self.duration_s:g}s"
            )
        extra = f" {self.latency_ms:g}ms" if self.mode == "latency" else ""
        return f"proxy {self.proxy} {self.mode}{extra} {self.duration_s:g}s"


@dataclass(frozen=True, slots=True)
class Experiment:
    name: str
    path: Path
    load: LoadSpec
    hypothesis: Hypothesis
    faults: tuple[FaultSpec, ...] = ()
    description: str = ""
    backends: tuple[str, ...] = BACKENDS

    def applies_to(self, backend: str) -> bool:
        return backend in self.backends


class _Table:
    """A TOML table being read: typed getters naming the key, unknown keys refused."""

    def __init__(self, where: str, data: object) -> None:
        if not isinstance(data, dict):
            raise ExperimentError(f"[{where}] must be a table")
        self.where = where
        self.data: dict[str, Any] = data
        self.seen: set[str] = set()

    def key(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.seen.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        if isinstance(value, bool) and kind in (int, float):
            raise ExperimentError(f"{self.key(key)} must be a number, got {value!r}")
        if kind is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise ExperimentError(f"{self.key(key)} must be {names}, got {value!r}")
        return value

    def number(
        self, key: str, default: float, low: float, high: float, *, open_low: bool = False
    ) -> float:
        value = float(self.get(key, float, default))
        bad = not math.isfinite(value) or value > high or value < low or (open_low and value == low)
        if bad:
            sign = ">" if open_low else ">="
            raise ExperimentError(
                f"{self.key(key)} must be {sign} {low:g} and <= {high:g}, got {value!r}"
            )
        return value

    def strings(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.get(key, list, list(default))
        if not all(isinstance(v, str) for v in value):
            raise ExperimentError(f"{self.key(key)} must be a list of strings")
        return tuple(value)

    def table(self, key: str) -> _Table:
        self.seen.add(key)
        return _Table(self.key(key), self.data.get(key, {}))

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            where = f"[{self.where}]" if self.where else "the top level"
            raise ExperimentError(f"unknown key(s) in {where}: {', '.join(unknown)}")


def _load(table: _Table) -> LoadSpec:
    scenario = table.get("scenario", str, "http")
    if scenario != "http" and not _REFERENCE.match(scenario):
        raise ExperimentError(
            f'load.scenario must be "http" or package.module:factory, got {scenario!r}'
        )
    params = table.get("params", dict, {})
    body = table.get("body", dict, None)
    headers = table.get("headers", dict, {})
    if not all(isinstance(v, str) for v in headers.values()):
        raise ExperimentError("load.headers values must be strings")
    expect = table.get("expect", list, [200])
    if not expect or not all(isinstance(c, int) and 100 <= c <= 599 for c in expect):
        raise ExperimentError(f"load.expect must list HTTP statuses, got {expect!r}")
    method = table.get("method", str, "GET").upper()
    if method not in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        raise ExperimentError(
            f"load.method must be GET, POST, PUT, PATCH or DELETE, got {method!r}"
        )
    path = table.get("path", str, "/readyz")
    if not path.startswith("/"):
        raise ExperimentError(f"load.path must start with '/', got {path!r}")
    spec = LoadSpec(
        scenario=scenario,
        rate_per_s=table.number("rate_per_s", 2.0, 0.0, 1000.0, open_low=True),
        duration_s=table.number("duration_s", 20.0, 0.0, MAX_DURATION_S, open_low=True),
        concurrency=int(table.number("concurrency", 8, 1, 1000)),
        timeout_s=table.number("timeout_s", 15.0, 0.0, 120.0, open_low=True),
        params=params,
        method=method,
        path=path,
        body=body,
        headers=headers,
        expect=tuple(expect),
    )
    table.done()
    return spec


def _hypothesis(table: _Table) -> Hypothesis:
    invariants = table.strings("invariants")
    for index, ref in enumerate(invariants):
        if not _REFERENCE.match(ref):
            raise ExperimentError(
                f"hypothesis.invariants[{index}] must look like package.module:attribute, "
                f"got {ref!r}"
            )
    during = table.get("max_error_rate_during", float, None)
    recovery = table.get("max_recovery_s", float, None)
    spec = Hypothesis(
        max_error_rate=table.number("max_error_rate", 0.01, 0.0, 1.0),
        max_p99_ms=table.number("max_p99_ms", 5000.0, 0.0, 600_000.0, open_low=True),
        steady_tail_s=table.number("steady_tail_s", 5.0, 0.0, MAX_DURATION_S),
        max_error_rate_during=None
        if during is None
        else table.number("max_error_rate_during", 0, 0, 1),
        max_recovery_s=None if recovery is None else table.number("max_recovery_s", 0, 0, 600),
        invariants=invariants,
        settle_timeout_s=table.number("settle_timeout_s", 60.0, 0.0, 600.0, open_low=True),
        baseline_s=table.number("baseline_s", 3.0, 0.0, 60.0),
        baseline_timeout_s=table.number("baseline_timeout_s", 60.0, 0.0, 600.0, open_low=True),
        p99_over_baseline=table.number("p99_over_baseline", 3.0, 1.0, 100.0),
    )
    table.done()
    return spec


def _fault(table: _Table, duration_s: float) -> FaultSpec:
    action = table.get("action", str, "")
    if action not in ACTIONS:
        raise ExperimentError(
            f"{table.key('action')} must be one of {', '.join(ACTIONS)}, got {action!r}"
        )
    at_s = table.number("at_s", 0.0, 0.0, duration_s)
    lasting = action != "kill"
    if lasting and "duration_s" not in table.data:
        raise ExperimentError(f"{table.key('duration_s')} is required for a {action} fault")
    fault_duration = (
        table.number("duration_s", 0.0, 0.0, MAX_DURATION_S, open_low=lasting)
        if lasting or "duration_s" in table.data
        else 0.0
    )
    spec: dict[str, Any] = {"at_s": at_s, "action": action, "duration_s": fault_duration}
    if action in ("kill", "pause", "stop"):
        process = table.get("process", str, "")
        if not process:
            raise ExperimentError(f"{table.key('process')} names the process ({action})")
        spec["process"] = process
        if action == "kill":
            sig = table.get("signal", str, "SIGKILL").upper()
            if sig not in SIGNALS:
                raise ExperimentError(f"{table.key('signal')} must be one of {', '.join(SIGNALS)}")
            spec["signal"] = sig
    elif action == "rpc":
        spec["service"] = table.get("service", str, "")
        if not spec["service"]:
            raise ExperimentError(f"{table.key('service')} names the service (manifest name)")
        spec["method"] = table.get("method", str, "")
        spec["delay_s"] = table.number("delay_s", 0.0, 0.0, 60.0)
        abort = table.get("abort", str, "").upper()
        if abort and abort not in _STATUS_NAMES:
            raise ExperimentError(f"{table.key('abort')} must be a status code name, got {abort!r}")
        spec["abort"] = abort
        if not abort and not spec["delay_s"]:
            raise ExperimentError(f"[{table.where}] does nothing: set delay_s and/or abort")
        spec["percent"] = table.number("percent", 100.0, 0.0, 100.0, open_low=True)
    else:
        proxy = table.get("proxy", str, "")
        if proxy not in ("postgres", "nats"):
            raise ExperimentError(f'{table.key("proxy")} must be "postgres" or "nats"')
        mode = table.get("mode", str, "")
        if mode not in PROXY_MODES:
            raise ExperimentError(f"{table.key('mode')} must be one of {', '.join(PROXY_MODES)}")
        spec["proxy"], spec["mode"] = proxy, mode
        spec["latency_ms"] = table.number("latency_ms", 0.0, 0.0, 60_000.0)
        if mode == "latency" and not spec["latency_ms"]:
            raise ExperimentError(f"{table.key('latency_ms')} is required for latency mode")
    table.done()
    return FaultSpec(**spec)


def parse_experiment(data: Mapping[str, Any], path: Path) -> Experiment:
    """Validate parsed TOML (`path` names the file in errors and reports)."""
    top = _Table("", dict(data))
    head = top.table("experiment")
    name = head.get("name", str, path.stem)
    if not _NAME.match(name):
        raise ExperimentError(f"experiment.name must be 1-64 of A-Z a-z 0-9 - _, got {name!r}")
    description = head.get("description", str, "")
    backends = head.strings("backends", BACKENDS)
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown or not backends:
        raise ExperimentError(f"experiment.backends must name some of {', '.join(BACKENDS)}")
    head.done()
    load = _load(top.table("load"))
    hypothesis = _hypothesis(top.table("hypothesis"))
    top.seen.add("faults")
    raw_faults = top.data.get("faults", [])
    if not isinstance(raw_faults, list):
        raise ExperimentError("faults must be an array of tables: [[faults]]")
    faults = tuple(
        _fault(_Table(f"faults[{i}]", raw), load.duration_s) for i, raw in enumerate(raw_faults)
    )
    top.done()
    return Experiment(
        name=name,
        path=path,
        load=load,
        hypothesis=hypothesis,
        faults=tuple(sorted(faults, key=lambda f: f.at_s)),
        description=description,
        backends=backends,
    )


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate one experiment file."""
    file = Path(path)
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as error:
        raise ExperimentError(f"cannot read {file}: {error.strerror}") from error
    except tomllib.TOMLDecodeError as error:
        raise ExperimentError(f"{file} is not valid TOML: {error}") from error
    try:
        return parse_experiment(data, file)
    except ExperimentError as error:
        raise ExperimentError(f"{file}: {error}") from None


def load_experiments(paths: list[str | Path]) -> list[Experiment]:
    """Files, and directories (their `*.toml` in name order); names must be unique."""
    found: list[Experiment] = []
    for item in paths:
        p = Path(item)
        files = sorted(p.glob("*.toml")) if p.is_dir() else [p]
        if p.is_dir() and not files:
            raise ExperimentError(f"{p} holds no *.toml experiment")
        found.extend(load_experiment(f) for f in files)
    names = [e.name for e in found]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ExperimentError(f"experiment names must be unique; repeated: {', '.join(repeated)}")
    return found
