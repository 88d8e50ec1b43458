"""Invariants: what must hold in a system's own stores after an experiment.

An invariant is any object with a `name` and `async check(view) -> InvariantResult`,
reading what it needs through the `SystemView` (each service's database, the
processes, the registry).  Experiments name them as `module:attribute` (an invariant,
a list of them, or a function returning either).  After the load ends and the faults
are undone, `check_invariants` polls them until they all hold or the settle time
passes (a consumer may still be catching up), and reports the last result of each.

Generic invariants for any system built on the framework:

* `SagasSettled(service)`: every saga in the orchestrator's log ended COMPLETED or
  COMPENSATED (none running, compensating or needing attention: none stuck);
* `EventsDeliveredOnce(producer, consumer, group, event_types)`: every stored event
  of those types in the producer's store was applied by the consumer group exactly
  once (the consumer's `processed_events` ledger), and nothing else was;
* `NoDeadLeases()`: every instance the registry holds is served by a live process of
  the system listening on its address, and no process holds two leases of one service.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import sqlite3
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from framework.chaos.system import SystemView, listening_ports
from framework.errors import FrameworkError

__all__ = [
    "EventsDeliveredOnce",
    "Invariant",
    "InvariantResult",
    "NoDeadLeases",
    "SagasSettled",
    "check_invariants",
    "load_invariants",
]

logger = logging.getLogger(__name__)

FINAL_SAGA_EVENTS = ("saga.v1.SagaCompleted", "saga.v1.SagaCompensated")
_SHOWN = 3  # offending items named in a result


def _driver_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [sqlite3.Error]
    try:
        import asyncpg
    except ImportError:  # the postgres extra is not installed: SQLite only
        return tuple(errors)
    return (*errors, asyncpg.PostgresError, asyncpg.InterfaceError)


_DRIVER_ERRORS = _driver_errors()


@dataclass(frozen=True, slots=True)
class InvariantResult:
    name: str
    held: bool
    checked: int  # items it looked at (orders, events, leases, ...)
    detail: str = ""


class Invariant(Protocol):
    name: str

    async def check(self, view: SystemView) -> InvariantResult: ...


def result(name: str, checked: int, problems: Sequence[str], ok: str = "") -> InvariantResult:
    """A result naming the first few problems (and how many there were)."""
    if not problems:
        return InvariantResult(name, True, checked, ok or f"{checked} checked")
    shown = "; ".join(problems[:_SHOWN])
    more = f" (+{len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
    return InvariantResult(name, False, checked, f"{len(problems)} of {checked}: {shown}{more}")


def load_invariants(refs: Iterable[str]) -> list[Invariant]:
    """The invariants named by `module:attribute` references (ValueError naming a bad one)."""
    found: list[Invariant] = []
    for ref in refs:
        module_name, _, attribute = ref.partition(":")
        try:
            value: Any = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"invariants {ref!r}: {error}") from None
        if callable(value) and not hasattr(value, "check"):
            value = value()
        items = list(value) if isinstance(value, list | tuple) else [value]
        for item in items:
            if not (hasattr(item, "check") and isinstance(getattr(item, "name", None), str)):
                raise ValueError(f"invariants {ref!r}: {item!r} has no name and check()")
            found.append(item)
    names = [i.name for i in found]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"invariant names must be unique; repeated: {', '.join(repeated)}")
    return found


async def _check_one(invariant: Invariant, view: SystemView) -> InvariantResult:
    try:
        return await invariant.check(view)
    except asyncio.CancelledError:
        raise
    except (OSError, FrameworkError, grpc.RpcError, KeyError, ValueError, *_DRIVER_ERRORS) as error:
        return InvariantResult(invariant.name, False, 0, f"could not be checked: {error!r}")


async def check_invariants(
    invariants: Sequence[Invariant],
    view: Any,
    *,
    settle_timeout_s: float,
    poll_s: float = 1.0,
) -> tuple[list[InvariantResult], float]:
    """Poll until every invariant holds or `settle_timeout_s` passed; the last results and
    how long it took.  `view` is a `SystemView` or a function returning the current one."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    deadline = began + settle_timeout_s
    while True:
        current = view() if callable(view) else view
        results = [await _check_one(i, current) for i in invariants]
        if all(r.held for r in results) or loop.time() >= deadline:
            return results, loop.time() - began
        await asyncio.sleep(poll_s)


# ---------------------------------------------------------------- generic invariants


class SagasSettled:
    """Every saga in `service`'s saga log ended COMPLETED or COMPENSATED."""

    def __init__(self, service: str = "sagas", name: str = "no-saga-stuck") -> None:
        self.service = service
        self.name = name

    async def check(self, view: SystemView) -> InvariantResult:
        rows = await view.query(
            self.service,
            "SELECT e.stream_id, e.type FROM {events} e WHERE e.aggregate_type = 'Saga'"
            " AND e.version = (SELECT MAX(l.version) FROM {events} l"
            " WHERE l.stream_id = e.stream_id)",
        )
        problems = [
            f"saga {stream} ends with {kind.rsplit('.', 1)[-1]}"
            for stream, kind in rows
            if kind not in FINAL_SAGA_EVENTS
        ]
        return result(self.name, len(rows), problems, f"{len(rows)} sagas, all final")


class EventsDeliveredOnce:
    """Each stored event of `event_types` in `producer`'s store reached `group` exactly once."""

    def __init__(
        self,
        producer: str,
        consumer: str,
        group: str,
        event_types: Sequence[str],
        *,
        table: str = "processed_events",
        name: str = "",
    ) -> None:
        self.producer = producer
        self.consumer = consumer
        self.group = group
        self.event_types = tuple(event_types)
        self.table = table
        self.name = name or f"events-delivered-once:{group}"

    async def check(self, view: SystemView) -> InvariantResult:
        marks = ", ".join("?" for _ in self.event_types)
        stored = await view.query(
            self.producer,
            f"SELECT event_id FROM {{events}} WHERE type IN ({marks})",
            *self.event_types,
        )
        applied = await view.query(
            self.consumer,
            f"SELECT event_id FROM {{{self.table}}} WHERE consumer = ?",
            self.group,
        )
        wanted = {str(r[0]) for r in stored}
        counts = Counter(str(r[0]) for r in applied)
        problems = [f"event {e} never applied" for e in sorted(wanted - set(counts))]
        problems += [f"event {e} applied {n} times" for e, n in sorted(counts.items()) if n > 1]
        problems += [f"event {e} applied but not stored" for e in sorted(set(counts) - wanted)]
        return result(
            self.name,
            len(wanted),
            problems,
            f"{len(wanted)} events, each applied once by {self.group}",
        )


class NoDeadLeases:
    """The registry holds no lease of a dead process, and none twice."""

    name = "no-dead-lease"

    async def check(self, view: SystemView) -> InvariantResult:
        registered = await view.registered()
        processes = {p.name: p for p in view.processes()}
        ports: dict[str, set[int]] = {}
        problems: list[str] = []
        for lease in registered:
            where = f"{lease.service} {lease.instance or '?'} at {lease.address}"
            process = processes.get(lease.instance)
            if process is None or process.pid is None:
                problems.append(f"{where}: no such process running")
                continue
            if lease.instance not in ports:
                ports[lease.instance] = listening_ports(process.pid)
            port = int(lease.address.rsplit(":", 1)[1])
            if port not in ports[lease.instance]:
                problems.append(f"{where}: pid {process.pid} does not listen there (a dead lease)")
        twice = Counter((lease.service, lease.instance) for lease in registered)
        problems += [f"{s} {i}: {n} leases" for (s, i), n in sorted(twice.items()) if n > 1]
        return result(self.name, len(registered), problems, f"{len(registered)} leases, all live")
