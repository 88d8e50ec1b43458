"""The system manifest: one TOML file naming every process of a system and its settings.

`python -m framework up`, the chaos experiments and deployment generators read the
same file through `load_manifest`, which returns frozen, validated objects and names
the offending key in every error:

```toml
[system]
name = "shop"                 # JWT audience, PostgreSQL schema prefix, NATS stream prefix
data_dir = "data"             # SQLite files, development keys and tokens, relative to the file

[store]
url = "sqlite"                # or postgresql://user@host/db   (env SYSTEM_STORE)
[bus]
url = "store"                 # or nats://host:4222             (env SYSTEM_BUS)

[registry]
port = 50051                  # 0: a free port chosen at start

[gateway]
port = 8080

[sagas]
definitions = ["services.order.saga:definitions"]

[services.payment]
module = "services.payment.main"
replicas = 2
registers = ["payment.v1.PaymentService"]   # gRPC names it may register
scopes = ["users:read"]       # what its workload token may do when it calls others
[services.payment.env]
PAYMENT_FAILURE_RATE = "0.0"
```

Environment variables override a few keys so that the same file serves development
and CI: `SYSTEM_STORE`, `SYSTEM_BUS`, `SYSTEM_DATA_DIR`, `SYSTEM_NAME`,
`SYSTEM_REGISTRY_PORT`, `SYSTEM_GATEWAY_PORT`.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BusSpec",
    "GatewaySpec",
    "Manifest",
    "ManifestError",
    "RegistrySpec",
    "SagaSpec",
    "ServiceSpec",
    "StoreSpec",
    "load_manifest",
    "parse_manifest",
]

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,30}$")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_ENV_KEY = re.compile(r"^[A-Z_][A-Z0-9_]*$")
_SCOPE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_SERVICE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


_TOP_LEVEL = frozenset({"system", "store", "bus", "registry", "gateway", "sagas", "services"})


class ManifestError(ValueError):
    """The manifest is missing, unreadable or invalid; the message names the key."""


@dataclass(frozen=True, slots=True)
class StoreSpec:
    """Where services keep their data: "sqlite" (files in the data dir) or a PostgreSQL URL."""

    url: str = "sqlite"

    @property
    def kind(self) -> str:
        return "sqlite" if self.url == "sqlite" else "postgres"


@dataclass(frozen=True, slots=True)
class BusSpec:
    """How events travel between services: "store" (read from the event store) or NATS."""

    url: str = "store"

    @property
    def kind(self) -> str:
        return "store" if self.url == "store" else "nats"


@dataclass(frozen=True, slots=True)
class RegistrySpec:
    port: int = 50051
    ttl_s: float = 10.0
    probe_interval_s: float = 2.0


@dataclass(frozen=True, slots=True)
class GatewaySpec:
    enabled: bool = True
    port: int = 8080
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SagaSpec:
    """The saga orchestrator: which definitions it runs (`module:attribute` each)."""

    enabled: bool = True
    port: int = 0
    definitions: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """One service: the module run with `python -m`, how many replicas, its settings."""

    name: str
    module: str
    replicas: int = 1
    port: int = 0  # 0: every replica binds a free port and registers it
    version: str = "v1"
    # What its workload token may do when it calls others, and which gRPC service
    # names it may register (the registry refuses any other name).
    scopes: tuple[str, ...] = ()
    registers: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)

    def instance_names(self) -> list[str]:
        return [f"{self.name}-{i}" for i in range(1, self.replicas + 1)]

    def port_of(self, replica: int) -> int:
        """Port of replica `replica` (1-based): consecutive from `port`, or 0."""
        return self.port + replica - 1 if self.port else 0


@dataclass(frozen=True, slots=True)
class Manifest:
    """A whole system, as read from its manifest file."""

    name: str
    path: Path
    data_dir: Path
    host: str = "127.0.0.1"
    store: StoreSpec = field(default_factory=StoreSpec)
    bus: BusSpec = field(default_factory=BusSpec)
    registry: RegistrySpec = field(default_factory=RegistrySpec)
    gateway: GatewaySpec = field(default_factory=GatewaySpec)
    sagas: SagaSpec = field(default_factory=SagaSpec)
    services: tuple[ServiceSpec, ...] = ()
    announce: tuple[str, ...] = ()

    def service(self, name: str) -> ServiceSpec:
        for spec in self.services:
            if spec.name == name:
                return spec
        raise KeyError(f"the manifest has no service {name!r}")


# ---------------------------------------------------------------- reading helpers


class _Table:
    """A TOML table being read: typed getters that name the key in errors, unknown keys refused."""

    def __init__(self, where: str, data: object) -> None:
        if not isinstance(data, dict):
            raise ManifestError(f"[{where}] must be a table")
        self.where = where
        self.data: dict[str, Any] = data
        self.seen: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.seen.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        if isinstance(value, bool) and kind in (int, float):
            raise ManifestError(f"{self._key(key)} must be a number, got {value!r}")
        if kind is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise ManifestError(f"{self._key(key)} must be {names}, got {value!r}")
        return value

    def port(self, key: str, default: int) -> int:
        value: int = self.get(key, int, default)
        if not 0 <= value <= 65535:
            raise ManifestError(f"{self._key(key)} must be 0..65535 (0: a free port), got {value}")
        return value

    def positive(self, key: str, default: float) -> float:
        value: float = self.get(key, float, default)
        if value <= 0:
            raise ManifestError(f"{self._key(key)} must be > 0, got {value}")
        return value

    def strings(self, key: str, pattern: re.Pattern[str] | None = None) -> tuple[str, ...]:
        values = self.get(key, list, [])
        for index, value in enumerate(values):
            if not isinstance(value, str) or (pattern is not None and not pattern.match(value)):
                raise ManifestError(f"{self._key(key)}[{index}] is not valid: {value!r}")
        return tuple(values)

    def env(self) -> dict[str, str]:
        table = _Table(self._key("env"), self.get("env", dict, {}))
        env: dict[str, str] = {}
        for key, value in table.data.items():
            if not _ENV_KEY.match(key):
                raise ManifestError(f"{table.where}: {key!r} is not an environment variable name")
            if isinstance(value, bool):
                value = "1" if value else "0"
            if not isinstance(value, str | int | float):
                raise ManifestError(f"{table.where}.{key} must be a string or number")
            env[key] = str(value)
        return env

    def table(self, key: str) -> _Table:
        return _Table(self._key(key), self.get(key, dict, {}))

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            where = f"[{self.where}]" if self.where else "the top level"
            raise ManifestError(f"unknown key(s) in {where}: {', '.join(unknown)}")


def _store(table: _Table, environ: Mapping[str, str]) -> StoreSpec:
    url = table.get("url", str, "sqlite")
    url = environ.get("SYSTEM_STORE") or url
    table.done()
    if url != "sqlite" and not url.startswith(("postgresql://", "postgres://")):
        raise ManifestError(f"store.url must be 'sqlite' or a postgresql:// URL, got {url!r}")
    return StoreSpec(url)


def _bus(table: _Table, environ: Mapping[str, str]) -> BusSpec:
    url = table.get("url", str, "store")
    url = environ.get("SYSTEM_BUS") or url
    table.done()
    if url != "store" and not url.startswith(("nats://", "tls://")):
        raise ManifestError(f"bus.url must be 'store' or a nats:// URL, got {url!r}")
    return BusSpec(url)


def _port_override(environ: Mapping[str, str], key: str, value: int) -> int:
    raw = environ.get(key)
    if not raw:
        return value
    try:
        port = int(raw)
    except ValueError:
        raise ManifestError(f"{key} must be a port number, got {raw!r}") from None
    if not 0 <= port <= 65535:
        raise ManifestError(f"{key} must be 0..65535, got {port}")
    return port


def _service(name: str, table: _Table) -> ServiceSpec:
    if not _NAME.match(name):
        raise ManifestError(
            f"[services.{name}]: a service name is 1-31 of a-z, 0-9, _ starting with a letter"
        )
    module = table.get("module", str, "")
    if not _MODULE.match(module):
        raise ManifestError(f"services.{name}.module must name a Python module, got {module!r}")
    replicas = table.get("replicas", int, 1)
    if not 1 <= replicas <= 64:
        raise ManifestError(f"services.{name}.replicas must be 1..64, got {replicas}")
    port = table.port("port", 0)
    if port and port + replicas - 1 > 65535:
        raise ManifestError(f"services.{name}: ports {port}..{port + replicas - 1} overflow")
    spec = ServiceSpec(
        name=name,
        module=module,
        replicas=replicas,
        port=port,
        version=table.get("version", str, "v1") or "v1",
        scopes=table.strings("scopes", _SCOPE),
        registers=table.strings("registers", _SERVICE_NAME),
        env=table.env(),
    )
    if not spec.registers:
        raise ManifestError(
            f"services.{name}.registers must list the gRPC services it serves, "
            f'e.g. ["{name}.v1.{name.capitalize()}Service"]'
        )
    table.done()
    return spec


def parse_manifest(
    data: Mapping[str, Any], path: Path, environ: Mapping[str, str] | None = None
) -> Manifest:
    """Validate parsed TOML (`path` locates relative directories)."""
    env = os.environ if environ is None else environ
    top = _Table("", dict(data))
    unknown = sorted(set(top.data) - _TOP_LEVEL)
    if unknown:
        raise ManifestError(f"unknown key(s) in the top level: {', '.join(unknown)}")
    system = top.table("system")
    name = system.get("name", str, "system")
    name = env.get("SYSTEM_NAME") or name
    if not _NAME.match(name):
        raise ManifestError(
            f"system.name must be 1-31 of a-z, 0-9, _ starting with a letter, got {name!r}"
        )
    data_dir = Path(system.get("data_dir", str, "data"))
    data_dir = Path(env["SYSTEM_DATA_DIR"]) if env.get("SYSTEM_DATA_DIR") else data_dir
    if not data_dir.is_absolute():
        data_dir = path.parent / data_dir
    host = system.get("host", str, "127.0.0.1")
    announce = system.strings("announce")
    system.done()

    registry_t = top.table("registry")
    registry = RegistrySpec(
        port=_port_override(env, "SYSTEM_REGISTRY_PORT", registry_t.port("port", 50051)),
        ttl_s=registry_t.positive("ttl_s", 10.0),
        probe_interval_s=registry_t.get("probe_interval_s", float, 2.0),
    )
    registry_t.done()

    gateway_t = top.table("gateway")
    gateway = GatewaySpec(
        enabled=gateway_t.get("enabled", bool, True),
        port=_port_override(env, "SYSTEM_GATEWAY_PORT", gateway_t.port("port", 8080)),
        env=gateway_t.env(),
    )
    gateway_t.done()

    sagas_t = top.table("sagas")
    definitions = sagas_t.strings("definitions")
    for index, spec in enumerate(definitions):
        module, sep, attribute = spec.partition(":")
        if not sep or not _MODULE.match(module) or not attribute.isidentifier():
            raise ManifestError(
                f"sagas.definitions[{index}] must look like package.module:attribute, got {spec!r}"
            )
    sagas = SagaSpec(
        enabled=sagas_t.get("enabled", bool, True),
        port=sagas_t.port("port", 0),
        definitions=definitions,
        scopes=sagas_t.strings("scopes", _SCOPE),
        env=sagas_t.env(),
    )
    sagas_t.done()

    services_t = top.table("services")
    services = tuple(_service(n, services_t.table(n)) for n in services_t.data)
    services_t.seen.update(services_t.data)
    if not services:
        raise ManifestError("the manifest names no service: add a [services.<name>] table")

    manifest = Manifest(
        name=name,
        path=path,
        data_dir=data_dir,
        host=host,
        store=_store(top.table("store"), env),
        bus=_bus(top.table("bus"), env),
        registry=registry,
        gateway=gateway,
        sagas=sagas,
        services=services,
        announce=announce,
    )
    top.done()
    return manifest


def load_manifest(
    path: str | os.PathLike[str] = "system.toml", environ: Mapping[str, str] | None = None
) -> Manifest:
    """Read and validate a manifest file; `ManifestError` says what is wrong and where."""
    file = Path(path).resolve()
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as error:
        raise ManifestError(f"cannot read the manifest {file}: {error.strerror}") from error
    except tomllib.TOMLDecodeError as error:
        raise ManifestError(f"the manifest {file} is not valid TOML: {error}") from error
    try:
        return parse_manifest(data, file, environ)
    except ManifestError as error:
        raise ManifestError(f"{file}: {error}") from None
