"""A consumer group member in another process, through `EventStoreService.Subscribe`.

`await RemoteSubscription.open(channel, group)` opens the bidirectional stream
and is a `Subscription` like any other: `fetch()` returns deliveries, `ack()`
sends `SubscribeRequest.ack(position)` on the same stream, so `consume()` and
`IdempotentHandler` work unchanged against a remote event store.  The protocol
has no negative acknowledgement: `nack()` only forgets the delivery, and the
server's group redelivers it after its ack wait (`StoreBusConfig.ack_wait_s`),
or at once when this member closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from typing import Any

import grpc

from framework.errors import FailedPreconditionError, FrameworkError
from framework.events.bus import Delivery, SubscriptionBase, check_event_types, check_group
from gen.events.v1.envelope_pb2 import EventEnvelope
from gen.events.v1.store_pb2 import SubscribeRequest
from gen.events.v1.store_pb2_grpc import EventStoreServiceStub

logger = logging.getLogger(__name__)

_END = object()


class RemoteDelivery:
    """An envelope received on a Subscribe stream."""

    __slots__ = ("_envelope", "_owner")

    def __init__(self, owner: RemoteSubscription, envelope: EventEnvelope) -> None:
        self._owner = owner
        self._envelope = envelope

    @property
    def envelope(self) -> EventEnvelope:
        return self._envelope

    @property
    def attempt(self) -> int:
        return 0  # the stream does not carry delivery counts

    async def ack(self) -> None:
        await self._owner.ack(self._envelope.position)

    async def nack(self, delay_s: float = 0.0) -> None:
        logger.debug("position %s not acked; the server redelivers it", self._envelope.position)


class RemoteSubscription(SubscriptionBase):
    """A `Subscription` over a gRPC Subscribe stream."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._closed = False
        self._error: BaseException | None = None
        self._reader = asyncio.create_task(self._read(), name="remote-subscription")

    @classmethod
    async def open(
        cls,
        channel: grpc.aio.Channel,
        group: str,
        *,
        event_types: Collection[str] = (),
        after_position: int = 0,
    ) -> RemoteSubscription:
        """Join `group` on the server behind `channel`; new groups start after `after_position`."""
        check_group(group)
        types = sorted(check_event_types(event_types))
        call = EventStoreServiceStub(channel).Subscribe()
        start = SubscribeRequest.Start(group=group, types=types, after_position=after_position)
        await call.write(SubscribeRequest(start=start))
        return cls(call)

    async def _read(self) -> None:
        try:
            while True:
                envelope = await self._call.read()
                if envelope is grpc.aio.EOF:
                    break
                self._queue.put_nowait(envelope)
        except asyncio.CancelledError:
            raise
        except (grpc.RpcError, FrameworkError) as error:  # the stream failed: fetch() raises it
            self._error = error
        self._queue.put_nowait(_END)

    async def ack(self, position: int) -> None:
        if not self._closed:
            await self._call.write(SubscribeRequest(ack=SubscribeRequest.Ack(position=position)))

    async def fetch(self, max_count: int = 64, timeout_s: float = 1.0) -> list[Delivery]:
        if self._closed:
            raise FailedPreconditionError("the subscription is closed; open another one")
        try:
            async with asyncio.timeout(timeout_s):
                first = await self._queue.get()
        except TimeoutError:
            return []
        items = [first]
        while len(items) < max_count and not self._queue.empty():
            items.append(self._queue.get_nowait())
        out: list[Delivery] = []
        for item in items:
            if item is _END:
                self._queue.put_nowait(_END)  # stays ended for the next fetch too
                if out:
                    return out
                if self._error is not None:
                    raise self._error
                raise FailedPreconditionError("the server ended the Subscribe stream")
            assert isinstance(item, EventEnvelope)
            out.append(RemoteDelivery(self, item))
        return out

    async def close(self) -> None:
        """Leave the group: the server hands unacked events to the other members."""
        if not self._closed:
            self._closed = True
            self._call.cancel()
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
