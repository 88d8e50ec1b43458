"""`python -m framework up [manifest]`: run a whole system on this machine.

From the manifest (`framework.system.manifest`) it plans one process per registry,
service replica, saga orchestrator and gateway, each with its environment
(`SERVICE_*`, see `framework.system.runtime`), then runs them under the
`Supervisor`: the registry first, then the services (each ready once the registry
lists it as healthy), then the orchestrator and the gateway.  It prints where
things are, then supervises until SIGINT/SIGTERM, and stops everything in reverse
order, each process draining as on SIGTERM.

Keys and tokens (development): `ensure_dev_keys` creates the signing keys in
`<data>/keys` when missing (loudly), and the supervisor mints one workload token
per process into `<data>/tokens/` (mode 0600), re-minted well before they expire,
plus `operator.jwt` for the command line.  Nothing needs a secret typed by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from framework.system.keys import (
    PLATFORM_ISSUER,
    PLATFORM_KID,
    USER_ISSUER,
    KeyFiles,
    TokenFile,
    TokenSigner,
    ensure_dev_keys,
)
from framework.system.manifest import Manifest, ServiceSpec
from framework.system.supervisor import ProcessSpec, Supervisor

__all__ = ["OPERATOR_SCOPES", "SystemPlan", "plan", "run_up"]

logger = logging.getLogger(__name__)

TOKEN_TTL_S = 3600.0
OPERATOR_SCOPES = (
    "operator",
    "registry:read",
    "registry:admin",
    "events:read",
    "sagas:read",
    "sagas:write",
    "users:read",
    "users:admin",
    "orders:read",
    "orders:admin",
    "payments:read",
    "payments:admin",
    "notifications:read",
    "notifications:admin",
    "inventory:read",
    "inventory:write",
)
# Every workload may register itself and watch the registry.
_WORKLOAD_SCOPES = ("registry:register", "registry:read")


def free_port(host: str) -> int:
    """A port free right now on `host` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def port_or_free(host: str, port: int, what: str) -> int:
    """`port` if it can be bound now, else a free one (0: a free one), said in the log."""
    if port:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                chosen = free_port(host)
                logger.warning("%s port %s is taken; using %s", what, port, chosen)
                return chosen
            return port
    return free_port(host)


@dataclass(frozen=True, slots=True)
class Workload:
    """A process's identity: its token file, subject, scopes and registrable names."""

    process: str
    subject: str
    scopes: tuple[str, ...]
    services: tuple[str, ...] = ()

    @property
    def groups(self) -> list[str]:
        """Consumer groups named after the workload's service: `<name>` and `<name>-*`."""
        name = self.subject.partition(":")[2] or self.subject
        return [name, f"{name}-*"]

    def token_path(self, tokens: Path) -> Path:
        return tokens / f"{self.process}.jwt"


@dataclass(frozen=True, slots=True)
class SystemPlan:
    """Everything `up` will start, and where it will be."""

    manifest: Manifest
    registry: str
    gateway_url: str
    keys: KeyFiles
    tokens: Path
    processes: tuple[ProcessSpec, ...]
    workloads: tuple[Workload, ...]
    skipped: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def operator_token(self) -> Path:
        return self.tokens / "operator.jwt"


def _store_env(manifest: Manifest, service: str) -> dict[str, str]:
    if manifest.store.kind == "sqlite":
        return {"SERVICE_STORE": f"sqlite:{manifest.data_dir / f'{service}.sqlite3'}"}
    return {
        "SERVICE_STORE": manifest.store.url,
        "SERVICE_STORE_SCHEMA": f"{manifest.name}_{service}",
    }


def _bus_env(manifest: Manifest) -> dict[str, str]:
    return {
        "SERVICE_BUS": manifest.bus.url,
        "SERVICE_BUS_STREAM": f"{manifest.name.upper()}_EVENTS",
        "SERVICE_BUS_SUBJECT_PREFIX": f"{manifest.name}.events",
    }


def _base_env(environ: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in environ.items() if not k.startswith(("SERVICE_", "SYSTEM_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("GRPC_VERBOSITY", "ERROR")
    return env


def plan(
    manifest: Manifest,
    *,
    python: str = sys.executable,
    environ: Mapping[str, str] | None = None,
) -> SystemPlan:
    """The processes of `manifest` (ports 0 resolved to free ports now)."""
    env0 = _base_env(os.environ if environ is None else environ)
    host = manifest.host
    data = manifest.data_dir
    keys = KeyFiles(data / "keys")
    tokens = data / "tokens"
    registry_port = port_or_free(host, manifest.registry.port, "registry")
    registry = f"{host}:{registry_port}"
    gateway_port = port_or_free(host, manifest.gateway.port, "gateway")
    gateway_url = f"http://{host}:{gateway_port}"
    common = {
        **env0,
        "SERVICE_HOST": host,
        "SERVICE_REGISTRY": registry,
        "SERVICE_JWKS": str(keys.jwks),
        "SERVICE_JWT_AUDIENCE": manifest.name,
        "SERVICE_REGISTRATION_TTL_S": str(manifest.registry.ttl_s),
        **_bus_env(manifest),
    }
    from framework.system import readiness

    processes: list[ProcessSpec] = []
    workloads: list[Workload] = []
    skipped: list[str] = []

    registry_argv = [
        python,
        "-m",
        "framework.registry",
        "serve",
        "--host",
        host,
        "--port",
        str(registry_port),
        "--probe-interval-s",
        str(manifest.registry.probe_interval_s),
        "--jwks",
        str(keys.jwks),
        "--issuer",
        PLATFORM_ISSUER,
        "--audience",
        manifest.name,
        "--grants-claim",
        "services",
    ]
    if manifest.store.kind == "sqlite":
        registry_argv += ["--db", str(data / "registry.sqlite3")]
    else:
        registry_argv += ["--postgres", manifest.store.url, "--schema", f"{manifest.name}_registry"]
    processes.append(
        ProcessSpec(
            "registry",
            tuple(registry_argv),
            env0,
            tier=0,
            ready=readiness.grpc_serving(registry),
        )
    )

    for spec in manifest.services:
        workload_scopes = (*_WORKLOAD_SCOPES, *spec.scopes)
        for replica, instance in enumerate(spec.instance_names(), start=1):
            workload = Workload(instance, f"service:{spec.name}", workload_scopes, spec.registers)
            workloads.append(workload)
            env = {
                **common,
                **_store_env(manifest, spec.name),
                "SERVICE_INSTANCE": instance,
                "SERVICE_PORT": str(spec.port_of(replica)),
                "SERVICE_VERSION": spec.version,
                "SERVICE_TOKEN_FILE": str(workload.token_path(tokens)),
                **_service_extra(spec, keys, data),
                **spec.env,
            }
            processes.append(
                ProcessSpec(
                    instance,
                    (python, "-m", spec.module),
                    env,
                    tier=1,
                    ready=readiness.registered(
                        registry, spec.registers[0], instance, tokens / "operator.jwt"
                    ),
                )
            )

    sagas = manifest.sagas
    if sagas.enabled:
        if not _importable("framework.saga.service"):
            skipped.append("sagas (framework.saga.service is not in this checkout)")
        else:
            workload = Workload(
                "sagas",
                "service:sagas",
                (*_WORKLOAD_SCOPES, *sagas.scopes),
                ("saga.v1.SagaService", "events.v1.EventStoreService"),
            )
            workloads.append(workload)
            env = {
                **common,
                **_store_env(manifest, "sagas"),
                "SERVICE_INSTANCE": "sagas",
                "SERVICE_PORT": str(sagas.port),
                "SERVICE_TOKEN_FILE": str(workload.token_path(tokens)),
                "SAGA_DEFINITIONS": ",".join(sagas.definitions),
                **sagas.env,
            }
            processes.append(
                ProcessSpec(
                    "sagas",
                    (python, "-m", "framework.system.sagas"),
                    env,
                    tier=2,
                    ready=readiness.registered(
                        registry, "saga.v1.SagaService", "sagas", tokens / "operator.jwt"
                    ),
                )
            )

    if manifest.gateway.enabled:
        if not _importable("framework.gateway"):
            skipped.append("gateway (framework.gateway is not in this checkout)")
        else:
            workload = Workload("gateway", "service:gateway", _WORKLOAD_SCOPES)
            workloads.append(workload)
            env = {
                **common,
                "SERVICE_INSTANCE": "gateway",
                "SERVICE_TOKEN_FILE": str(workload.token_path(tokens)),
                "GATEWAY_HOST": host,
                "GATEWAY_PORT": str(gateway_port),
                "GATEWAY_REGISTRY": registry,
                "GATEWAY_AUTH": "jwt",
                "GATEWAY_JWKS_FILE": str(keys.jwks),
                "GATEWAY_JWT_ISSUER": f"{USER_ISSUER},{PLATFORM_ISSUER}",
                "GATEWAY_JWT_AUDIENCE": manifest.name,
                "GATEWAY_SERVICES": ",".join(
                    s
                    for spec in manifest.services
                    for s in spec.registers
                    if not s.startswith("events.")
                ),
                "GATEWAY_TITLE": f"{manifest.name} API",
                **manifest.gateway.env,
            }
            processes.append(
                ProcessSpec(
                    "gateway",
                    (python, "-m", "framework.system.gateway"),
                    env,
                    tier=3,
                    ready=readiness.http_ok(f"{gateway_url}/readyz"),
                )
            )

    return SystemPlan(
        manifest=manifest,
        registry=registry,
        gateway_url=gateway_url,
        keys=keys,
        tokens=tokens,
        processes=tuple(processes),
        workloads=tuple(workloads),
        skipped=tuple(skipped),
    )


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def _service_extra(spec: ServiceSpec, keys: KeyFiles, data: Path) -> dict[str, str]:
    """What one service needs beyond the runtime: the identity service signs tokens; the
    inventory keeps its own SQLite file."""
    if spec.name == "user":
        return {"USER_SIGNING_KEY": str(keys.user_signing)}
    if spec.name == "inventory":
        return {"INVENTORY_DB_PATH": str(data / "inventory.sqlite3")}
    return {}


class TokenMinter:
    """Mints every workload's token and the operator's, and re-mints them before expiry."""

    def __init__(self, system: SystemPlan, *, ttl_s: float = TOKEN_TTL_S) -> None:
        self.system = system
        self.ttl_s = ttl_s
        self.signer = TokenSigner.from_file(
            system.keys.platform_signing,
            kid=PLATFORM_KID,
            issuer=PLATFORM_ISSUER,
            audience=system.manifest.name,
        )

    def mint_all(self) -> None:
        tokens = self.system.tokens
        for workload in self.system.workloads:
            TokenFile(workload.token_path(tokens)).write(
                self.signer.mint(
                    workload.subject,
                    workload.scopes,
                    ttl_s=self.ttl_s,
                    # names it may register; consumer groups it may join (its own name)
                    claims={"services": list(workload.services), "groups": workload.groups},
                )
            )
        TokenFile(self.system.operator_token).write(
            self.signer.mint("operator", OPERATOR_SCOPES, ttl_s=self.ttl_s)
        )

    async def run(self) -> None:
        """Re-mint every third of the lifetime, so a process always holds a valid token."""
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            self.mint_all()


def write_endpoints(system: SystemPlan) -> Path:
    """`<data>/endpoints.json`: where the running system is (the CLI and demo read it)."""
    path = system.manifest.data_dir / "endpoints.json"
    document = {
        "system": system.manifest.name,
        "registry": system.registry,
        "gateway": system.gateway_url,
        "operator_token": str(system.operator_token),
        "pid": str(os.getpid()),
    }
    temporary = path.with_name(f".endpoints-{os.getpid()}.json")
    temporary.write_text(json.dumps(document, indent=2) + "\n")
    temporary.replace(path)
    return path


def announce(system: SystemPlan, out: TextIO) -> None:
    """What a person needs to use the system (and the lines tests parse: `key: value`)."""
    m = system.manifest
    backend = "SQLite files" if m.store.kind == "sqlite" else f"PostgreSQL ({m.store.url})"
    bus = "the event stores (in-process bus)" if m.bus.kind == "store" else f"NATS ({m.bus.url})"
    names = {
        "gateway": system.gateway_url,
        "registry": system.registry,
        "data": str(m.data_dir),
    }
    lines = [
        "",
        f"system {m.name!r} is up: {len(system.processes)} processes",
        f"gateway: {system.gateway_url}",
        f"docs: {system.gateway_url}/docs",
        f"registry: {system.registry}",
        f"data: {m.data_dir}",
        f"operator-token: {system.operator_token}",
        f"  store: {backend}; events: {bus}",
    ]
    for skipped in system.skipped:
        lines.append(f"  not started: {skipped}")
    if m.announce:
        lines.append("")
        lines.extend(line.format_map(names) for line in m.announce)
    lines += ["", "Ctrl-C stops everything (each process drains first).", ""]
    out.write("\n".join(lines) + "\n")
    out.flush()


async def run_up(
    manifest: Manifest,
    *,
    out: TextIO | None = None,
    stop: asyncio.Event | None = None,
    progress: Callable[[str], None] | None = None,
) -> int:
    """Start the system, announce it, supervise until `stop` (or SIGINT/SIGTERM); exit code."""
    out = out or sys.stdout
    manifest.data_dir.mkdir(parents=True, exist_ok=True)
    ensure_dev_keys(manifest.data_dir / "keys")
    system = plan(manifest)
    minter = TokenMinter(system)
    minter.mint_all()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    interrupts = 0

    def on_signal() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            out.write("\nstopping: every process drains, the registry goes last ...\n")
            out.flush()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal)
    supervisor = Supervisor(system.processes, out=out)
    refresher = asyncio.create_task(minter.run(), name="token-refresh")
    try:
        starting = asyncio.create_task(supervisor.start(progress=progress))
        stopped = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if starting in done:
            starting.result()  # StartupError propagates (everything was stopped)
            write_endpoints(system)
            announce(system, out)
            await stop.wait()
        else:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        codes = await supervisor.stop()
        stopped.cancel()
        with contextlib.suppress(OSError):
            (manifest.data_dir / "endpoints.json").unlink()
    finally:
        refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await refresher
        await supervisor.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(sig)
    # uvicorn (the gateway) re-raises the SIGTERM it handled gracefully: that is a clean stop
    clean = (0, None, -signal.SIGTERM, -signal.SIGINT)
    unclean = {n: c for n, c in codes.items() if c not in clean}
    if unclean:
        out.write(f"stopped; not cleanly: {unclean}\n")
        return 1
    out.write("stopped cleanly.\n")
    return 0
