"""Self-registration: a server hook that keeps its server in the registry.

    server.add_hook(RegistrationAgent("127.0.0.1:50051", "echo.v1.EchoService", version="v2"))

* `on_started`: registers the server's bound address and starts renewing the
  lease every `ttl_s * renew_fraction` seconds;
* a renewal answered NOT_FOUND (the lease expired, or the registry lost it)
  registers again;
* a failed heartbeat (registry down or restarting) is retried quickly, after
  `retry_min_s` doubling up to `retry_max_s` with jitter, for as long as the
  lease may still be alive, then at the renewal period; the calls wait for the
  channel to be ready (within `call_timeout_s`) and the channel's reconnect
  backoff is capped at `retry_max_s`, so the first heartbeat after the registry
  is back goes out within about `retry_max_s` (a restarted registry has given
  every lease a full TTL, so none is lost);
* `on_draining` (the server already answers health NOT_SERVING and still
  accepts calls): stops renewing, deregisters, then holds the drain until no
  call has started for `deregister_wait_s` (at most `deregister_wait_max_s`), so
  that watching clients have seen the instance leave, however long the change
  took to reach them, before the server stops accepting calls. With the default
  `ServerConfig` a rolling restart then fails no call, even a call that is not
  retried (it holds even with `drain_delay_s=0`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from framework.clock import Clock, SystemClock
from framework.errors import FrameworkError, code_of
from framework.policy import Policy
from framework.registry.model import check_service_name, check_weight
from gen.registry.v1 import registry_pb2 as pb
from gen.registry.v1 import registry_pb2_grpc

logger = logging.getLogger(__name__)

_UNSPECIFIED = frozenset({"0.0.0.0", "::", ""})


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """What to register and how often to renew."""

    version: str = ""
    zone: str = ""
    weight: int = 100
    metadata: Mapping[str, str] = field(default_factory=dict)
    ttl_s: float = 10.0
    # Renew after this fraction of the TTL has passed.
    renew_fraction: float = 1 / 3
    # Address to register instead of the server's bound one (e.g. behind NAT).
    advertise_address: str = ""
    call_timeout_s: float = 3.0
    # A failed heartbeat is retried after retry_min_s, doubling up to retry_max_s (with
    # jitter) while the lease may still be alive; later at the renewal period.
    retry_min_s: float = 0.05
    retry_max_s: float = 1.0
    # After deregistering at drain, hold the drain until no call has started for this
    # long (wall time), at most deregister_wait_max_s, before the server stops accepting
    # calls: the registry pushes the change to every watcher and clients stop picking
    # this instance once they have it; calls still arriving say some have not yet (a
    # loaded registry or client). 0 = no wait. A client that does not watch the
    # registry keeps the drain held for deregister_wait_max_s.
    deregister_wait_s: float = 0.25
    deregister_wait_max_s: float = 5.0

    def __post_init__(self) -> None:
        check_weight(self.weight)
        if self.ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {self.ttl_s}")
        if not 0 < self.renew_fraction < 1:
            raise ValueError(f"renew_fraction must be in (0, 1), got {self.renew_fraction}")
        if self.call_timeout_s <= 0:
            raise ValueError(f"call_timeout_s must be > 0, got {self.call_timeout_s}")
        if not 0 <= self.deregister_wait_s <= self.deregister_wait_max_s:
            raise ValueError(
                "need 0 <= deregister_wait_s <= deregister_wait_max_s, got "
                f"deregister_wait_s={self.deregister_wait_s} "
                f"deregister_wait_max_s={self.deregister_wait_max_s}"
            )
        if not 0 < self.retry_min_s <= self.retry_max_s:
            raise ValueError(
                "need 0 < retry_min_s <= retry_max_s, got "
                f"retry_min_s={self.retry_min_s} retry_max_s={self.retry_max_s}"
            )


class RegistrationAgent:
    """Registers a server under `service` while it runs (a `Server` hook)."""

    def __init__(
        self,
        registry: str | grpc.aio.Channel,
        service: str,
        config: AgentConfig | None = None,
        *,
        policies: Sequence[Policy] = (),
        credentials: grpc.ChannelCredentials | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.service = check_service_name(service)
        self.config = config or AgentConfig()
        self.clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self._lease_deadline = 0.0  # monotonic, by self.clock: when the lease ends unrenewed
        self.failures = 0  # failed heartbeats in a row
        self._registry = registry
        self._policies = tuple(policies)
        self._credentials = credentials
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._task: asyncio.Task[None] | None = None
        self.address = ""
        self.lease_id = ""
        self.ttl_s = self.config.ttl_s

    # ------------------------------------------------------------- hooks
    # worker processes (framework.workers): the supervisor registers the server's
    # address once and deregisters it when the whole server drains; workers do not
    def for_worker(self, slot: object) -> None:
        return None

    def for_supervisor(self, supervisor: object) -> RegistrationAgent:
        return self

    async def on_started(self, server: Any) -> None:
        address = self.config.advertise_address or str(server.address)
        host = address.rpartition(":")[0].strip("[]")
        if host in _UNSPECIFIED:
            logger.warning(
                "%s is bound to %s, which clients cannot dial; set "
                "AgentConfig.advertise_address to a reachable host:port",
                self.service,
                address,
            )
        await self.start(address)

    async def on_draining(self, server: Any) -> None:
        if await self.stop() and self.config.deregister_wait_s > 0:
            await self._until_traffic_moved(server)

    async def _until_traffic_moved(self, server: Any) -> None:
        """Hold until no call has started on `server` for deregister_wait_s (bounded).

        Real time, not `self.clock`: this covers the change reaching other processes
        (a ManualClock would never let the drain proceed).  A server that does not
        count its calls (a worker supervisor) is held for deregister_wait_s.
        """
        quiet, loop = self.config.deregister_wait_s, asyncio.get_running_loop()
        counted = getattr(server, "calls_started", None)
        if not isinstance(counted, int):
            await asyncio.sleep(quiet)
            return
        give_up = loop.time() + self.config.deregister_wait_max_s
        step = max(quiet / 5, 0.01)
        seen, quiet_since = counted, loop.time()
        while (now := loop.time()) - quiet_since < quiet:
            if now >= give_up:
                logger.warning(
                    "%s: calls still arrive %.1f s after deregistering; draining anyway "
                    "(a client that does not watch the registry?)",
                    self.service,
                    self.config.deregister_wait_max_s,
                )
                return
            await asyncio.sleep(step)
            if server.calls_started != seen:
                seen, quiet_since = server.calls_started, loop.time()

    async def on_stopped(self, server: Any) -> None:
        await self.stop()

    # --------------------------------------------------------- lifecycle
    async def start(self, address: str) -> None:
        """Register `address` and keep its lease alive until `stop()`."""
        if self._channel is None:
            if isinstance(self._registry, str):
                from framework.client import connect
                from framework.config import ClientConfig

                low = max(1, int(self.config.retry_min_s * 1000))
                high = max(low, int(self.config.retry_max_s * 1000))
                self._channel = connect(
                    self._registry,
                    policies=self._policies,
                    credentials=self._credentials,
                    config=ClientConfig(  # reconnect backoff capped (grpc's grows to 120 s)
                        grpc_options=(
                            ("grpc.initial_reconnect_backoff_ms", low),
                            ("grpc.min_reconnect_backoff_ms", low),
                            ("grpc.max_reconnect_backoff_ms", high),
                        )
                    ),
                )
            else:
                self._channel = self._registry
            self._stub = registry_pb2_grpc.RegistryServiceStub(self._channel)
        self.address = address
        try:
            await self.register(wait_for_ready=False)  # a registry that is down: fail fast
        except (grpc.aio.AioRpcError, FrameworkError) as error:
            self.failures = 1
            logger.warning(
                "could not register %s at %s (%s); retrying in the background",
                self.service,
                address,
                error,
            )
        self._task = asyncio.create_task(self._renew_loop(), name=f"registry-agent-{address}")

    async def stop(self) -> bool:
        """Stop renewing and deregister (once); the registry being down is logged, not raised.

        True when this call deregistered the instance.
        """
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        lease, self.lease_id = self.lease_id, ""
        deregistered = False
        if lease and self._stub is not None:
            try:
                await self._stub.Deregister(
                    pb.DeregisterRequest(lease_id=lease), timeout=self.config.call_timeout_s
                )
                deregistered = True
                logger.info("deregistered %s at %s", self.service, self.address)
            except (grpc.aio.AioRpcError, FrameworkError) as error:
                logger.warning(
                    "could not deregister %s at %s (%s); its lease will expire",
                    self.service,
                    self.address,
                    error,
                )
        if isinstance(self._registry, str) and self._channel is not None:
            await self._channel.close()
        self._channel, self._stub = None, None
        return deregistered

    async def register(self, *, wait_for_ready: bool = True) -> None:
        cfg = self.config
        reply = await self._stub.Register(
            pb.RegisterRequest(
                service=self.service,
                address=self.address,
                version=cfg.version,
                zone=cfg.zone,
                weight=cfg.weight,
                metadata=dict(cfg.metadata),
                ttl_s=cfg.ttl_s,
            ),
            timeout=cfg.call_timeout_s,
            wait_for_ready=wait_for_ready,
        )
        self.lease_id, self.ttl_s = reply.lease_id, reply.ttl_s
        self._lease_deadline = self.clock.monotonic() + reply.ttl_s
        logger.info("registered %s at %s (ttl %.1fs)", self.service, self.address, self.ttl_s)

    async def renew(self) -> None:
        """One heartbeat; registers again when the registry no longer knows the lease."""
        try:
            reply = await self._stub.Renew(
                pb.RenewRequest(lease_id=self.lease_id),
                timeout=self.config.call_timeout_s,
                wait_for_ready=True,
            )
            self._lease_deadline = self.clock.monotonic() + reply.ttl_s
        except (grpc.aio.AioRpcError, FrameworkError) as error:
            if code_of(error) is not grpc.StatusCode.NOT_FOUND:
                raise
            logger.warning(
                "lease of %s at %s was lost; registering again", self.service, self.address
            )
            await self.register()

    def _next_wait(self) -> float:
        """The renewal period, or after a failure a short jittered backoff (while the lease
        may still be alive; the period again once it surely ended)."""
        period = self.ttl_s * self.config.renew_fraction
        if not self.failures:
            return period
        cap = self.config.retry_max_s
        if self.clock.monotonic() >= self._lease_deadline:
            cap = max(cap, period)
        backoff = min(cap, self.config.retry_min_s * 2.0 ** min(self.failures - 1, 30))
        return backoff * (0.5 + 0.5 * self._rng.random())

    async def _renew_loop(self) -> None:
        while True:
            await self.clock.sleep(self._next_wait())
            try:
                if self.lease_id:
                    await self.renew()
                else:
                    await self.register()
            except (grpc.aio.AioRpcError, FrameworkError) as error:
                self.failures += 1
                if self.failures == 1:
                    logger.warning(
                        "registry heartbeat of %s at %s failed (%s); retrying",
                        self.service,
                        self.address,
                        error,
                    )
                continue
            if self.failures:
                logger.info(
                    "registry heartbeat of %s at %s works again after %d failures",
                    self.service,
                    self.address,
                    self.failures,
                )
            self.failures = 0
