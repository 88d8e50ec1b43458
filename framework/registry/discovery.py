"""Client-side discovery: follow a service's Watch stream and keep its last view.

If the registry is unreachable or the stream breaks, the last view stays in
force (clients keep calling the instances they know) while `Discovery`
reconnects with capped exponential backoff, resuming from the last revision it
saw.  Listeners are called synchronously with every new view.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import grpc.aio

from framework.clock import Clock, SystemClock
from framework.errors import FrameworkError, UnavailableError
from framework.policy import Policy
from framework.registry.model import MATCH_ALL, Selector, ServiceView, check_service_name
from framework.registry.wire import selector_to_proto, view_from_proto
from gen.registry.v1 import registry_pb2 as pb
from gen.registry.v1 import registry_pb2_grpc

logger = logging.getLogger(__name__)

Listener = Callable[[ServiceView], None]


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """Reconnect backoff after the registry stream fails (seconds)."""

    reconnect_min_s: float = 0.05
    reconnect_max_s: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ValueError(
                "need 0 < reconnect_min_s <= reconnect_max_s, got "
                f"reconnect_min_s={self.reconnect_min_s} reconnect_max_s={self.reconnect_max_s}"
            )


class Discovery:
    """The live view of one service, from a registry's Watch stream."""

    def __init__(
        self,
        registry: str | grpc.aio.Channel,
        service: str,
        *,
        selector: Selector = MATCH_ALL,
        config: DiscoveryConfig | None = None,
        policies: Sequence[Policy] = (),
        credentials: grpc.ChannelCredentials | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.service = check_service_name(service)
        self.selector = selector
        self.config = config or DiscoveryConfig()
        self.clock = clock or SystemClock()
        self._registry = registry
        self._policies = tuple(policies)
        self._credentials = credentials
        self._channel: grpc.aio.Channel | None = None
        self._owns_channel = False
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self.view: ServiceView | None = None
        self.connected = False

    def subscribe(self, listener: Listener) -> None:
        """Call `listener(view)` on every new view (and now, if one is known)."""
        self._listeners.append(listener)
        if self.view is not None:
            listener(self.view)

    async def start(self) -> None:
        if self._task is not None:
            return
        if isinstance(self._registry, str):
            from framework.client import ClientConfig, connect

            self._channel = connect(
                self._registry,
                policies=self._policies,
                credentials=self._credentials,
                config=ClientConfig(default_timeout_s=None),  # the watch stream is long-lived
            )
            self._owns_channel = True
        else:
            self._channel = self._registry
        self._task = asyncio.create_task(self._follow(), name=f"discovery-{self.service}")

    async def wait_ready(self, timeout_s: float) -> ServiceView:
        """The first view; UnavailableError if none arrives within `timeout_s`."""
        if self.view is None:
            try:
                await asyncio.wait_for(self._ready.wait(), timeout_s)
            except TimeoutError:
                raise UnavailableError(
                    f"no view of {self.service!r} from the registry within {timeout_s:.1f}s; "
                    "check that the registry is running and reachable",
                    reason="REGISTRY_UNREACHABLE",
                ) from None
        assert self.view is not None
        return self.view

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._owns_channel and self._channel is not None:
            await self._channel.close()
        self._channel = None

    def _apply(self, view: ServiceView) -> None:
        self.view = view
        self._ready.set()
        for listener in self._listeners:
            listener(view)

    async def _follow(self) -> None:
        assert self._channel is not None
        stub = registry_pb2_grpc.RegistryServiceStub(self._channel)
        delay = self.config.reconnect_min_s
        while True:
            after = self.view.revision if self.view is not None else 0
            request = pb.WatchRequest(
                service=self.service,
                selector=selector_to_proto(self.selector),
                after_revision=after,
            )
            try:
                async for message in stub.Watch(request, timeout=None):
                    if not self.connected:
                        logger.info("following %s in the registry", self.service)
                    self.connected = True
                    delay = self.config.reconnect_min_s
                    self._apply(view_from_proto(message, self.clock.now().timestamp()))
            except (grpc.aio.AioRpcError, FrameworkError) as error:
                if self.connected:
                    logger.warning(
                        "registry watch of %s failed (%s); serving the last known view",
                        self.service,
                        error,
                    )
            self.connected = False
            await self.clock.sleep(delay)
            delay = min(delay * 2, self.config.reconnect_max_s)
