"""The registry's storage interface, and what every backend shares.

A store keeps instances (keyed by lease id, unique per service and address),
per-service version weights, and one registry-wide revision counter that every
change increments.  Each service remembers the revision of its last change, so
a watcher can tell whether its view is stale and resume from a revision.

Backends: `SqliteStore` (default, one registry process per file) and
`PostgresStore` (several registry replicas share one view).  Both pass the
contract suite in tests/registry/test_store_contract.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from framework.registry.model import Health, Instance, ServiceView


class RegistryStore(Protocol):
    """Durable registry state. Every mutating call that changes something bumps the revision."""

    async def open(self) -> None:
        """Create the schema if needed and connect."""

    async def close(self) -> None: ...

    async def put(self, instance: Instance) -> int | None:
        """Insert, or replace the instance with the same service and address; the revision.

        The replacement happens only when the stored instance has the same owner (or
        none): None, and nothing changed, when another owner holds that address.
        """

    async def get(self, lease_id: str) -> Instance | None: ...

    async def now(self) -> float:
        """The store's clock (epoch seconds), which times leases unless the registry is
        given a clock: the database's on PostgreSQL, so replicas with skewed clocks agree."""

    async def renew(self, lease_id: str, now: float | None) -> Instance | None:
        """Move a lease's expiry to `now` + its TTL if it has not ended by `now` (None: the
        store's clock); the renewed instance, or None when unknown or ended. Not a view change."""

    async def delete(self, lease_id: str) -> Instance | None:
        """Remove an instance; the removed instance, or None when the lease is unknown."""

    async def set_health(self, lease_id: str, health: Health) -> bool:
        """Record a health state; True when it changed (and the revision moved)."""

    async def expire(self, now: float | None) -> list[Instance]:
        """Remove every instance whose lease ended at or before `now` (None: the store's
        clock); the removed ones."""

    async def extend_leases(self, now: float | None) -> int:
        """Make every lease last at least its TTL from `now` (None: the store's clock), as a
        new leader does before its first sweep; how many moved. Not a view change."""

    async def try_lead(self) -> bool:
        """Whether this process is (still) the one that sweeps leases and probes health.

        SQLite: always (one registry process per file). PostgreSQL: the holder of a
        session advisory lock; False when another replica holds it or the lock's
        connection was lost (the lock went with it)."""

    async def resign(self) -> None:
        """Give up leadership (another replica may take it at once)."""

    async def set_version_weights(self, service: str, weights: Mapping[str, int]) -> int: ...

    async def view(self, service: str) -> ServiceView:
        """Every instance of `service` (healthy or not) and its weights, with its revision."""

    async def views(self) -> list[ServiceView]:
        """Every known service's view, sorted by name."""

    async def instances(self) -> list[Instance]:
        """Every instance of every service (for the health checker)."""

    async def revision(self) -> int: ...

    async def service_revisions(self, services: Sequence[str]) -> dict[str, int]:
        """The revision of each named service's last change (unknown services left out)."""

    def on_change(self, listener: ChangeListener) -> None:
        """Call `listener(revision, service)` for every change this process learns of: its
        own writes and (PostgreSQL) other replicas' notifications; `service` None means any
        service may have changed (notifications may have been missed)."""

    @property
    def listening(self) -> bool:
        """Whether every change reaches `on_change` (False while notifications may be lost)."""

    async def relisten(self) -> None:
        """Try to make the change feed reliable again (PostgreSQL: LISTEN once more)."""


ChangeListener = Callable[[int, "str | None"], None]


class ChangeFeed:
    """Fan-out of (revision, service) changes to the listeners of one store."""

    __slots__ = ("_listeners",)

    def __init__(self) -> None:
        self._listeners: list[ChangeListener] = []

    def subscribe(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def publish(self, revision: int, service: str | None) -> None:
        for listener in self._listeners:
            listener(revision, service)


# ------------------------------------------------------------ row conversion

INSTANCE_COLUMNS = (
    "lease_id, service, address, version, zone, weight, metadata, health, expires_at, ttl_s, owner"
)

# Registering the same service and address again replaces the instance (new lease),
# unless another owner holds it: then nothing changes and RETURNING yields no row.
UPSERT_ON_ADDRESS = (
    "ON CONFLICT (service, address) DO UPDATE SET lease_id = excluded.lease_id, "
    "version = excluded.version, zone = excluded.zone, weight = excluded.weight, "
    "metadata = excluded.metadata, health = excluded.health, "
    "expires_at = excluded.expires_at, ttl_s = excluded.ttl_s, owner = excluded.owner "
    "WHERE registry_instances.owner IN ('', excluded.owner) "
    "RETURNING lease_id"
)


def instance_row(i: Instance) -> tuple[Any, ...]:
    """Values in INSTANCE_COLUMNS order."""
    return (
        i.lease_id,
        i.service,
        i.address,
        i.version,
        i.zone,
        i.weight,
        json.dumps(dict(i.metadata), sort_keys=True),
        i.health.value,
        i.expires_at,
        i.ttl_s,
        i.owner,
    )


def instance_from_row(row: Sequence[Any]) -> Instance:
    (
        lease_id,
        service,
        address,
        version,
        zone,
        weight,
        metadata,
        health,
        expires_at,
        ttl_s,
        owner,
    ) = row
    return Instance(
        service=service,
        address=address,
        lease_id=lease_id,
        expires_at=float(expires_at),
        ttl_s=float(ttl_s),
        version=version,
        zone=zone,
        weight=int(weight),
        metadata=json.loads(metadata),
        health=Health(int(health)),
        owner=owner,
    )


def weights_from_json(text: str) -> dict[str, int]:
    return {str(k): int(v) for k, v in json.loads(text).items()}


def weights_to_json(weights: Mapping[str, int]) -> str:
    return json.dumps(dict(weights), sort_keys=True)
