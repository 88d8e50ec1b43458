"""`BalancedChannel`: a channel-shaped object that picks an instance per call.

    channel = await balanced_channel("127.0.0.1:50051", "echo.v1.EchoService")
    stub = EchoServiceStub(channel)          # generated stubs work unchanged
    reply = await stub.Echo(EchoRequest(text="hi"))

It follows the service through `Discovery`, keeps one channel per instance
(made by `framework.client.connect`, so the client policy chain runs on every
attempt) and asks its `Pool` for an instance on every call (calls.py: retries
of idempotent calls on another instance).  An instance that leaves the view
gets `close_grace_s` for its calls in flight before its channel closes.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from framework.clock import Clock, SystemClock
from framework.config import ClientConfig
from framework.errors import UnavailableError
from framework.policy import Policy
from framework.registry.balancer import Balancer, Endpoint, OutlierConfig, Pool, RoundRobin
from framework.registry.calls import StreamStream, StreamUnary, UnaryStream, UnaryUnary
from framework.registry.discovery import Discovery, DiscoveryConfig
from framework.registry.model import MATCH_ALL, Selector, ServiceView

logger = logging.getLogger(__name__)

ChannelFactory = Callable[[str], grpc.aio.Channel]


@dataclass(frozen=True, slots=True)
class BalancerConfig:
    """Per-call behaviour of a `BalancedChannel`."""

    # Attempts per idempotent call, each on a different instance (1 = no retry).
    max_attempts: int = 3
    # How long the first call waits for the registry's first view.
    ready_timeout_s: float = 5.0
    # Calls in flight on an instance that left the view get this long to finish.
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
    ) -> None:
        self.discovery = discovery
        self.config = config or BalancerConfig()
        self.clock = clock or SystemClock()
        self._factory = channel_factory or _default_factory(())
        self.pool = Pool(
            balancer or RoundRobin(), self.config.outlier, self.clock, rng or random.Random()
        )
        self.endpoints: dict[str, Endpoint] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._started = False

    # ---------------------------------------------------------- lifecycle
    async def start(self) -> None:
        if not self._started:
            self._started = True
            self.discovery.subscribe(self._on_view)
            await self.discovery.start()

    async def close(self, grace: float | None = None) -> None:
        await self.discovery.close()
        endpoints, self.endpoints = self.endpoints, {}
        for endpoint in endpoints.values():
            self._close_later(endpoint, grace or 0.0)
        if self._closing:
            await asyncio.gather(*self._closing)

    async def __aenter__(self) -> BalancedChannel:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _close_later(self, endpoint: Endpoint, grace_s: float) -> None:
        task = asyncio.create_task(endpoint.channel.close(grace_s))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _on_view(self, view: ServiceView) -> None:
        wanted = {i.address: i for i in view.instances}
        for address in [a for a in self.endpoints if a not in wanted]:
            logger.info("%s left %s; closing its channel", address, view.service)
            self._close_later(self.endpoints.pop(address), self.config.close_grace_s)
        for address, instance in wanted.items():
            endpoint = self.endpoints.get(address)
            if endpoint is None:
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

    async def pick(self, exclude: Sequence[Endpoint] = ()) -> Endpoint:
        """An instance for one attempt; waits for the first view if none came yet."""
        endpoint = self.pool.pick(exclude)
        if endpoint is not None:
            return endpoint
        if self.discovery.view is None:
            await self.discovery.wait_ready(self.config.ready_timeout_s)
            endpoint = self.pool.pick(exclude)
            if endpoint is not None:
                return endpoint
        raise self._no_instance(exclude)

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
) -> BalancedChannel:
    """A started `BalancedChannel` for `service`, discovered through `registry`.

    `policies` run on every call to an instance; `registry_policies` on the
    registry's Watch stream (e.g. a bearer token with `registry:read`).
    """
    discovery = Discovery(
        registry,
        service,
        selector=selector,
        config=discovery_config,
        policies=registry_policies,
        credentials=credentials,
        clock=clock,
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
