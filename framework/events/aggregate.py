"""Event-sourced aggregates and the repository that loads and saves them.

An aggregate's state is rebuilt by applying its events.  Handlers are chosen by
the event's message type from a table built once per class (`@applies(X)`),
never by an `isinstance` ladder.  Commands check invariants first (raising
`FailedPreconditionError` through `require`) and then `emit` events, which are
applied at once and collected until the repository saves them with the
version the aggregate was loaded at as the expected version.

    class Account(Aggregate):
        state_type = AccountState                  # enables snapshots

        def open(self, owner: str) -> None:
            self.require(not self.opened, "account is already open")
            self.emit(AccountOpened(owner=owner))

        @applies(AccountOpened)
        def _opened(self, event: AccountOpened) -> None:
            self.opened, self.owner = True, event.owner

Trace context: `Repository.save` writes the current span's `traceparent` /
`tracestate` (and baggage) into every pending event whose metadata carries no
`traceparent`, keeping the caller's correlation/causation ids and extra
fields.  So an RPC handler that saves an aggregate records its trace in the
events with no metadata built by hand, and a consumer or projection continues
it (`framework.telemetry.tracing.continue_trace`).  The repository is the single place:
it runs in the request's context at the moment of recording, while the store
may be reached from elsewhere (relays, imports, the gRPC Append service, whose
callers send their own metadata).  Outside any span nothing is added and the
cost is one context lookup.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Generic, TypeVar

from google.protobuf.message import DecodeError, Message
from opentelemetry import trace as trace_api

from framework.errors import DataLossError, FailedPreconditionError, InternalError, NotFoundError
from framework.events.store import (
    DEFAULT_PAGE_SIZE,
    EMPTY_METADATA,
    AppendResult,
    EventMetadata,
    EventStore,
    NewEvent,
    RecordedEvent,
    Snapshot,
    check_stream_id,
)

logger = logging.getLogger(__name__)

E = TypeVar("E", bound=Message)
A = TypeVar("A", bound="Aggregate")
Handler = Callable[[Any, Any], None]

_APPLIES_ATTR = "__applies_event__"


def applies(event_class: type[E]) -> Callable[[Callable[[A, E], None]], Callable[[A, E], None]]:
    """Mark a method as the handler that applies `event_class` events to the state."""

    def mark(method: Callable[[A, E], None]) -> Callable[[A, E], None]:
        setattr(method, _APPLIES_ATTR, event_class)
        return method

    return mark


class Aggregate:
    """Base of event-sourced aggregates: id, version, pending events, handler table."""

    aggregate_type: ClassVar[str] = ""
    # The message type of the snapshot state; None disables snapshots.
    state_type: ClassVar[type[Message] | None] = None
    _handlers: ClassVar[dict[str, tuple[type[Message], Handler]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        table: dict[str, tuple[type[Message], Handler]] = {}
        for klass in reversed(cls.__mro__):
            for attr in vars(klass).values():
                event_class = getattr(attr, _APPLIES_ATTR, None)
                if event_class is not None:
                    table[event_class.DESCRIPTOR.full_name] = (event_class, attr)
        cls._handlers = table
        if "aggregate_type" not in vars(cls):
            cls.aggregate_type = cls.__name__

    def __init__(self, aggregate_id: str) -> None:
        check_stream_id(aggregate_id)
        self.id = aggregate_id
        self.version = 0
        self._pending: list[NewEvent] = []

    # ------------------------------------------------------------ commands

    def require(self, condition: bool, message: str) -> None:
        """Refuse a command whose invariant does not hold (nothing is emitted)."""
        if not condition:
            raise FailedPreconditionError(
                f"{self.aggregate_type} {self.id}: {message}",
                metadata={"aggregate_type": self.aggregate_type, "aggregate_id": self.id},
            )

    def emit(self, event: Message, metadata: EventMetadata = EMPTY_METADATA) -> None:
        """Apply `event` to the state now and keep it for the next save."""
        self._handler(event.DESCRIPTOR.full_name)[1](self, event)
        self._pending.append(NewEvent.of(event, metadata))
        self.version += 1

    @property
    def pending_events(self) -> tuple[NewEvent, ...]:
        return tuple(self._pending)

    @property
    def loaded_version(self) -> int:
        """The version before the pending events (what a save expects to find)."""
        return self.version - len(self._pending)

    def mark_saved(self) -> None:
        self._pending.clear()

    # ------------------------------------------------------------ rebuilding

    def replay(self, event: RecordedEvent) -> None:
        """Apply a stored event (from the store, already upcast)."""
        if event.version != self.version + 1:
            raise DataLossError(
                f"{self.aggregate_type} {self.id}: expected version {self.version + 1}, "
                f"read {event.version}; the stream has a gap"
            )
        event_class, handler = self._handler(event.type)
        message = event_class()
        try:
            message.ParseFromString(event.payload)
        except DecodeError as exc:
            raise DataLossError(
                f"{self.aggregate_type} {self.id} v{event.version}: stored {event.type} "
                f"does not parse: {exc}"
            ) from exc
        handler(self, message)
        self.version = event.version

    def snapshot_state(self) -> Message:
        """The state as a `state_type` message; override to enable snapshots."""
        raise NotImplementedError(f"{type(self).__name__} does not define snapshot_state()")

    def restore_state(self, state: Message) -> None:
        """Set the state from a `state_type` message; override to enable snapshots."""
        raise NotImplementedError(f"{type(self).__name__} does not define restore_state()")

    def _handler(self, type_name: str) -> tuple[type[Message], Handler]:
        entry = self._handlers.get(type_name)
        if entry is None:
            raise InternalError(
                f"{type(self).__name__} has no @applies handler for {type_name}: add one"
            )
        return entry


def with_trace_context(events: Sequence[NewEvent]) -> Sequence[NewEvent]:
    """`events` with the current trace context in the metadata of those that have none.

    An event whose metadata already names a `traceparent` is kept as is (the
    caller chose its context); the others get `traceparent`, `tracestate` and
    baggage (`extra["baggage"]`, unless the caller set one) from the current
    span through the configured propagator, keeping every other field.
    Outside a valid span the same sequence is returned untouched.
    """
    if not trace_api.get_current_span().get_span_context().is_valid:
        return events
    if all(event.metadata.traceparent for event in events):
        return events
    # Imported here: the SDK-backed tracing module is loaded by whoever made the span.
    from framework.telemetry.tracing import trace_fields

    fields = trace_fields()
    if not fields["traceparent"]:
        return events  # a propagator that writes no W3C traceparent
    baggage = fields.get("extra", {})
    filled: list[NewEvent] = []
    for event in events:
        meta = event.metadata
        if meta.traceparent:
            filled.append(event)
            continue
        extra = {**baggage, **meta.extra} if baggage else meta.extra
        meta = dataclasses.replace(
            meta, traceparent=fields["traceparent"], tracestate=fields["tracestate"], extra=extra
        )
        filled.append(dataclasses.replace(event, metadata=meta))
    return filled


class Repository(Generic[A]):
    """Loads aggregates (latest snapshot, then later events) and saves their new events.

    `snapshot_every` > 0 saves a snapshot whenever a save crosses a multiple of
    that many versions (the aggregate class must define `state_type`).
    """

    def __init__(
        self,
        store: EventStore,
        aggregate_class: type[A],
        *,
        snapshot_every: int = 0,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> None:
        if snapshot_every < 0:
            raise ValueError(f"snapshot_every must be >= 0, got {snapshot_every}")
        if snapshot_every and aggregate_class.state_type is None:
            raise ValueError(f"snapshot_every needs {aggregate_class.__name__}.state_type set")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.store = store
        self.aggregate_class = aggregate_class
        self.snapshot_every = snapshot_every
        self.page_size = page_size

    async def get(self, aggregate_id: str) -> A | None:
        """The aggregate rebuilt from the store, or None when its stream is empty."""
        aggregate = self.aggregate_class(aggregate_id)
        state_type = self.aggregate_class.state_type
        if state_type is not None:
            snapshot = await self.store.load_snapshot(aggregate_id)
            if snapshot is not None and snapshot.type == state_type.DESCRIPTOR.full_name:
                aggregate.restore_state(state_type.FromString(snapshot.state))
                aggregate.version = snapshot.version
        while True:
            page = await self.store.read_stream(aggregate_id, aggregate.version + 1, self.page_size)
            for event in page:
                aggregate.replay(event)
            if len(page) < self.page_size:
                break
        return aggregate if aggregate.version > 0 else None

    async def load(self, aggregate_id: str) -> A:
        """The aggregate, or NotFoundError naming it."""
        aggregate = await self.get(aggregate_id)
        if aggregate is None:
            name = self.aggregate_class.aggregate_type
            raise NotFoundError(f"{name} {aggregate_id!r} does not exist")
        return aggregate

    async def save(self, aggregate: A) -> AppendResult | None:
        """Append the pending events expecting the loaded version; ConflictError if stale.

        Events recorded without a `traceparent` get the current trace context
        (see the module docstring), so handlers downstream continue this trace.
        """
        pending = aggregate.pending_events
        if not pending:
            return None
        expected = aggregate.loaded_version
        result = await self.store.append(
            aggregate.id,
            with_trace_context(pending),
            expected,
            aggregate_type=aggregate.aggregate_type,
        )
        aggregate.mark_saved()
        every = self.snapshot_every
        if every and result.version // every > expected // every:
            state = aggregate.snapshot_state()
            await self.store.save_snapshot(
                Snapshot(
                    aggregate.id,
                    result.version,
                    state.DESCRIPTOR.full_name,
                    state.SerializeToString(),
                )
            )
        return result
