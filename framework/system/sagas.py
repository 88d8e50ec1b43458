"""The saga orchestrator as a process of a system: `python -m framework.system.sagas`.

Composition root (what `python -m framework up` starts): the runtime's database holds
the saga log (`framework.saga` on `framework.events`, SQLite or PostgreSQL); each
participant service is reached through the registry with a balanced channel and this
process's workload token; `saga.v1.SagaService` is served with the system's chain
(auth: `sagas:write` to start, `sagas:read` to read) and registered; the saga log is
published read-only like any service's events.  On start the orchestrator resumes
every unfinished saga.

Environment: the runtime's `SERVICE_*`, plus `SAGA_DEFINITIONS`: comma-separated
`package.module:attribute`, each a `SagaDefinition`, a list of them, or a function
returning either (e.g. `services.order.saga:definitions`).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from framework.health import Check
from framework.server import Server
from framework.system.database import ServiceDatabase
from framework.system.feed import publish_events
from framework.system.runtime import RuntimeConfig, ServiceRuntime

__all__ = ["SERVICE", "SagaProcess", "build", "load_definitions", "main"]

logger = logging.getLogger(__name__)

SERVICE = "saga.v1.SagaService"


def load_definitions(specs: Sequence[str]) -> list[Any]:
    """The definitions named by `module:attribute` specs (ValueError naming a bad one)."""
    from framework.saga.definition import SagaDefinition

    found: list[SagaDefinition] = []
    for spec in specs:
        module_name, _, attribute = spec.partition(":")
        try:
            value: Any = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"saga definitions {spec!r}: {error}") from None
        if callable(value) and not isinstance(value, SagaDefinition):
            value = value()
        items = [value] if isinstance(value, SagaDefinition) else list(value)
        for item in items:
            if not isinstance(item, SagaDefinition):
                raise ValueError(f"saga definitions {spec!r}: {item!r} is not a SagaDefinition")
            found.append(item)
    return found


@dataclass(frozen=True, slots=True)
class SagaProcess:
    server: Server
    orchestrator: Any
    db: ServiceDatabase


async def build(
    config: RuntimeConfig,
    definitions: Sequence[Any] | None = None,
    channels: Mapping[str, Any] | None = None,
) -> SagaProcess:
    """The orchestrator process; `channels` (service -> channel) replaces discovery in tests."""
    from framework.saga import Participants, SagaOrchestrator, saga_types
    from framework.saga.service import SagaServicer

    if definitions is None:
        specs = [s for s in config.extra.get("SAGA_DEFINITIONS", "").split(",") if s]
        definitions = load_definitions(specs)
    if not definitions:
        raise ValueError("no saga definitions: set SAGA_DEFINITIONS (module:attribute, ...)")
    runtime = ServiceRuntime(config)
    db = await runtime.open_database(saga_types())
    services = sorted({s for d in definitions for s in d.services})
    if channels is None:
        channels = {service: await runtime.channel(service) for service in services}
    orchestrator = SagaOrchestrator(db.store, definitions, Participants(channels))
    server = runtime.server(
        health_checks=[Check("database", db.ping, interval_s=5.0, timeout_s=2.0)],
        hooks=[orchestrator],
        closing=[db],
    )
    server.add(SagaServicer(orchestrator))
    publish_events(runtime, server, db)
    runtime.register(server, SERVICE)
    logger.info(
        "saga orchestrator: %s over %s",
        ", ".join(d.name for d in definitions),
        ", ".join(services),
    )
    return SagaProcess(server, orchestrator, db)


async def run(config: RuntimeConfig) -> None:
    process = await build(config)
    await process.server.serve()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(run(RuntimeConfig.from_env("sagas")))


if __name__ == "__main__":
    main()
