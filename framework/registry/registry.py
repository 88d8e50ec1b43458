"""The registry's use cases: leases, discovery, watch, version weights.

No grpc here: the servicer (service.py) maps protos to these calls.  Lease
rules are explicit:

* a lease lasts `ttl_s` from registration or from its last renewal, both read
  from the injected clock (wall time, so leases survive a registry restart);
* the sweeper removes expired leases every `sweep_interval_s`, so an instance
  that stops renewing disappears within `ttl_s + sweep_interval_s`;
* renewing an expired (not yet swept) lease fails with NOT_FOUND and removes it:
  the instance must register again (the agent does so by itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from framework.clock import Clock, SystemClock
from framework.errors import NotFoundError
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
    check_lease_id,
    check_service_name,
    check_version_weights,
    check_weight,
)
from framework.registry.store import RegistryStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    """Lease limits and background periods (seconds)."""

    default_ttl_s: float = 10.0
    min_ttl_s: float = 1.0
    max_ttl_s: float = 300.0
    sweep_interval_s: float = 1.0
    # Upper bound between two checks of the store for changes, per watch stream.
    watch_poll_s: float = 2.0
    probe: ProbeConfig = field(default_factory=ProbeConfig)

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
        """`probe_channel_factory(address)` makes the health checker's channels (e.g. mTLS)."""
        self.store = store
        self.config = config or RegistryConfig()
        self.clock = clock or SystemClock()
        self.prober = HealthProber(
            store,
            self.config.probe,
            clock=probe_clock or self.clock,
            channel_factory=probe_channel_factory or insecure_channel,
        )
        self._tasks: list[asyncio.Task[None]] = []

    # ---------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Open the store and start the lease sweeper and the health prober."""
        await self.store.open()
        await self.expire_leases()
        self._tasks.append(asyncio.create_task(self._sweep(), name="registry-sweeper"))
        if self.config.probe.enabled:
            self._tasks.append(asyncio.create_task(self.prober.run(), name="registry-prober"))

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.prober.close()
        await self.store.close()

    async def _sweep(self) -> None:
        while True:
            await self.clock.sleep(self.config.sweep_interval_s)
            try:
                await self.expire_leases()
            except Exception:  # the store may be briefly unreachable; try next period
                logger.exception("registry lease sweep failed; retrying next period")

    async def expire_leases(self) -> list[Instance]:
        removed = await self.store.expire(self.clock.now().timestamp())
        for instance in removed:
            logger.info(
                "lease %s of %s at %s expired; instance removed",
                instance.lease_id,
                instance.service,
                instance.address,
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
    ) -> Lease:
        """Add an instance (replacing one at the same service and address); its lease."""
        check_service_name(service)
        check_address(address)
        weight = DEFAULT_WEIGHT if weight is None else check_weight(weight)
        ttl = self._ttl(ttl_s)
        instance = Instance(
            service=service,
            address=address,
            lease_id=uuid.uuid4().hex,
            expires_at=self.clock.now().timestamp() + ttl,
            ttl_s=ttl,
            version=version,
            zone=zone,
            weight=weight,
            metadata=dict(metadata or {}),
        )
        await self.store.put(instance)
        logger.info(
            "registered %s at %s (version %r, lease %s, ttl %.1fs)",
            service,
            address,
            version,
            instance.lease_id,
            ttl,
        )
        return Lease(instance.lease_id, ttl)

    async def renew(self, lease_id: str) -> Lease:
        check_lease_id(lease_id)
        now = self.clock.now().timestamp()
        current = await self.store.get(lease_id)
        if current is not None and current.expires_at <= now:
            await self.store.delete(lease_id)
            current = None
        if current is None:
            raise _unknown_lease(lease_id)
        renewed = await self.store.renew(lease_id, now + current.ttl_s)
        if renewed is None:  # removed between the two statements
            raise _unknown_lease(lease_id)
        return Lease(lease_id, renewed.ttl_s)

    async def deregister(self, lease_id: str) -> Instance:
        check_lease_id(lease_id)
        removed = await self.store.delete(lease_id)
        if removed is None:
            raise _unknown_lease(lease_id)
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
    ) -> AsyncIterator[ServiceView]:
        """The current view (if newer than `after_revision`), then one per change."""
        check_service_name(service)
        last = after_revision
        seen = await self.store.revision()
        view = await self.store.view(service)
        # First view: sent unless the caller already has exactly this revision. A
        # revision below the caller's means the registry lost its state: send it too.
        if after_revision == 0 or view.revision != after_revision:
            last = view.revision
            yield view.select(selector, include_unhealthy=include_unhealthy)
        while True:
            seen = await self.store.wait_for_change(seen, self.config.watch_poll_s)
            view = await self.store.view(service)
            if view.revision > last:
                last = view.revision
                yield view.select(selector, include_unhealthy=include_unhealthy)

    async def set_weights(self, service: str, version_weights: Mapping[str, int]) -> int:
        """Traffic share per version; an empty mapping clears version routing."""
        check_service_name(service)
        weights = check_version_weights(version_weights)
        revision = await self.store.set_version_weights(service, weights)
        logger.info("version weights of %s set to %s (revision %d)", service, weights, revision)
        return revision

    async def list_services(self) -> list[ServiceView]:
        return await self.store.views()


def _unknown_lease(lease_id: str) -> NotFoundError:
    return NotFoundError(
        f"lease {lease_id!r} is unknown or has expired; register the instance again",
        reason="LEASE_NOT_FOUND",
        metadata={"lease_id": lease_id},
    )
