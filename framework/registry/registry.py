"""The registry's use cases: leases, discovery, watch, version weights.

No grpc here: the servicer (service.py) maps protos to these calls.  Lease
rules are explicit:

* a lease lasts `ttl_s` from registration or from its last renewal, both read
  from the injected clock (wall time, so leases survive a registry restart);
* the sweeper removes expired leases every `sweep_interval_s`, so an instance
  that stops renewing disappears within `ttl_s + sweep_interval_s`;
* renewing an expired (not yet swept) lease fails with NOT_FOUND and removes it:
  the instance must register again (the agent does so by itself);
* a lease belongs to the principal that registered it (`owner`): renewing or
  deregistering it as another principal is PERMISSION_DENIED, and so is
  registering an address of the same service another principal holds.  Callers
  that pass no owner (in-process code, a registry without authentication, an
  admin) are not checked;
* lease ids are bearer secrets of their owner: they are never logged and never
  put in discovery views.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import uuid
from collections.abc import AsyncIterator, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from framework.clock import Clock, SystemClock
from framework.errors import NotFoundError, PermissionDeniedError
from framework.registry.health_probe import (
    ChannelFactory,
    HealthProber,
    ProbeConfig,
    insecure_channel,
)
from framework.registry.model import (
    DEFAULT_WEIGHT,
    MATCH_ALL,
    Instance,
    Selector,
    ServiceView,
    check_address,
    check_address_network,
    check_lease_id,
    check_service_name,
    check_version_weights,
    check_weight,
)
from framework.registry.store import RegistryStore
from framework.registry.watch import WatchHub

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    """Lease limits and background periods (seconds)."""

    default_ttl_s: float = 10.0
    min_ttl_s: float = 1.0
    max_ttl_s: float = 300.0
    sweep_interval_s: float = 1.0
    # While the store may miss changes (PostgreSQL lost its LISTEN connection), how
    # often the watched services' revisions are compared; no polling otherwise.
    watch_poll_s: float = 2.0
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    # Networks registered addresses must lie in (CIDR strings, e.g. "10.0.0.0/8"); the
    # health prober connects to every registered address, so this bounds where it
    # can be sent. Empty: any address. When set, host names are refused (IPs only).
    allowed_networks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 < self.min_ttl_s <= self.default_ttl_s <= self.max_ttl_s:
            raise ValueError(
                "need 0 < min_ttl_s <= default_ttl_s <= max_ttl_s, got "
                f"min_ttl_s={self.min_ttl_s} default_ttl_s={self.default_ttl_s} "
                f"max_ttl_s={self.max_ttl_s}"
            )
        if self.sweep_interval_s <= 0:
            raise ValueError(f"sweep_interval_s must be > 0, got {self.sweep_interval_s}")
        if self.watch_poll_s <= 0:
            raise ValueError(f"watch_poll_s must be > 0, got {self.watch_poll_s}")
        for network in self.allowed_networks:
            try:
                ipaddress.ip_network(network)
            except ValueError:
                raise ValueError(
                    f"allowed_networks entry {network!r} is not a network (e.g. '10.0.0.0/8')"
                ) from None


@dataclass(frozen=True, slots=True)
class ViewUpdate:
    """One message of a watch stream, before it takes its wire form."""

    view: ServiceView  # filtered by the watcher's selector
    base: ServiceView | None  # the view this stream sent before (None: the first)
    # Shared by every watcher of this view with the same selector: build things once.
    memo: dict[Hashable, Any]


@dataclass(frozen=True, slots=True)
class Lease:
    lease_id: str
    ttl_s: float


class Registry:
    """Register, renew, discover and watch instances kept in a `RegistryStore`."""

    def __init__(
        self,
        store: RegistryStore,
        config: RegistryConfig | None = None,
        *,
        clock: Clock | None = None,
        probe_clock: Clock | None = None,
        probe_channel_factory: ChannelFactory | None = None,
    ) -> None:
        """`clock` times leases and sweeps (tests); by default leases follow the store's
        clock. `probe_channel_factory(address)` makes the health checker's channels (e.g.
        mTLS)."""
        self.store = store
        self.config = config or RegistryConfig()
        self.clock = clock or SystemClock()
        self._lease_clock = clock
        self.prober = HealthProber(
            store,
            self.config.probe,
            clock=probe_clock or self.clock,
            channel_factory=probe_channel_factory or insecure_channel,
        )
        self.hub = WatchHub(store, poll_s=self.config.watch_poll_s)
        self._leader_task: asyncio.Task[None] | None = None
        self._prober_task: asyncio.Task[None] | None = None
        self.leading = False
        self.terms = 0  # how many times this registry took the lead

    # ---------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Open the store, try to take the lead (sweeper and prober), keep trying."""
        await self.store.open()
        await self.hub.start()
        await self._lead_once()
        self._leader_task = asyncio.create_task(self._lead(), name="registry-leader")

    async def close(self) -> None:
        task, self._leader_task = self._leader_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._stop_probing()
        self.leading = False
        await self.hub.close()
        await self.prober.close()
        await self.store.close()

    async def stop_leading(self) -> None:
        """Stop sweeping leases and probing (the store stays open): a registry that is
        draining refuses renewals, so sweeping then would expire every lease it holds and
        tell every watcher its instances left.  Found by the chaos experiment
        registry-down; the next registry to lead extends the leases to a full TTL."""
        task, self._leader_task = self._leader_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._stop_probing()
        self.leading = False

    async def on_draining(self, server: object) -> None:
        """Server hook: stop leading once the server drains (see `stop_leading`)."""
        await self.stop_leading()

    async def _lead(self) -> None:
        while True:
            await self.clock.sleep(self.config.sweep_interval_s)
            try:
                await self._lead_once()
            except Exception:  # the store may be briefly unreachable; try next period
                logger.exception("registry lease sweep failed; retrying next period")

    async def _lead_once(self) -> None:
        """One period: keep or take the lead; as leader, sweep expired leases."""
        leading = await self.store.try_lead()
        if leading and not self.leading:
            extended = await self.store.extend_leases(self._lease_time())
            logger.info(
                "this registry leads lease sweeps and health checks; %d leases extended to "
                "a full TTL before the first sweep",
                extended,
            )
            self.leading = True
            self.terms += 1
            if self.config.probe.enabled:
                self._prober_task = asyncio.create_task(self.prober.run(), name="registry-prober")
        elif not leading and self.leading:
            logger.warning("this registry lost the lead; another replica sweeps and probes")
            self.leading = False
            await self._stop_probing()
        if self.leading:
            await self.expire_leases()

    async def _stop_probing(self) -> None:
        task, self._prober_task = self._prober_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.prober.forget()

    def _lease_time(self) -> float | None:
        """Now by the registry's own clock, or None: the store's clock (one round trip less)."""
        return None if self._lease_clock is None else self._lease_clock.now().timestamp()

    async def lease_now(self) -> float:
        """Now, by the clock that times leases."""
        if self._lease_clock is not None:
            return self._lease_clock.now().timestamp()
        return await self.store.now()

    async def expire_leases(self) -> list[Instance]:
        removed = await self.store.expire(self._lease_time())
        for instance in removed:
            logger.info(
                "lease of %s at %s expired; instance removed", instance.service, instance.address
            )
        return removed

    # ------------------------------------------------------------- leases
    def _ttl(self, requested_s: float) -> float:
        if requested_s <= 0:
            return self.config.default_ttl_s
        return min(max(requested_s, self.config.min_ttl_s), self.config.max_ttl_s)

    async def register(
        self,
        service: str,
        address: str,
        *,
        version: str = "",
        zone: str = "",
        weight: int | None = None,
        metadata: Mapping[str, str] | None = None,
        ttl_s: float = 0.0,
        owner: str = "",
    ) -> Lease:
        """Add an instance (replacing one at the same service and address); its lease.

        `owner` is recorded on the lease; PERMISSION_DENIED when another owner
        holds this service and address.
        """
        check_service_name(service)
        check_address(address)
        if self.config.allowed_networks:
            check_address_network(address, self.config.allowed_networks)
        weight = DEFAULT_WEIGHT if weight is None else check_weight(weight)
        ttl = self._ttl(ttl_s)
        instance = Instance(
            service=service,
            address=address,
            lease_id=uuid.uuid4().hex,
            expires_at=await self.lease_now() + ttl,
            ttl_s=ttl,
            version=version,
            zone=zone,
            weight=weight,
            metadata=dict(metadata or {}),
            owner=owner,
        )
        if await self.store.put(instance) is None:
            raise PermissionDeniedError(
                f"{address} is registered under {service} by another principal; "
                "it must deregister first (or its lease expire)",
                reason="INSTANCE_OWNED_BY_OTHER",
                metadata={"service": service, "address": address},
            )
        logger.info("registered %s at %s (version %r, ttl %.1fs)", service, address, version, ttl)
        return Lease(instance.lease_id, ttl)

    async def _owned(self, lease_id: str, owner: str | None) -> Instance:
        """The lease's instance; NOT_FOUND when unknown, PERMISSION_DENIED for another owner."""
        check_lease_id(lease_id)
        current = await self.store.get(lease_id)
        if current is None:
            raise _unknown_lease()
        if owner is not None and current.owner and current.owner != owner:
            raise PermissionDeniedError(
                f"this lease of {current.service} belongs to another principal: only the "
                "instance that registered it (or a registry admin) may renew or deregister it",
                reason="LEASE_NOT_OWNED",
                metadata={"service": current.service},
            )
        return current

    async def renew(self, lease_id: str, *, owner: str | None = None) -> Lease:
        """Push the lease's expiry one TTL ahead; `owner` None skips the ownership check."""
        await self._owned(lease_id, owner)
        renewed = await self.store.renew(lease_id, self._lease_time())
        if renewed is None:  # it ended (the sweeper removes it; registering again replaces it)
            raise _unknown_lease()
        return Lease(lease_id, renewed.ttl_s)

    async def deregister(self, lease_id: str, *, owner: str | None = None) -> Instance:
        """Remove the lease's instance; `owner` None skips the ownership check."""
        await self._owned(lease_id, owner)
        removed = await self.store.delete(lease_id)
        if removed is None:
            raise _unknown_lease()
        logger.info("deregistered %s at %s", removed.service, removed.address)
        return removed

    # ---------------------------------------------------------- discovery
    async def discover(
        self, service: str, selector: Selector = MATCH_ALL, *, include_unhealthy: bool = False
    ) -> ServiceView:
        check_service_name(service)
        view = await self.store.view(service)
        return view.select(selector, include_unhealthy=include_unhealthy)

    async def watch(
        self,
        service: str,
        selector: Selector = MATCH_ALL,
        *,
        after_revision: int = 0,
        include_unhealthy: bool = False,
    ) -> AsyncIterator[ViewUpdate]:
        """The current view (unless the caller has exactly `after_revision`), then one per
        change of this service. The view is read once per change for all its watchers
        (watch.py) and filtered once per distinct selector."""
        check_service_name(service)
        key = (
            selector.version,
            selector.zone,
            tuple(sorted(selector.metadata.items())),
            include_unhealthy,
        )
        base: ServiceView | None = None
        async for publication in self.hub.follow(service):
            memo = publication.memo.get(key)
            if memo is None:
                view = publication.view.select(selector, include_unhealthy=include_unhealthy)
                memo = publication.memo[key] = {"view": view}
            view = memo["view"]
            # A revision other than the caller's (even a lower one: the registry lost
            # its state) is sent; the caller's own is skipped once, at the start.
            if base is None and after_revision and view.revision == after_revision:
                after_revision = 0
                continue
            yield ViewUpdate(view, base, memo)
            base = view

    async def set_weights(self, service: str, version_weights: Mapping[str, int]) -> int:
        """Traffic share per version; an empty mapping clears version routing."""
        check_service_name(service)
        weights = check_version_weights(version_weights)
        revision = await self.store.set_version_weights(service, weights)
        logger.info("version weights of %s set to %s (revision %d)", service, weights, revision)
        return revision

    async def list_services(self) -> list[ServiceView]:
        return await self.store.views()


def _unknown_lease() -> NotFoundError:
    # the id is not repeated: lease ids are their owner's secret and errors get logged
    return NotFoundError(
        "the lease is unknown or has expired; register the instance again",
        reason="LEASE_NOT_FOUND",
    )
