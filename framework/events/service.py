"""`events.v1.EventStoreService` over any `EventStore`: Append, ReadStream, ReadAll, Subscribe.

Proto in, proto out; the store's typed errors (ConflictError -> ABORTED,
InvalidArgumentError -> INVALID_ARGUMENT) are mapped by the server edge.
Subscribe is the bus's (`framework.events.subscribe.serve_subscribe`) and is
served when the servicer is given a `bus` (a `StoreBus`); without one it
answers UNIMPLEMENTED.

The contract's scopes guard each method (events:append, events:read,
events:subscribe).  Which consumer groups a caller may join is `groups`, a
`framework.auth.grants.NameGrants` (default: the names the token lists in its
`groups` claim, and its own subject): joining another's group would take its
deliveries.  Without authentication (insecure development) groups are not checked.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from framework.auth.grants import NameGrants
from framework.errors import UnimplementedError
from framework.events.envelope import from_proposed, to_envelope
from framework.events.store import DEFAULT_PAGE_SIZE, EventStore
from framework.events.subscribe import (
    GROUPS_CLAIM,
    GroupBus,
    SubscribeConfig,
    check_group_grant,
    serve_subscribe,
)
from gen.events.v1 import envelope_pb2, store_pb2, store_pb2_grpc


class EventStoreServicer(store_pb2_grpc.EventStoreServiceServicer):
    """Serves an event store to other processes and languages."""

    def __init__(
        self,
        store: EventStore,
        *,
        bus: GroupBus | None = None,
        subscribe_config: SubscribeConfig | None = None,
        max_page: int = DEFAULT_PAGE_SIZE,
        groups: NameGrants | None = None,
    ) -> None:
        if max_page < 1:
            raise ValueError(f"max_page must be >= 1, got {max_page}")
        self.store = store
        self.bus = bus
        self.subscribe_config = subscribe_config
        self.max_page = max_page
        self.groups = groups or NameGrants(claim=GROUPS_CLAIM)

    def authorize_group(self, group: str) -> None:
        """PERMISSION_DENIED unless the verified caller is granted consumer group `group`."""
        check_group_grant(self.groups, group)

    def _limit(self, requested: int) -> int:
        return min(requested, self.max_page) if requested else self.max_page

    async def Append(  # noqa: N802
        self, request: store_pb2.AppendRequest, context: Any
    ) -> store_pb2.AppendResponse:
        expected = request.expected_version if request.HasField("expected_version") else None
        events = [from_proposed(e) for e in request.events]
        result = await self.store.append(
            request.stream_id, events, expected, aggregate_type=request.aggregate_type
        )
        return store_pb2.AppendResponse(positions=result.positions, version=result.version)

    async def ReadStream(  # noqa: N802
        self, request: store_pb2.ReadStreamRequest, context: Any
    ) -> store_pb2.ReadStreamResponse:
        from_version = request.from_version or 1
        events = await self.store.read_stream(
            request.stream_id, from_version, self._limit(request.limit)
        )
        return store_pb2.ReadStreamResponse(events=[to_envelope(e) for e in events])

    async def ReadAll(  # noqa: N802
        self, request: store_pb2.ReadAllRequest, context: Any
    ) -> store_pb2.ReadAllResponse:
        events = await self.store.read_all(request.after_position, self._limit(request.limit))
        head = await self.store.head_position()
        return store_pb2.ReadAllResponse(
            events=[to_envelope(e) for e in events], head_position=head
        )

    async def Subscribe(  # noqa: N802
        self, request_iterator: AsyncIterator[store_pb2.SubscribeRequest], context: Any
    ) -> AsyncIterator[envelope_pb2.EventEnvelope]:
        if self.bus is None:
            raise UnimplementedError(
                "this EventStoreService has no bus: construct EventStoreServicer(store, bus=...)"
            )
        async for envelope in serve_subscribe(
            self.bus, request_iterator, self.subscribe_config, authorize=self.authorize_group
        ):
            yield envelope
