"""The system under experiment: a manifest's processes under a supervisor this process owns.

`ChaosSystem` starts what `python -m framework up` starts (same plan, keys and tokens),
in a throwaway data directory and with a name of its own (so PostgreSQL schemas and the
NATS stream are its own), with PostgreSQL and NATS reached through fault proxies on
127.0.0.1.  Faults use its supervisor (kill, pause, stop and release a process), the
fault-injection admin RPC of each instance and the proxies.  Invariants read each
service's own database directly (`SystemView.query`), never through the proxies.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import sqlite3
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

from framework.chaos.proxy import FaultProxy
from framework.system.database import ServiceDatabase
from framework.system.manifest import Manifest, load_manifest

__all__ = [
    "ChaosSystem",
    "Database",
    "ProcessView",
    "RegisteredInstance",
    "SystemView",
    "listening_ports",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Database:
    """A service's own database: a SQLite file, or a PostgreSQL schema (direct DSN)."""

    sqlite_path: str = ""
    dsn: str = ""
    schema: str = ""

    @property
    def postgres(self) -> bool:
        return bool(self.dsn)


@dataclass(frozen=True, slots=True)
class ProcessView:
    name: str
    pid: int | None
    state: str
    restarts: int
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RegisteredInstance:
    service: str
    instance: str
    address: str
    health: str


def listening_ports(pid: int) -> set[int]:
    """TCP ports `pid` listens on (Linux: its socket inodes matched in /proc/net/tcp*)."""
    inodes: set[str] = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = str(fd.readlink())
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    except OSError:
        return set()
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                if len(parts) > 9 and parts[3] == "0A" and parts[9] in inodes:  # 0A: LISTEN
                    ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


class SystemView:
    """What invariants may look at: each service's database, the processes, the registry."""

    def __init__(
        self,
        databases: Mapping[str, Database],
        *,
        processes: Sequence[ProcessView] = (),
        registry: str = "",
        operator_token: str = "",
        manifest: Manifest | None = None,
    ) -> None:
        self.databases = dict(databases)
        self._processes = list(processes)
        self.registry = registry
        self.operator_token = operator_token
        self.manifest = manifest
        self._pg: dict[str, Any] = {}

    # ------------------------------------------------------------ data
    def database(self, service: str) -> Database:
        try:
            return self.databases[service]
        except KeyError:
            known = ", ".join(sorted(self.databases))
            raise KeyError(f"no database for {service!r}; known: {known}") from None

    async def query(self, service: str, sql: str, *params: object) -> list[tuple[Any, ...]]:
        """Rows of a read-only query on `service`'s database, in the services' dialect
        (`?` placeholders, `{table}` names: see `framework.system.database`)."""
        return await self.query_database(self.database(service), sql, *params)

    async def query_database(
        self, db: Database, sql: str, *params: object
    ) -> list[tuple[Any, ...]]:
        text = ServiceDatabase(None, postgres=db.postgres, schema=db.schema).sql(sql)
        if db.postgres:
            conn = self._pg.get(db.dsn)
            if conn is None or conn.is_closed():
                import asyncpg

                conn = self._pg[db.dsn] = await asyncpg.connect(db.dsn, timeout=10)
            rows = await conn.fetch(text, *params, timeout=30)
            return [tuple(r) for r in rows]
        return await asyncio.to_thread(_sqlite_rows, db.sqlite_path, text, params)

    async def close(self) -> None:
        conns, self._pg = self._pg, {}
        for conn in conns.values():
            with contextlib.suppress(OSError):
                await conn.close()

    # ------------------------------------------------------------ processes
    def processes(self) -> list[ProcessView]:
        return list(self._processes)

    # ------------------------------------------------------------ registry
    async def registered(self) -> list[RegisteredInstance]:
        """Every instance the registry holds (healthy or not)."""
        from framework.client import connect
        from framework.registry.model import Health
        from gen.registry.v1 import registry_pb2
        from gen.registry.v1.registry_pb2_grpc import RegistryServiceStub

        metadata = (("authorization", f"Bearer {self.operator_token}"),)
        channel = connect(self.registry)
        try:
            stub = RegistryServiceStub(channel)
            listed = await stub.ListServices(
                registry_pb2.ListServicesRequest(), metadata=metadata, timeout=10
            )
            found: list[RegisteredInstance] = []
            for summary in listed.services:
                view = await stub.Discover(
                    registry_pb2.DiscoverRequest(service=summary.service, include_unhealthy=True),
                    metadata=metadata,
                    timeout=10,
                )
                found.extend(
                    RegisteredInstance(
                        summary.service,
                        i.metadata.get("instance", ""),
                        i.address,
                        Health(int(i.health)).name,
                    )
                    for i in view.instances
                )
            return found
        finally:
            await channel.close()


def _sqlite_rows(path: str, sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
    if not Path(path).exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return [tuple(r) for r in conn.execute(sql, tuple(params)).fetchall()]
    finally:
        conn.close()


def _with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


def _upstream(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"chaos experiments run on 127.0.0.1 only; {url} is elsewhere")
    return host, parts.port or default_port


@dataclass(frozen=True, slots=True)
class ChaosSystemConfig:
    """Which system to run: the manifest, and the engines (default: the manifest's)."""

    manifest: Path
    data_dir: Path
    name: str = ""
    store: str = ""  # "" = the manifest's; "sqlite" or a postgresql:// URL
    bus: str = ""  # "" = the manifest's; "store" or a nats:// URL
    service_env: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    ready_timeout_s: float = 240.0


class ChaosSystem:
    """Start, observe and stop the system of one chaos run (an async context manager)."""

    def __init__(self, config: ChaosSystemConfig, *, out: TextIO) -> None:
        self.config = config
        self.out = out
        self.name = config.name or f"chaos{uuid.uuid4().hex[:8]}"
        self.proxies: dict[str, FaultProxy] = {}
        self.manifest: Manifest | None = None
        self.plan: Any = None
        self.supervisor: Any = None
        self.store_dsn = ""  # the direct PostgreSQL DSN (not through the proxy)
        self.bus_url = ""
        self.view: SystemView | None = None
        self._refresher: asyncio.Task[None] | None = None

    @property
    def backend(self) -> str:
        assert self.manifest is not None
        return "sqlite" if self.manifest.store.kind == "sqlite" else "postgres"

    async def __aenter__(self) -> ChaosSystem:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        from framework.system.keys import ensure_dev_keys
        from framework.system.supervisor import Supervisor
        from framework.system.up import TokenMinter, plan

        cfg = self.config
        base = load_manifest(cfg.manifest)
        store = cfg.store or base.store.url
        bus = cfg.bus or base.bus.url
        env: dict[str, str] = {
            "SYSTEM_DATA_DIR": str(cfg.data_dir),
            "SYSTEM_NAME": self.name,
            "SYSTEM_REGISTRY_PORT": "0",
            "SYSTEM_GATEWAY_PORT": "0",
        }
        if store != "sqlite":
            self.store_dsn = store
            proxy = FaultProxy("postgres", _upstream(store, 5432))
            self.proxies["postgres"] = await proxy.start()
            env["SYSTEM_STORE"] = _with_port(store, proxy.port)
        else:
            env["SYSTEM_STORE"] = "sqlite"
        if bus != "store":
            self.bus_url = bus
            proxy = FaultProxy("nats", _upstream(bus, 4222))
            self.proxies["nats"] = await proxy.start()
            env["SYSTEM_BUS"] = _with_port(bus, proxy.port)
        else:
            env["SYSTEM_BUS"] = "store"
        manifest = load_manifest(cfg.manifest, environ={**os.environ, **env})
        manifest = _with_service_env(manifest, cfg.service_env)
        self.manifest = manifest
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        ensure_dev_keys(manifest.data_dir / "keys")
        self.plan = plan(manifest)
        minter = TokenMinter(self.plan)
        minter.mint_all()
        self._refresher = asyncio.create_task(minter.run(), name="chaos-token-refresh")
        # a process that crashes in native code (a segfault) writes its Python stacks to
        # the system log (kill-notification once crashed the order service with SIGSEGV)
        processes = [
            dataclasses.replace(p, env={"PYTHONFAULTHANDLER": "1", **p.env})
            for p in self.plan.processes
        ]
        self.supervisor = Supervisor(
            processes, out=self.out, color=False, ready_timeout_s=cfg.ready_timeout_s
        )
        await self.supervisor.start()
        self.view = SystemView(
            self._databases(),
            registry=self.plan.registry,
            operator_token=self.operator_token(),
            manifest=manifest,
        )

    def operator_token(self) -> str:
        return str(Path(self.plan.operator_token).read_text().strip())

    @property
    def gateway_url(self) -> str:
        return str(self.plan.gateway_url)

    def _databases(self) -> dict[str, Database]:
        assert self.manifest is not None
        names = [s.name for s in self.manifest.services] + ["sagas"]
        data = self.manifest.data_dir
        if self.manifest.store.kind == "sqlite":
            return {n: Database(sqlite_path=str(data / f"{n}.sqlite3")) for n in names}
        return {n: Database(dsn=self.store_dsn, schema=f"{self.name}_{n}") for n in names}

    def process_env(self, name: str) -> Mapping[str, str]:
        for spec in self.plan.processes:
            if spec.name == name:
                return dict(spec.env)
        raise KeyError(f"no process named {name!r}")

    def processes(self) -> list[ProcessView]:
        envs = {spec.name: spec.env for spec in self.plan.processes}
        return [
            ProcessView(s.name, s.pid, s.state.value, s.restarts, envs.get(s.name, {}))
            for s in self.supervisor.status()
        ]

    def snapshot(self) -> SystemView:
        """The view with the processes as they are now."""
        assert self.view is not None
        self.view._processes = self.processes()
        return self.view

    async def stop(self) -> dict[str, int | None]:
        codes: dict[str, int | None] = {}
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        if self.supervisor is not None:
            for proxy in self.proxies.values():  # a stuck engine must not stop the drain
                proxy.set(_pass())
            codes = await self.supervisor.stop()
        if self.view is not None:
            await self.view.close()
        for proxy in self.proxies.values():
            await proxy.close()
        return codes

    async def drop_data(self) -> None:
        """Drop this run's PostgreSQL schemas and NATS stream (SQLite files stay in data_dir)."""
        if self.store_dsn:
            import asyncpg

            conn = await asyncpg.connect(self.store_dsn)
            try:
                rows = await conn.fetch(
                    "SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", f"{self.name}\\_%"
                )
                for row in rows:
                    await conn.execute(f'DROP SCHEMA IF EXISTS "{row[0]}" CASCADE')
            finally:
                await conn.close()
        if self.bus_url:
            import nats
            from nats.js.errors import NotFoundError as StreamNotFoundError

            nc = await nats.connect(self.bus_url)
            try:
                with contextlib.suppress(StreamNotFoundError):
                    await nc.jetstream().delete_stream(f"{self.name.upper()}_EVENTS")
            finally:
                await nc.close()


def _pass() -> Any:
    from framework.chaos.proxy import ProxyMode

    return ProxyMode.PASS


def _with_service_env(manifest: Manifest, extra: Mapping[str, Mapping[str, str]]) -> Manifest:
    if not extra:
        return manifest
    known = {s.name for s in manifest.services}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise ValueError(f"--service-env names unknown service(s): {', '.join(unknown)}")
    services = tuple(
        dataclasses.replace(s, env={**s.env, **extra.get(s.name, {})}) for s in manifest.services
    )
    return dataclasses.replace(manifest, services=services)
