"""The server the worker process tests and the workers_scaling bench run.

    python -m framework serve tests.framework.workers_app --workers 2
    python -m tests.framework.workers_app 2        # Server(workers=2).serve()

Echo answers `<pid>:<text>` (so a caller sees which worker served it), after spinning
`WORKERS_APP_SPIN_MS` of CPU; EchoStream adds the pid to each message. Settings from the
environment: `SERVICE_*` (ServerConfig.from_env, insecure_dev), `WORKERS_APP_METRICS_PORT`
(a metrics endpoint when set; 0 picks a port, logged), `WORKERS_APP_ACCESS_LOG=1` (the
access log on stderr), `WORKERS_APP_REGISTRY` (register
as `echo.v1.EchoService` with the registry at that address; `WORKERS_APP_DEREGISTER_WAIT_S`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from framework.config import ServerConfig
from framework.server import Server
from framework.telemetry.prometheus import MetricsEndpoint
from framework.telemetry.sdk import Telemetry, TelemetryConfig
from framework.testing.echo import EchoServicer
from gen.echo.v1 import echo_pb2


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


class PidEcho(EchoServicer):
    """Echo that says which process answered."""

    def __init__(self, spin_s: float) -> None:
        super().__init__()
        self.spin_s = spin_s

    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        if self.spin_s > 0:
            _spin(self.spin_s)
        if request.delay_s > 0:
            await asyncio.sleep(request.delay_s)
        return echo_pb2.EchoResponse(text=f"{os.getpid()}:{request.text}")

    async def EchoStream(
        self, request: echo_pb2.EchoRequest, context: Any
    ) -> AsyncIterator[echo_pb2.EchoResponse]:
        for i in range(request.repeat or 1):
            if i and request.delay_s > 0:
                await asyncio.sleep(request.delay_s)
            yield echo_pb2.EchoResponse(text=f"{os.getpid()}:{request.text}#{i}")


def build_server() -> Server:
    env = os.environ
    config = ServerConfig.from_env("workers-app", env)
    policies: list[Any] = []
    hooks: list[object] = []
    metrics_port = env.get("WORKERS_APP_METRICS_PORT")
    if metrics_port is not None:
        telemetry = Telemetry.build(TelemetryConfig(service_name="workers-app"))
        policies = telemetry.policies()
        assert telemetry.metric_reader is not None
        hooks.append(MetricsEndpoint(telemetry.metric_reader, port=int(metrics_port)))
    if env.get("WORKERS_APP_ACCESS_LOG") == "1":
        from framework.policies.accesslog import AccessLogPolicy

        policies.append(AccessLogPolicy())  # JSON lines on stderr
    registry = env.get("WORKERS_APP_REGISTRY")
    if registry:
        from framework.registry.agent import AgentConfig, RegistrationAgent

        hooks.append(RegistrationAgent(registry, "echo.v1.EchoService", AgentConfig(ttl_s=30)))
    server = Server(config, policies=policies, hooks=hooks)
    server.add(PidEcho(float(env.get("WORKERS_APP_SPIN_MS", "0")) / 1000))
    return server


class _CloseStore:
    """Server hook: close a worker's event store once it has drained."""

    def __init__(self, store: Any) -> None:
        self.store = store

    async def on_stopped(self, server: object) -> None:
        await self.store.close()


async def build_events_server() -> Server:
    """`build_server()` plus the event store service on the SQLite file
    `WORKERS_APP_EVENTS_DB` (each worker opens its own connection to the same file)."""
    from framework.events.service import EventStoreServicer
    from framework.events.sqlite import SqliteConfig, SqliteEventStore
    from tests.events.account import account_types

    server = build_server()
    store = await SqliteEventStore.open(
        SqliteConfig(os.environ["WORKERS_APP_EVENTS_DB"], synchronous="NORMAL"), account_types()
    )
    server.add(EventStoreServicer(store))
    server.add_hook(_CloseStore(store))
    return server


async def _main(workers: int) -> None:
    server = build_server()
    server.workers = workers
    await server.serve()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(_main(int(sys.argv[1]) if len(sys.argv) > 1 else 2))
