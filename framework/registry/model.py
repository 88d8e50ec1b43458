"""What the registry knows: instances, leases, per-service views; and input rules.

Plain data, no I/O and no grpc, shared by the stores, the registry and clients.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from framework.errors import FieldViolation, InvalidArgumentError

DEFAULT_WEIGHT = 100
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/]{0,199}$")
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9\-.]{0,251}[A-Za-z0-9])?$")


class Health(enum.Enum):
    """What the registry's active checker last saw; values match registry.v1.Health."""

    UNKNOWN = 0
    SERVING = 1
    NOT_SERVING = 2

    @property
    def eligible(self) -> bool:
        """Whether an instance in this state is handed out to clients."""
        return self is not Health.NOT_SERVING


@dataclass(frozen=True, slots=True)
class Instance:
    """One registered instance; `lease_id` identifies it.

    `owner` names the principal that registered it (`framework.auth` principal key;
    "" when the registry runs without authentication): only the owner, or a
    caller with the registry's admin scope, renews or deregisters the lease.
    Neither the lease id nor the owner is sent to discovery clients.
    """

    service: str
    address: str
    lease_id: str
    expires_at: float  # wall-clock epoch seconds (survives restarts)
    ttl_s: float
    version: str = ""
    zone: str = ""
    weight: int = DEFAULT_WEIGHT
    metadata: Mapping[str, str] = field(default_factory=dict)
    health: Health = Health.UNKNOWN
    owner: str = ""


@dataclass(frozen=True, slots=True)
class Selector:
    """Filter on version, zone and metadata; empty fields match everything."""

    version: str = ""
    zone: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)

    def matches(self, instance: Instance) -> bool:
        if self.version and instance.version != self.version:
            return False
        if self.zone and instance.zone != self.zone:
            return False
        return all(instance.metadata.get(k) == v for k, v in self.metadata.items())


MATCH_ALL = Selector()


@dataclass(frozen=True, slots=True)
class ServiceView:
    """Instances of one service and its version weights, at a registry revision."""

    service: str
    revision: int
    instances: tuple[Instance, ...] = ()
    version_weights: Mapping[str, int] = field(default_factory=dict)

    def select(self, selector: Selector, *, include_unhealthy: bool = False) -> ServiceView:
        """The same view keeping only matching (and, by default, eligible) instances."""
        kept = tuple(
            i
            for i in self.instances
            if selector.matches(i) and (include_unhealthy or i.health.eligible)
        )
        return ServiceView(self.service, self.revision, kept, self.version_weights)


# ---------------------------------------------------------------- input rules


def _bad(field_name: str, message: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        message, violations=[FieldViolation(field_name, message, "invalid")]
    )


def check_service_name(name: str, field_name: str = "service") -> str:
    if not name:
        raise _bad(field_name, f"{field_name} is empty: give the service name, e.g. 'orders'")
    if not _NAME.match(name):
        raise _bad(
            field_name,
            f"{field_name} {name!r} is not a valid service name: use letters, digits, "
            "'.', '_', '-', '/' (at most 200 characters)",
        )
    return name


def check_address(address: str) -> str:
    """Accept 'host:port' (IPv6 as '[::1]:port'); return it unchanged."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise _bad(
            "address",
            f"address {address!r} is malformed: expected 'host:port' with a port "
            "from 1 to 65535, e.g. '10.0.0.5:50051'",
        )
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise _bad("address", f"address {address!r} has a malformed IPv6 host") from None
    elif not _HOST.match(host):
        raise _bad("address", f"address {address!r} has a malformed host {host!r}")
    return address


def check_address_network(address: str, networks: tuple[str, ...]) -> str:
    """Accept an IP address inside one of `networks` (names are refused: they can move)."""
    host = address.rpartition(":")[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise _bad(
            "address",
            f"address {address!r} must be an IP address in {', '.join(networks)}: "
            "this registry does not accept host names",
        ) from None
    if not any(ip in ipaddress.ip_network(n) for n in networks):
        raise _bad(
            "address",
            f"address {address!r} is outside the networks this registry accepts "
            f"({', '.join(networks)})",
        )
    return address


def check_weight(weight: int, field_name: str = "weight") -> int:
    if weight < 0:
        raise _bad(field_name, f"{field_name} is {weight}: weights must be >= 0")
    if weight > 1_000_000:
        raise _bad(field_name, f"{field_name} is {weight}: weights must be <= 1000000")
    return weight


def check_lease_id(lease_id: str) -> str:
    if not lease_id:
        raise _bad("lease_id", "lease_id is empty: give the id Register returned")
    return lease_id


def check_version_weights(weights: Mapping[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for version, weight in weights.items():
        if not version:
            raise _bad("version_weights", "version_weights has an empty version name")
        out[version] = check_weight(weight, f"version_weights[{version}]")
    if out and not any(out.values()):
        raise _bad(
            "version_weights",
            "version_weights are all 0, which would send no traffic at all; "
            "give at least one version a positive weight, or an empty map to clear routing",
        )
    return out
