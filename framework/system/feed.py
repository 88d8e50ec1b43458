"""Events between the services of a system: publishing a service's events, consuming another's.

Two buses, chosen by the system's configuration (`SERVICE_BUS`):

* `store` (embedded default): the producing service serves its own event store over
  gRPC (`events.v1.EventStoreService`, registered with metadata `service=<name>`);
  a consumer group is a durable cursor in that store, and consumers in other
  processes join it through the `Subscribe` stream (`RemoteSubscription`);
* `nats://...`: the producer's outbox relay publishes its events to JetStream, and
  consumer groups are durable JetStream consumers.

Either way the consumer runs `framework.events.consume` with an `IdempotentHandler`,
so an event redelivered after a crash is applied once; `EventFeed` reconnects with
backoff whenever the subscription breaks (the producer restarted, NATS went away).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from framework.errors import FrameworkError, PermissionDeniedError, UnavailableError
from framework.events.consumer import IdempotentHandler, consume
from framework.events.service import EventStoreServicer
from framework.server import Server
from framework.system.database import ServiceDatabase
from framework.system.runtime import ServiceRuntime
from gen.events.v1 import store_pb2
from gen.events.v1.envelope_pb2 import EventEnvelope

__all__ = [
    "EVENT_STORE_SERVICE",
    "EventFeed",
    "ProjectionHook",
    "PublishedEventStore",
    "publish_events",
]

logger = logging.getLogger(__name__)

EVENT_STORE_SERVICE = "events.v1.EventStoreService"


class PublishedEventStore(EventStoreServicer):
    """A service's event store as others may see it: read and subscribe, never append.

    Only the owning service writes its events (through its aggregates); `Append`
    from outside is PERMISSION_DENIED whatever the caller's scopes.
    """

    async def Append(  # noqa: N802
        self, request: store_pb2.AppendRequest, context: Any
    ) -> store_pb2.AppendResponse:
        raise PermissionDeniedError(
            "this event store is published read-only: only its service appends events",
            reason="APPEND_NOT_ALLOWED",
        )


def publish_events(runtime: ServiceRuntime, server: Server, db: ServiceDatabase) -> Any:
    """Make `db`'s events available to other services; returns the bus the store serves.

    Always serves the store read-only (for `store` consumers and `events tail`); with a
    NATS bus also runs an outbox relay to JetStream while the server runs.
    """
    from framework.events.consumer_group import StoreBus

    bus = StoreBus(db.store)
    server.add(PublishedEventStore(db.store, bus=bus))
    runtime.register(server, EVENT_STORE_SERVICE)
    runtime.close_on_stop(bus)
    if runtime.config.bus_url.startswith(("nats://", "tls://")):
        relay = _Relay(runtime, db)
        server.add_hook(relay)
        runtime.close_on_stop(relay)
    return bus


def _jetstream_config(runtime: ServiceRuntime) -> Any:
    from framework.events.nats import JetStreamConfig

    return JetStreamConfig(
        stream=runtime.config.bus_stream, subject_prefix=runtime.config.bus_subject_prefix
    )


class _Relay:
    """Server hook: the outbox relay from the service's store to JetStream."""

    def __init__(self, runtime: ServiceRuntime, db: ServiceDatabase) -> None:
        self.runtime = runtime
        self.db = db
        self._relay: Any = None
        self._bus: Any = None

    async def on_started(self, server: Server) -> None:
        from framework.events.nats import JetStreamBus
        from framework.events.relay import OutboxRelay, RelayConfig

        self._bus = await JetStreamBus.connect(
            self.runtime.config.bus_url, _jetstream_config(self.runtime)
        )
        name = self.runtime.config.name
        self._relay = OutboxRelay(self.db.store, self._bus, RelayConfig(name=name))
        await self._relay.start()

    async def close(self) -> None:
        """Called by the runtime after the drain, before the database closes."""
        relay, self._relay = self._relay, None
        bus, self._bus = self._bus, None
        if relay is not None:
            await relay.close()
        if bus is not None:
            await bus.close()


Apply = Callable[[Any, EventEnvelope], Awaitable[None]]


class EventFeed:
    """Server hook: consume `event_types` of the `source` service as consumer `group`.

    `apply(tx, envelope)` changes the consumer's own database inside the transaction
    in which the event is marked processed (`IdempotentHandler`).
    """

    def __init__(
        self,
        runtime: ServiceRuntime,
        db: ServiceDatabase,
        *,
        group: str,
        source: str,
        event_types: Sequence[str],
        apply: Apply,
        retry_delay_s: float = 0.5,
        reconnect_max_s: float = 5.0,
    ) -> None:
        self.runtime = runtime
        self.db = db
        self.group = group
        self.source = source
        self.event_types = tuple(event_types)
        self.retry_delay_s = retry_delay_s
        self.reconnect_max_s = reconnect_max_s
        table = f"{db.schema}.processed_events" if db.postgres else "processed_events"
        self.handler: IdempotentHandler[Any] = IdempotentHandler(
            db.store,  # type: ignore[arg-type]
            group,
            apply,
            table=table,
            paramstyle="asyncpg" if db.postgres else "qmark",
        )
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    async def on_started(self, server: Server) -> None:
        await self.handler.setup()
        self._task = asyncio.create_task(self._run(), name=f"feed-{self.group}")

    async def on_draining(self, server: Server) -> None:
        await self.stop()

    async def on_stopped(self, server: Server) -> None:
        await self.stop()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _open(self) -> Any:
        if self.runtime.config.bus_url.startswith(("nats://", "tls://")):
            from framework.events.nats import JetStreamBus

            bus = await JetStreamBus.connect(
                self.runtime.config.bus_url, _jetstream_config(self.runtime)
            )
            try:
                subscription = await bus.subscribe(self.group, event_types=self.event_types)
            except BaseException:
                await bus.close()
                raise
            return _Owned(subscription, bus)
        from framework.events.consumer_grpc import RemoteSubscription

        # a subscription is one stream to one instance: resolve it, then connect directly
        addresses = await self.runtime.resolve(
            EVENT_STORE_SERVICE, metadata={"service": self.source}
        )
        if not addresses:
            raise UnavailableError(
                f"no instance of {self.source}'s event store is registered yet",
                reason="NO_INSTANCE",
            )
        channel = self.runtime.connect(addresses[0])
        try:
            remote = await RemoteSubscription.open(
                channel, self.group, event_types=self.event_types
            )
        except BaseException:
            await channel.close()
            raise
        return _Owned(remote, _ChannelCloser(channel), stream=True)

    async def _run(self) -> None:
        delay = self.retry_delay_s
        while True:
            try:
                subscription = await self._open()
                try:
                    self.connected.set()
                    delay = self.retry_delay_s
                    await consume(subscription, self.handler, retry_delay_s=self.retry_delay_s)
                finally:
                    self.connected.clear()
                    await subscription.close()
            except (FrameworkError, grpc.RpcError, OSError, _StreamLostError) as error:
                logger.warning(
                    "event feed %s from %s broke (%s); reconnecting in %.1fs",
                    self.group,
                    self.source,
                    error,
                    delay,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.reconnect_max_s)


class _ChannelCloser:
    def __init__(self, channel: Any) -> None:
        self.channel = channel

    async def close(self) -> None:
        await self.channel.close()


class _StreamLostError(Exception):
    """The Subscribe stream to the producer ended: only a new subscription can go on."""


class _Owned:
    """A subscription that also closes the connection (bus or channel) it was made on.

    `stream=True` (a gRPC Subscribe stream to one instance): once a fetch fails the
    stream is gone for good (e.g. the producer was restarted, on another address), so
    the failure ends `consume` (which would retry the dead stream forever) and the feed
    resolves the producer again and subscribes anew.  Found by the chaos experiment
    kill-order: the notification feed never caught up after the order service restarted.
    """

    def __init__(self, subscription: Any, bus: Any, *, stream: bool = False) -> None:
        self.subscription = subscription
        self.bus = bus
        self.stream = stream

    async def fetch(self, max_count: int = 64, timeout_s: float = 1.0) -> list[Any]:
        try:
            result: list[Any] = await self.subscription.fetch(max_count, timeout_s)
        except (UnavailableError, OSError) as error:
            if self.stream:
                raise _StreamLostError(str(error)) from error
            raise
        return result

    async def close(self) -> None:
        try:
            await self.subscription.close()
        finally:
            await self.bus.close()


class ProjectionHook:
    """Server hook: run a projection (catch up, then follow live appends) while serving.

    A failing batch (e.g. the database went away) is logged and retried with backoff
    from the checkpoint; the read model is never ahead of or behind it.
    """

    def __init__(
        self, runner: Any, *, retry_delay_s: float = 0.5, retry_max_s: float = 5.0
    ) -> None:
        self.runner = runner
        self.retry_delay_s = retry_delay_s
        self.retry_max_s = retry_max_s
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def on_started(self, server: Server) -> None:
        self._stop.clear()
        self._task = asyncio.create_task(
            self._run(), name=f"projection-{self.runner.projection.name}"
        )

    async def on_draining(self, server: Server) -> None:
        await self.stop()

    async def on_stopped(self, server: Server) -> None:
        await self.stop()

    async def stop(self) -> None:
        self._stop.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        delay = self.retry_delay_s
        while not self._stop.is_set():
            try:
                await self.runner.run(self._stop)
            except (FrameworkError, OSError) as error:
                logger.warning(
                    "projection %s failed (%s); resuming from its checkpoint in %.1fs",
                    self.runner.projection.name,
                    error,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
