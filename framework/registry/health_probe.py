"""Active health checks of registered instances over the standard grpc.health.v1 protocol.

Runs beside the registry, never on a request path, and only on the leading
replica (one prober per instance, so replicas that see an instance differently
never take turns rewriting its health): every `interval_s` it asks each
instance `Check(service="")` with a `timeout_s` deadline.  After
`unhealthy_after` failures in a row an instance is marked NOT_SERVING (and no
longer handed out); `healthy_after` successes in a row mark it SERVING again
(hysteresis; a new, UNKNOWN instance is SERVING after its first success).  Only
changes are written, so a steady fleet causes no store traffic and no watch
events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from framework.clock import Clock
from framework.registry.model import Health, Instance
from framework.registry.store import RegistryStore

logger = logging.getLogger(__name__)

ChannelFactory = Callable[[str], grpc.aio.Channel]


@dataclass(frozen=True, slots=True)
class ProbeConfig:
    """Active health checking; `interval_s=0` turns it off."""

    interval_s: float = 2.0
    timeout_s: float = 1.0
    unhealthy_after: int = 2
    healthy_after: int = 2
    # Health service name asked for; "" is the whole server.
    service: str = ""

    def __post_init__(self) -> None:
        if self.interval_s < 0:
            raise ValueError(
                f"interval_s must be >= 0 (0 turns probing off), got {self.interval_s}"
            )
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.unhealthy_after < 1:
            raise ValueError(f"unhealthy_after must be >= 1, got {self.unhealthy_after}")
        if self.healthy_after < 1:
            raise ValueError(f"healthy_after must be >= 1, got {self.healthy_after}")

    @property
    def enabled(self) -> bool:
        return self.interval_s > 0


def insecure_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address)


class HealthProber:
    """Checks every registered instance and records its health in the store."""

    def __init__(
        self,
        store: RegistryStore,
        config: ProbeConfig,
        *,
        clock: Clock,
        channel_factory: ChannelFactory = insecure_channel,
    ) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        self._channel_factory = channel_factory
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._failures: dict[str, int] = {}
        self._successes: dict[str, int] = {}
        self.rounds = 0  # probe rounds completed (tests wait on it)

    async def run(self) -> None:
        while True:
            try:
                await self.probe_all()
            except Exception:  # the store may be briefly unreachable; probe next period
                logger.exception("registry health probe round failed; retrying next period")
            await self.clock.sleep(self.config.interval_s)

    async def probe_all(self) -> None:
        """One round: check every instance at once, record changes, drop stale channels."""
        instances = await self.store.instances()
        await asyncio.gather(*(self._probe(i) for i in instances))
        live_addresses = {i.address for i in instances}
        live_leases = {i.lease_id for i in instances}
        for address in [a for a in self._channels if a not in live_addresses]:
            await self._channels.pop(address).close()
        for counts in (self._failures, self._successes):
            for lease in [k for k in counts if k not in live_leases]:
                del counts[lease]
        self.rounds += 1

    def forget(self) -> None:
        """Drop the counts (leadership lost: the next leader starts from its own)."""
        self._failures.clear()
        self._successes.clear()

    async def check(self, address: str) -> bool:
        """Whether the server at `address` answers SERVING within the timeout."""
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = self._channel_factory(address)
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=self.config.service),
                timeout=self.config.timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            logger.debug("health check of %s failed: %s", address, error.code().name)
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def _probe(self, instance: Instance) -> None:
        ok = await self.check(instance.address)
        lease = instance.lease_id
        if ok:
            self._failures.pop(lease, None)
            if instance.health is Health.SERVING:
                return
            successes = self._successes[lease] = self._successes.get(lease, 0) + 1
            if instance.health is Health.UNKNOWN or successes >= self.config.healthy_after:
                self._successes.pop(lease, None)
                await self.store.set_health(lease, Health.SERVING)
            return
        self._successes.pop(lease, None)
        failures = self._failures[lease] = self._failures.get(lease, 0) + 1
        if failures >= self.config.unhealthy_after and instance.health is not Health.NOT_SERVING:
            logger.warning(
                "%s at %s failed %d health checks in a row; no longer handed out",
                instance.service,
                instance.address,
                failures,
            )
            await self.store.set_health(lease, Health.NOT_SERVING)

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()
