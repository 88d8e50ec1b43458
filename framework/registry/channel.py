"""`BalancedChannel`: a channel-shaped object that picks an instance per call.

    channel = await balanced_channel("127.0.0.1:50051", "echo.v1.EchoService")
    stub = EchoServiceStub(channel)          # generated stubs work unchanged
    reply = await stub.Echo(EchoRequest(text="hi"))

It follows the service through `Discovery`, keeps one channel per instance
(made by `framework.client.connect`, so the client policy chain runs on every
attempt) and asks its `Pool` for an instance on every call.  A call to an
idempotent method (the contract's `idempotent` option) that fails with
UNAVAILABLE (or is cancelled by a stopping server) before any response is
retried on another instance, up to
`max_attempts` and within the caller's timeout.  An instance that leaves the
view gets `close_grace_s` for its calls in flight before its channel closes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from framework.clock import Clock, SystemClock
from framework.errors import FrameworkError, UnavailableError, code_of
from framework.policy import Method, Policy
from framework.registry.balancer import Balancer, Endpoint, OutlierConfig, Pool, RoundRobin
from framework.registry.discovery import Discovery, DiscoveryConfig
from framework.registry.model import MATCH_ALL, Selector, ServiceView

logger = logging.getLogger(__name__)

ChannelFactory = Callable[[str], grpc.aio.Channel]
# Outcomes after which an idempotent call is tried on another instance: the instance
# is unreachable or refusing, or it stopped and cancelled the call (our own task being
# cancelled raises asyncio.CancelledError instead and is never retried).
_RETRY_ON = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


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
    ) -> _UnaryUnary:
        return _UnaryUnary(self, method, request_serializer, response_deserializer)

    def unary_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> _UnaryStream:
        return _UnaryStream(self, method, request_serializer, response_deserializer)

    def stream_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> _StreamUnary:
        return _StreamUnary(self, method, request_serializer, response_deserializer)

    def stream_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> _StreamStream:
        return _StreamStream(self, method, request_serializer, response_deserializer)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        if self.pool.pick() is not None:
            return grpc.ChannelConnectivity.READY
        return grpc.ChannelConnectivity.IDLE

    async def channel_ready(self) -> None:
        await self.discovery.wait_ready(self.config.ready_timeout_s)

    # -------------------------------------------------------------- picking
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


class _Multicallable:
    __slots__ = ("_attempts", "_deserializer", "_method", "_owner", "_serializer")
    kind = ""

    def __init__(
        self, owner: BalancedChannel, method: str, serializer: Any, deserializer: Any
    ) -> None:
        self._owner = owner
        self._method = method
        self._serializer = serializer
        self._deserializer = deserializer
        idempotent = Method.resolve(method).policy.idempotent
        self._attempts = owner.config.max_attempts if idempotent else 1

    def _target(self, endpoint: Endpoint) -> Any:
        return endpoint.callable(self.kind, self._method, self._serializer, self._deserializer)


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.001, deadline - time.monotonic())


class _UnaryUnary(_Multicallable):
    __slots__ = ()
    kind = "unary_unary"

    def __call__(self, request: Any, *, timeout: float | None = None, **kwargs: Any) -> Any:
        return self._invoke(request, timeout, kwargs)

    async def _invoke(self, request: Any, timeout: float | None, kwargs: dict[str, Any]) -> Any:
        owner = self._owner
        deadline = None if timeout is None else time.monotonic() + timeout
        tried: list[Endpoint] = []
        while True:
            endpoint = await owner.pick(tried)
            endpoint.outstanding += 1
            try:
                response = await self._target(endpoint)(
                    request, timeout=_remaining(deadline), **kwargs
                )
            except (grpc.aio.AioRpcError, FrameworkError) as error:
                code = code_of(error)
                owner.pool.observe(endpoint, code)
                tried.append(endpoint)
                if (
                    code in _RETRY_ON
                    and len(tried) < self._attempts
                    and (deadline is None or time.monotonic() < deadline)
                ):
                    continue
                raise
            finally:
                endpoint.outstanding -= 1
            owner.pool.observe(endpoint, grpc.StatusCode.OK)
            return response


class _UnaryStream(_Multicallable):
    __slots__ = ()
    kind = "unary_stream"

    def __call__(
        self, request: Any, *, timeout: float | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        return self._invoke(request, timeout, kwargs)

    async def _invoke(
        self, request: Any, timeout: float | None, kwargs: dict[str, Any]
    ) -> AsyncIterator[Any]:
        owner = self._owner
        deadline = None if timeout is None else time.monotonic() + timeout
        tried: list[Endpoint] = []
        while True:
            endpoint = await owner.pick(tried)
            received = False
            endpoint.outstanding += 1
            try:
                call = self._target(endpoint)(request, timeout=_remaining(deadline), **kwargs)
                async for response in call:
                    received = True
                    yield response
            except (grpc.aio.AioRpcError, FrameworkError) as error:
                code = code_of(error)
                owner.pool.observe(endpoint, code)
                tried.append(endpoint)
                if (
                    code in _RETRY_ON
                    and not received
                    and len(tried) < self._attempts
                    and (deadline is None or time.monotonic() < deadline)
                ):
                    continue
                raise
            finally:
                endpoint.outstanding -= 1
            owner.pool.observe(endpoint, grpc.StatusCode.OK)
            return


class _StreamUnary(_Multicallable):
    """Request streams cannot be replayed: one attempt, on one picked instance."""

    __slots__ = ()
    kind = "stream_unary"

    def __call__(self, request_iterator: Any = None, **kwargs: Any) -> Any:
        return self._invoke(request_iterator, kwargs)

    async def _invoke(self, request_iterator: Any, kwargs: dict[str, Any]) -> Any:
        owner = self._owner
        endpoint = await owner.pick()
        endpoint.outstanding += 1
        try:
            response = await self._target(endpoint)(request_iterator, **kwargs)
        except (grpc.aio.AioRpcError, FrameworkError) as error:
            owner.pool.observe(endpoint, code_of(error))
            raise
        finally:
            endpoint.outstanding -= 1
        owner.pool.observe(endpoint, grpc.StatusCode.OK)
        return response


class _StreamStream(_Multicallable):
    __slots__ = ()
    kind = "stream_stream"

    def __call__(self, request_iterator: Any = None, **kwargs: Any) -> AsyncIterator[Any]:
        return self._invoke(request_iterator, kwargs)

    async def _invoke(self, request_iterator: Any, kwargs: dict[str, Any]) -> AsyncIterator[Any]:
        owner = self._owner
        endpoint = await owner.pick()
        endpoint.outstanding += 1
        try:
            async for response in self._target(endpoint)(request_iterator, **kwargs):
                yield response
        except (grpc.aio.AioRpcError, FrameworkError) as error:
            owner.pool.observe(endpoint, code_of(error))
            raise
        finally:
            endpoint.outstanding -= 1
        owner.pool.observe(endpoint, grpc.StatusCode.OK)


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
        channel_factory=_default_factory(policies, credentials=credentials),
        rng=rng,
        clock=clock,
    )
    await channel.start()
    return channel
