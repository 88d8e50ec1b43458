"""`BalancedChannel`: a channel-shaped object that picks an instance per call.

    channel = await balanced_channel("127.0.0.1:50051", "echo.v1.EchoService")
    stub = EchoServiceStub(channel)          # generated stubs work unchanged
    reply = await stub.Echo(EchoRequest(text="hi"))

It follows the service through `Discovery`, keeps one channel per instance
(made by `framework.client.connect`, so the client policy chain runs on every
attempt) and asks its `Pool` for an instance on every call (calls.py: retries
of idempotent calls on another instance, within a retry budget).  An instance
that leaves the view keeps its channel (and its outlier record) for
`close_grace_s`: calls in flight finish, and an instance that comes back in
that time (a health flap) is used again without reconnecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from framework.clock import Clock, SystemClock
from framework.config import ClientConfig
from framework.errors import DeadlineExceededError, UnavailableError
from framework.policy import Policy
from framework.registry.balancer import Balancer, Endpoint, LeastOutstanding, Pool
from framework.registry.budget import RetryBudget, RetryTokens
from framework.registry.calls import StreamStream, StreamUnary, UnaryStream, UnaryUnary
from framework.registry.discovery import Discovery, DiscoveryConfig
from framework.registry.model import MATCH_ALL, Selector, ServiceView
from framework.registry.outlier import OutlierConfig, Probe

logger = logging.getLogger(__name__)

ChannelFactory = Callable[[str], grpc.aio.Channel]


@dataclass(frozen=True, slots=True)
class BalancerConfig:
    """Per-call behaviour of a `BalancedChannel`."""

    # Attempts per idempotent call, each on a different instance (1 = no retry).
    max_attempts: int = 3
    # Retries on other instances spend this budget (None: only max_attempts limits them).
    retry_budget: RetryBudget | None = field(default_factory=RetryBudget)
    # How long a call waits for the registry's first view (never past the call's deadline).
    ready_timeout_s: float = 5.0
    # An instance that left the view keeps its channel this long: calls in flight
    # finish, and if it comes back meanwhile the channel is used again.
    close_grace_s: float = 10.0
    outlier: OutlierConfig = field(default_factory=OutlierConfig)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.ready_timeout_s <= 0:
            raise ValueError(f"ready_timeout_s must be > 0, got {self.ready_timeout_s}")
        if self.close_grace_s < 0:
            raise ValueError(f"close_grace_s must be >= 0, got {self.close_grace_s}")


class BalancedChannel:
    """Implements the grpc.aio.Channel methods stubs use; every call picks an instance."""

    def __init__(
        self,
        discovery: Discovery,
        *,
        balancer: Balancer | None = None,
        config: BalancerConfig | None = None,
        channel_factory: ChannelFactory | None = None,
        rng: random.Random | None = None,
        clock: Clock | None = None,
        probe: Probe | None = None,
    ) -> None:
        """`probe(endpoint, timeout_s)` checks an ejected instance (default: grpc.health.v1)."""
        self.discovery = discovery
        self.config = config or BalancerConfig()
        self.clock = clock or SystemClock()
        self._factory = channel_factory or _default_factory(())
        self.pool = Pool(
            balancer or LeastOutstanding(),
            self.config.outlier,
            self.clock,
            rng or random.Random(),
            probe=probe,
        )
        budget = self.config.retry_budget
        self.retry_tokens: RetryTokens | None = None if budget is None else RetryTokens(budget)
        self.endpoints: dict[str, Endpoint] = {}
        # Instances that left the view: their endpoint and the task closing it later.
        self._parked: dict[str, tuple[Endpoint, asyncio.Task[None]]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._outlier_task: asyncio.Task[None] | None = None
        self._started = False

    # ---------------------------------------------------------- lifecycle
    async def start(self) -> None:
        if not self._started:
            self._started = True
            self.discovery.subscribe(self._on_view)
            self._outlier_task = asyncio.create_task(
                self.pool.outlier.run(), name=f"outliers-{self.discovery.service}"
            )
            await self.discovery.start()

    async def close(self, grace: float | None = None) -> None:
        task, self._outlier_task = self._outlier_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.discovery.close()
        endpoints, self.endpoints = self.endpoints, {}
        parked, self._parked = self._parked, {}
        for endpoint, closer in parked.values():
            closer.cancel()
            endpoints[endpoint.address] = endpoint
        for endpoint in endpoints.values():
            self._close_later(endpoint, grace or 0.0)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def __aenter__(self) -> BalancedChannel:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _close_later(self, endpoint: Endpoint, grace_s: float) -> None:
        task = asyncio.create_task(endpoint.channel.close(grace_s))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_parked(self, address: str) -> None:
        await self.clock.sleep(self.config.close_grace_s)
        parked = self._parked.pop(address, None)
        if parked is not None:
            logger.info("%s did not come back; closing its channel", address)
            await parked[0].channel.close(0)

    def _on_view(self, view: ServiceView) -> None:
        wanted = {i.address: i for i in view.instances}
        for address in [a for a in self.endpoints if a not in wanted]:
            logger.info(
                "%s left %s; keeping its channel %.1fs",
                address,
                view.service,
                self.config.close_grace_s,
            )
            closer = asyncio.create_task(self._close_parked(address))
            self._parked[address] = (self.endpoints.pop(address), closer)
        for address, instance in wanted.items():
            endpoint = self.endpoints.get(address)
            if endpoint is None:
                parked = self._parked.pop(address, None)
                if parked is not None:  # back within close_grace_s: same channel
                    endpoint, closer = parked
                    closer.cancel()
                    endpoint.instance = instance
                    self.endpoints[address] = endpoint
                else:
                    self.endpoints[address] = Endpoint(instance, self._factory(address))
            else:
                endpoint.instance = instance
        self.pool.rebuild(view, list(self.endpoints.values()))

    # ---------------------------------------------------- channel interface
    def unary_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> UnaryUnary:
        return UnaryUnary(self, method, request_serializer, response_deserializer)

    def unary_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> UnaryStream:
        return UnaryStream(self, method, request_serializer, response_deserializer)

    def stream_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> StreamUnary:
        return StreamUnary(self, method, request_serializer, response_deserializer)

    def stream_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> StreamStream:
        return StreamStream(self, method, request_serializer, response_deserializer)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """READY while some instance is known (per-instance channels connect lazily)."""
        if self.endpoints:
            return grpc.ChannelConnectivity.READY
        return grpc.ChannelConnectivity.IDLE

    async def channel_ready(self) -> None:
        await self.discovery.wait_ready(self.config.ready_timeout_s)

    # -------------------------------------------------------------- picking
    @property
    def max_attempts(self) -> int:
        """Attempts per call of an idempotent method (one try plus retries elsewhere)."""
        return self.config.max_attempts

    async def pick(
        self, exclude: Sequence[Endpoint] = (), deadline: float | None = None
    ) -> Endpoint:
        """An instance for one attempt; waits for the first view if none came yet, at
        most `ready_timeout_s` and never past the call's (monotonic) `deadline`."""
        endpoint = self.pool.pick(exclude)
        if endpoint is not None:
            return endpoint
        if self.discovery.view is None:
            await self._first_view(deadline)
            endpoint = self.pool.pick(exclude)
            if endpoint is not None:
                return endpoint
        raise self._no_instance(exclude)

    async def _first_view(self, deadline: float | None) -> None:
        wait_s = self.config.ready_timeout_s
        if deadline is not None and deadline - time.monotonic() < wait_s:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                await self.discovery.wait_ready(remaining)
            except UnavailableError as error:
                raise DeadlineExceededError(
                    f"the call's deadline passed while waiting for the registry's first view "
                    f"of {self.discovery.service!r}; check that the registry is reachable, "
                    "or give the client bootstrap addresses or a view cache",
                    reason="REGISTRY_UNREACHABLE",
                    metadata={"service": self.discovery.service},
                ) from error
            return
        await self.discovery.wait_ready(wait_s)

    def _no_instance(self, exclude: Sequence[Endpoint]) -> UnavailableError:
        service = self.discovery.service
        if exclude:
            message = (
                f"every instance of {service!r} tried for this call failed "
                f"({', '.join(e.address for e in exclude)})"
            )
        elif self.pool.version_weights and self.endpoints:
            message = (
                f"no instance of {service!r} has a version with traffic weight "
                f"{self.pool.version_weights}; deploy one or change the weights"
            )
        else:
            message = f"no healthy instance of {service!r} is registered"
        return UnavailableError(message, reason="NO_INSTANCE", metadata={"service": service})


def _default_factory(policies: Sequence[Policy], **kwargs: Any) -> ChannelFactory:
    def make(address: str) -> grpc.aio.Channel:
        from framework.client import connect

        return connect(address, policies=policies, **kwargs)

    return make


async def balanced_channel(
    registry: str | grpc.aio.Channel,
    service: str,
    *,
    selector: Selector = MATCH_ALL,
    balancer: Balancer | None = None,
    config: BalancerConfig | None = None,
    discovery_config: DiscoveryConfig | None = None,
    policies: Sequence[Policy] = (),
    registry_policies: Sequence[Policy] = (),
    credentials: grpc.ChannelCredentials | None = None,
    client_config: ClientConfig | None = None,
    rng: random.Random | None = None,
    clock: Clock | None = None,
    bootstrap: Sequence[str] = (),
) -> BalancedChannel:
    """A started `BalancedChannel` for `service`, discovered through `registry`.

    `policies` run on every call to an instance; `registry_policies` on the
    registry's Watch stream (e.g. a bearer token with `registry:read`).
    `bootstrap` addresses (and `discovery_config.cache_dir`, the last view kept on
    disk) let the client start while the registry is down.
    """
    discovery = Discovery(
        registry,
        service,
        selector=selector,
        config=discovery_config,
        policies=registry_policies,
        credentials=credentials,
        clock=clock,
        bootstrap=bootstrap,
    )
    channel = BalancedChannel(
        discovery,
        balancer=balancer,
        config=config,
        channel_factory=_default_factory(policies, credentials=credentials, config=client_config),
        rng=rng,
        clock=clock,
    )
    await channel.start()
    return channel
