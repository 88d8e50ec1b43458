"""A consumer group member in another process, through `EventStoreService.Subscribe`.

`await RemoteSubscription.open(channel, group)` opens the bidirectional stream
and is a `Subscription` like any other: `fetch()` returns deliveries, `ack()`
sends `SubscribeRequest.ack(position)` on the same stream, so `consume()` and
`IdempotentHandler` work unchanged against a remote event store.  The protocol
has no negative acknowledgement: `nack()` only forgets the delivery, and the
server's group redelivers it after its ack wait (`StoreBusConfig.ack_wait_s`),
or at once when this member closes.

A stream that breaks (the server restarted, the connection dropped) makes the
next `fetch()` raise `UnavailableError`; the one after opens a new stream to
the same group (the server handed the old member's unacknowledged events back
to the group meanwhile), so `consume()` rides out a server restart: it backs
off and goes on.  Errors the server gave for the request itself (a bad group,
PERMISSION_DENIED) come out as their typed error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from typing import Any

import grpc

from framework.errors import (
    FailedPreconditionError,
    FrameworkError,
    UnavailableError,
    code_of,
    error_class,
)
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


def _typed(error: BaseException, what: str) -> FrameworkError:
    """A stream failure as the framework's error for its status (UNAVAILABLE: try again)."""
    if isinstance(error, FrameworkError):
        return error
    if isinstance(error, grpc.RpcError):
        code = error.code() if isinstance(error, grpc.aio.AioRpcError) else None
        detail = error.details() if isinstance(error, grpc.aio.AioRpcError) else str(error)
        if code is not None and code not in _TRANSIENT:
            return error_class(code.name, code)(f"Subscribe {what}: {detail}")
        return UnavailableError(f"Subscribe {what} failed ({code}: {detail}); retry")
    return UnavailableError(f"Subscribe {what} failed ({error!r}); retry")


async def _final_status(call: Any) -> FrameworkError | None:
    """The typed error a stream already ended with, or None if it is still open.

    A server that refuses the call (its policies: a missing scope, a rate limit) can end
    the stream before the first write is sent; the write then fails with a bare status,
    or with InvalidStateError, neither carrying the server's `ErrorInfo`. Reading the
    ended stream raises the typed error, with its reason, as a later fetch would.
    INTERNAL is left to the caller's transient mapping: it is also what grpc.aio records
    locally when the send itself fails on the ended stream, hiding the server's status.
    """
    if not call.done():
        return None
    try:
        await call.read()
    except FrameworkError as error:
        return None if code_of(error) is grpc.StatusCode.INTERNAL else error
    except (grpc.RpcError, asyncio.InvalidStateError):
        return None
    return None


_OPEN_ATTEMPTS = 3
_CORE_INTERNAL = "Internal error from Core"


def _lost_to_core(error: BaseException) -> bool:
    """The send failed inside grpc.aio, which then reports its own INTERNAL status instead
    of the one the server ended the stream with (a refusal racing the first write)."""
    if isinstance(error, FrameworkError):
        return code_of(error) is grpc.StatusCode.INTERNAL and _CORE_INTERNAL in str(error)
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code() is grpc.StatusCode.INTERNAL and _CORE_INTERNAL in (
            error.details() or ""
        )
    return False


_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


class RemoteSubscription(SubscriptionBase):
    """A `Subscription` over a gRPC Subscribe stream (reopened after the stream breaks)."""

    def __init__(self, call: Any, start: SubscribeRequest.Start, channel: Any = None) -> None:
        self._call = call
        self._start = start
        self._channel = channel
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._closed = False
        self._ended = False  # the current stream ended: the next fetch opens another
        self._error: BaseException | None = None
        self._reader = asyncio.create_task(self._read(call), name="remote-subscription")

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
        start = SubscribeRequest.Start(group=group, types=types, after_position=after_position)
        return cls(await cls._open_call(channel, start), start, channel)

    @staticmethod
    async def _open_call(channel: Any, start: SubscribeRequest.Start) -> Any:
        attempt = 1
        while True:
            call = EventStoreServiceStub(channel).Subscribe()
            try:
                await call.write(SubscribeRequest(start=start))
            except (grpc.RpcError, FrameworkError, asyncio.InvalidStateError) as error:
                refusal = await _final_status(call)
                call.cancel()
                if refusal is None and _lost_to_core(error) and attempt < _OPEN_ATTEMPTS:
                    # grpc.aio replaced the server's status with its own: ask again (nothing
                    # was read, so opening again is safe); a refusal then arrives typed.
                    attempt += 1
                    continue
                raise (refusal or _typed(error, "open")) from error
            return call

    async def _reopen(self) -> None:
        """Open a new stream to the same group (the old one ended)."""
        if self._channel is None:
            raise FailedPreconditionError("the server ended the Subscribe stream")
        self._call.cancel()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        self._call = await self._open_call(self._channel, self._start)
        self._queue = asyncio.Queue()
        self._error = None
        self._ended = False
        self._reader = asyncio.create_task(self._read(self._call), name="remote-subscription")
        logger.info("Subscribe stream of group %s opened again", self._start.group)

    async def _read(self, call: Any) -> None:
        try:
            while True:
                envelope = await call.read()
                if envelope is grpc.aio.EOF:
                    break
                self._queue.put_nowait(envelope)
        except asyncio.CancelledError:
            raise
        except (grpc.RpcError, FrameworkError) as error:  # the stream failed: fetch() raises it
            self._error = error
        self._queue.put_nowait(_END)

    async def ack(self, position: int) -> None:
        if self._closed or self._ended:
            return  # that stream is gone: the group redelivers the event to the new one
        request = SubscribeRequest(ack=SubscribeRequest.Ack(position=position))
        try:
            await self._call.write(request)
        except (grpc.RpcError, FrameworkError, asyncio.InvalidStateError) as error:
            raise _typed(error, "ack") from error

    async def fetch(self, max_count: int = 64, timeout_s: float = 1.0) -> list[Delivery]:
        if self._closed:
            raise FailedPreconditionError("the subscription is closed; open another one")
        if self._ended:
            await self._reopen()
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
                self._ended = True  # the next fetch opens a new stream
                if out:
                    return out
                if self._error is not None:
                    raise _typed(self._error, "stream") from self._error
                raise UnavailableError("the server ended the Subscribe stream; fetch again")
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
