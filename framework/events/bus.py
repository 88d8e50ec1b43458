"""Event bus: consumer groups with at-least-once delivery and acknowledgement.

The shape (one small protocol, several adapters):

* `EventBus.publish(envelopes)` returns only once the bus has durably accepted
  every envelope, in order; publishing the same event id again is harmless
  (adapters de-duplicate on the event id, consumers are idempotent anyway).
* `EventBus.subscribe(group, event_types=...)` joins a consumer group.  Every
  group gets every event (of its types); the members of one group share them.
* A `Delivery` is acknowledged with `ack()` once handled; `nack()` (or no
  answer within the adapter's ack wait) makes the bus deliver it again, to
  this member or another one.  The group's position is durable: a restarted
  group resumes at its first unacknowledged event, never past it (events
  acknowledged after that one may come again: handlers are idempotent).

Adapters: `StoreBus` (`framework.events.consumer_group`, embedded default: a
group is a durable cursor over the store's global order), `JetStreamBus`
(`framework.events.nats`, many processes and machines), and on the consuming
side `RemoteSubscription` (`framework.events.consumer_grpc`, a member over
`EventStoreService.Subscribe`).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Collection, Sequence
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from framework.errors import InvalidArgumentError
from gen.events.v1.envelope_pb2 import EventEnvelope

_GROUP_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_EVENT_TYPE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def check_group(group: str) -> str:
    """Validate a consumer group name (letters, digits, `_`, `-`; 1-64 chars)."""
    if not _GROUP_NAME.match(group):
        raise InvalidArgumentError(f"group must be 1-64 letters, digits, '_' or '-', got {group!r}")
    return group


def check_event_types(event_types: Collection[str]) -> frozenset[str]:
    """Validate an event type filter (protobuf full names); empty means every type."""
    for event_type in event_types:
        if not _EVENT_TYPE.match(event_type):
            raise InvalidArgumentError(
                f"event_types must hold protobuf message full names such as "
                f"'orders.v1.OrderPlaced', got {event_type!r}"
            )
    return frozenset(event_types)


@runtime_checkable
class Delivery(Protocol):
    """One event handed to one member of a group, awaiting its acknowledgement."""

    @property
    def envelope(self) -> EventEnvelope: ...

    @property
    def attempt(self) -> int:
        """1 on the first delivery, 2 on the first redelivery, and so on."""
        ...

    async def ack(self) -> None:
        """The event is handled: the group will not see it again."""
        ...

    async def nack(self, delay_s: float = 0.0) -> None:
        """The event was not handled: deliver it again after `delay_s`."""
        ...


class Subscription(Protocol):
    """A member of a consumer group."""

    async def fetch(self, max_count: int = 64, timeout_s: float = 1.0) -> list[Delivery]:
        """Up to `max_count` deliveries; waits up to `timeout_s` for the first, [] if none."""
        ...

    def __aiter__(self) -> AsyncIterator[Delivery]: ...

    async def close(self) -> None:
        """Leave the group; unacknowledged deliveries go to the other members."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class SubscriptionBase:
    """What every `Subscription` shares: iterate fetched deliveries until closed, and
    `async with` closes it. Subclasses provide `fetch()`, `close()` and `_closed`."""

    _closed: bool

    async def fetch(self, max_count: int = 64, timeout_s: float = 1.0) -> list[Delivery]:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aiter__(self) -> AsyncIterator[Delivery]:
        while not self._closed:
            for delivery in await self.fetch():
                yield delivery

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


@runtime_checkable
class StreamResets(Protocol):
    """A bus that can lose what it held (a broker restarted without its data) and says so.

    `stream_resets` counts the times the bus found its stream missing and
    created it; the outbox relay then publishes its events again from the
    start (`RelayConfig.replay_on_stream_loss`).
    """

    @property
    def stream_resets(self) -> int: ...


class EventBus(Protocol):
    """Publishes stored envelopes and delivers them to consumer groups."""

    async def publish(self, envelopes: Sequence[EventEnvelope]) -> None:
        """Durably accept `envelopes` in order; raises if any was not accepted."""
        ...

    async def subscribe(self, group: str, *, event_types: Collection[str] = ()) -> Subscription:
        """Join consumer `group`, receiving the events whose type is in `event_types`."""
        ...

    async def close(self) -> None: ...
