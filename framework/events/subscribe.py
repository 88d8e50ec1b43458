"""gRPC streaming `EventStoreService.Subscribe`: a consumer group over the wire.

The client opens the stream with `SubscribeRequest.start` (group, types,
where a new group starts), then sends `SubscribeRequest.ack(position)` for each
event it has handled.  The server streams envelopes: the stored backlog after
the group's durable position first (catch-up), then new appends as they commit
(live).  Flow control: at most `window` envelopes are unacknowledged on one
stream; the server stops reading the store until acks come back (gRPC's own
HTTP/2 flow control then bounds what is buffered).  Cancellation is clean:
when the client cancels, disconnects or half-closes, the member leaves its
group and its unacknowledged events go back to the group for redelivery.

Servicers get the method from `SubscribeMixin` (set `self.bus` to a
`StoreBus`), or call `serve_subscribe()` themselves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol

from framework.auth.grants import NameGrants
from framework.auth.policy import current_principal
from framework.errors import InvalidArgumentError, PermissionDeniedError
from framework.events.bus import Delivery, Subscription
from gen.events.v1.envelope_pb2 import EventEnvelope
from gen.events.v1.store_pb2 import SubscribeRequest

logger = logging.getLogger(__name__)


GROUPS_CLAIM = "groups"  # token claim listing the consumer groups the holder may join


def check_group_grant(grants: NameGrants, group: str) -> None:
    """PERMISSION_DENIED unless the verified caller is granted consumer group `group`.

    Without authentication (no caller: insecure development) nothing is checked.
    """
    principal = current_principal()
    if principal is None or grants.allows(principal, group):
        return
    granted = NameGrants.describe(grants.patterns(principal))
    raise PermissionDeniedError(
        f"this caller may not join consumer group {group!r} (granted: {granted}); "
        "a group's members share its events, so each group belongs to its consumers",
        reason="GROUP_NOT_GRANTED",
        metadata={"group": group},
    )


class GroupBus(Protocol):
    """A bus whose new groups can start after a given position (`StoreBus`)."""

    async def subscribe(
        self, group: str, *, event_types: Collection[str] = (), start_after: int = 0
    ) -> Subscription: ...


@dataclass(frozen=True, slots=True)
class SubscribeConfig:
    """Per-stream flow control."""

    window: int = 256
    fetch_timeout_s: float = 0.5

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.fetch_timeout_s <= 0:
            raise ValueError(f"fetch_timeout_s must be > 0, got {self.fetch_timeout_s}")


async def _start(requests: AsyncIterator[SubscribeRequest]) -> SubscribeRequest.Start:
    first = await anext(requests, None)
    if first is None or first.WhichOneof("kind") != "start":
        raise InvalidArgumentError(
            "the first SubscribeRequest must be `start` (group, types, after_position); "
            "acks come after it"
        )
    if first.start.after_position < 0:
        raise InvalidArgumentError(
            f"start.after_position must be >= 0, got {first.start.after_position}"
        )
    return first.start


async def serve_subscribe(
    bus: GroupBus,
    requests: AsyncIterator[SubscribeRequest],
    config: SubscribeConfig | None = None,
    *,
    authorize: Callable[[str], None] | None = None,
) -> AsyncIterator[EventEnvelope]:
    """The response stream of one Subscribe call (see the module docstring).

    `authorize(group)` runs before the group is joined and raises to refuse it.
    """
    config = config or SubscribeConfig()
    start = await _start(requests)
    if authorize is not None:
        authorize(start.group)
    subscription = await bus.subscribe(
        start.group, event_types=list(start.types), start_after=start.after_position
    )
    pending: dict[int, Delivery] = {}
    room = asyncio.Event()

    async def read_acks() -> None:
        async for request in requests:
            if request.WhichOneof("kind") != "ack":
                raise InvalidArgumentError("send `start` once, then only `ack` messages")
            delivery = pending.pop(request.ack.position, None)
            if delivery is None:
                logger.debug("ack for position %s not pending here", request.ack.position)
                continue
            await delivery.ack()
            room.set()

    reader = asyncio.create_task(read_acks(), name=f"subscribe-acks-{start.group}")
    try:
        while not reader.done():
            space = config.window - len(pending)
            if space <= 0:
                room.clear()  # acks only set it from now on: no wake-up is lost
                try:
                    async with asyncio.timeout(config.fetch_timeout_s):
                        await room.wait()
                except TimeoutError:
                    pass  # look at the ack reader again
                continue
            for delivery in await subscription.fetch(space, config.fetch_timeout_s):
                pending[delivery.envelope.position] = delivery
                yield delivery.envelope
        reader.result()  # a bad request ends the stream with its error; half-close ends it OK
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await subscription.close()


class SubscribeMixin:
    """`Subscribe` for an `EventStoreServiceServicer`; needs `self.bus` (a `StoreBus`)."""

    bus: GroupBus
    subscribe_config: SubscribeConfig = SubscribeConfig()
    groups: NameGrants = NameGrants(claim=GROUPS_CLAIM)  # who may join which group

    async def Subscribe(  # noqa: N802  (the generated servicer's method name)
        self, request_iterator: AsyncIterator[SubscribeRequest], context: Any
    ) -> AsyncIterator[EventEnvelope]:
        grants = self.groups
        async for envelope in serve_subscribe(
            self.bus,
            request_iterator,
            self.subscribe_config,
            authorize=lambda group: check_group_grant(grants, group),
        ):
            yield envelope
