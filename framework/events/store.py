"""The event store interface: what every backend (SQLite, PostgreSQL) offers.

An event is a protobuf message stored as (stream id, version, type = the
message's full name, payload bytes, metadata).  Versions count from 1 per
stream with no gaps; the database itself enforces UNIQUE(stream_id, version),
so a concurrent writer gets `ConflictError` (ABORTED), never an overwrite.
Every event also gets a global `position`, strictly increasing in commit
order: readers of `read_all(after_position)` never skip a position that
commits late.  That makes the events table its own transactional outbox: a
relay reads `read_all` from its durable cursor and publishes (see README.md).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

from google.protobuf.message import Message

from framework.errors import ConflictError, InvalidArgumentError

DEFAULT_PAGE_SIZE = 1000


def new_event_id() -> str:
    """A fresh event id: a UUID version 7 (RFC 9562), time-ordered.

    Millisecond time first, then 74 random bits: ids made later sort later, so
    the store's unique index on event ids grows at its right edge instead of
    at random places (a random UUID4 costs about twice the CPU per appended
    event on SQLite, more as the table grows).  Any unique string still works
    as an id.
    """
    r = os.urandom(10)
    h = (
        (time.time_ns() // 1_000_000).to_bytes(6, "big")
        + bytes((0x70 | r[0] & 0x0F, r[1], 0x80 | r[2] & 0x3F))  # version 7, RFC variant
        + r[3:]
    ).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass(frozen=True, slots=True)
class EventMetadata:
    """Facts about an event outside the domain (mirrors `events.v1.EventMetadata`).

    `schema_version` 0 means "the current version of this type" on append; on
    read it is the version after upcasting.
    """

    correlation_id: str = ""
    causation_id: str = ""
    traceparent: str = ""
    tracestate: str = ""
    schema_version: int = 0
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.schema_version < 0:
            raise InvalidArgumentError(
                f"metadata.schema_version must be >= 0, got {self.schema_version}"
            )


EMPTY_METADATA = EventMetadata()


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append: its type (message full name) and serialized payload.

    Build one from a message with `NewEvent.of(message)`.  The store checks
    that `type` is registered and that `payload` parses as that type.
    """

    type: str
    payload: bytes
    metadata: EventMetadata = EMPTY_METADATA
    event_id: str = field(default_factory=lambda: new_event_id())
    # True when `payload` was serialized from a message of `type` in this process
    # (`of()`): the store then skips re-parsing it (it still checks the type).
    serialized_here: bool = field(default=False, repr=False, compare=False)

    @classmethod
    def of(
        cls,
        message: Message,
        metadata: EventMetadata = EMPTY_METADATA,
        event_id: str | None = None,
    ) -> NewEvent:
        """The event for a protobuf message instance."""
        return cls(
            type=message.DESCRIPTOR.full_name,
            payload=message.SerializeToString(),
            metadata=metadata,
            event_id=event_id or new_event_id(),
            serialized_here=True,
        )


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """A stored event, as read back (payload already upcast to the current schema)."""

    position: int
    stream_id: str
    aggregate_type: str
    version: int
    event_id: str
    type: str
    payload: bytes
    metadata: EventMetadata
    recorded_at: datetime


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Where an append landed: the global positions (in order) and the stream's new version."""

    positions: tuple[int, ...]
    version: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An aggregate's state at `version` of its stream; `type` names the state message."""

    stream_id: str
    version: int
    type: str
    state: bytes
    recorded_at: datetime | None = None


@runtime_checkable
class EventStore(Protocol):
    """Append-only streams of events with a global order.

    `expected_version` is the version of the stream's last event the writer
    saw: 0 means the stream must not exist yet, None means "append at the end,
    whatever it is" (the database still refuses duplicate versions).
    """

    async def append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        expected_version: int | None,
        *,
        aggregate_type: str = "",
    ) -> AppendResult:
        """Append all `events` in one transaction, or none.

        Raises `ConflictError` (ABORTED) when the stream's version is not
        `expected_version`, and `InvalidArgumentError` for an empty stream id,
        a negative version, an unknown type or a payload that does not parse.
        """
        ...

    async def read_stream(
        self, stream_id: str, from_version: int = 1, limit: int = DEFAULT_PAGE_SIZE
    ) -> list[RecordedEvent]:
        """Events of one stream with version >= `from_version`, in version order."""
        ...

    async def read_all(
        self, after_position: int = 0, limit: int = DEFAULT_PAGE_SIZE
    ) -> list[RecordedEvent]:
        """Events with position > `after_position`, in position order, at most `limit`."""
        ...

    async def stream_version(self, stream_id: str) -> int:
        """Version of the stream's last event (0 when the stream does not exist)."""
        ...

    async def head_position(self) -> int:
        """Highest committed global position (0 for an empty store)."""
        ...

    async def wait_for_events(self, after_position: int, timeout_s: float) -> bool:
        """Wait (bounded) until an event past `after_position` may exist; True if one does.

        Woken at once by appends through this store object; appends by other
        processes are noticed by polling within the timeout.
        """
        ...

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        """Keep `snapshot` as the stream's latest (an older one never replaces a newer)."""
        ...

    async def load_snapshot(self, stream_id: str) -> Snapshot | None:
        """The stream's latest snapshot, or None."""
        ...

    async def load_checkpoint(self, name: str) -> int:
        """Durable position of the named reader (projection, relay, consumer group); 0 if none."""
        ...

    async def save_checkpoint(self, name: str, position: int) -> None:
        """Store the named reader's position durably (last write wins)."""
        ...

    async def close(self) -> None:
        """Release connections and threads; the store is unusable afterwards."""
        ...


def check_stream_id(stream_id: str) -> None:
    """Refuse an empty or over-long stream id with a message saying what to send."""
    if not stream_id:
        raise InvalidArgumentError("stream_id is empty: name the stream (aggregate id)")
    if len(stream_id) > 255:
        raise InvalidArgumentError(f"stream_id is {len(stream_id)} characters; the limit is 255")


def check_expected_version(expected_version: int | None) -> None:
    if expected_version is not None and expected_version < 0:
        raise InvalidArgumentError(
            f"expected_version must be >= 0 (0: new stream) or unset, got {expected_version}"
        )


def check_non_negative(name: str, value: int) -> None:
    if value < 0:
        raise InvalidArgumentError(f"{name} must be >= 0, got {value}")


def check_limit(limit: int) -> None:
    if limit < 1:
        raise InvalidArgumentError(f"limit must be >= 1, got {limit}")


def conflict(stream_id: str, expected: int | None, actual: int) -> ConflictError:
    """The error for a stale expected version, naming the stream and both versions."""
    return ConflictError(
        f"stream {stream_id!r} is at version {actual}, not the expected {expected}:"
        " another writer appended first; reload the stream and retry",
        metadata={
            "stream_id": stream_id,
            "expected_version": str(expected),
            "actual_version": str(actual),
        },
    )


# (event_id, stream_id, version, position) of a stored event found by its id
StoredId = tuple[str, str, int, int]


def retried_append(
    stream_id: str,
    expected: int | None,
    event_ids: Sequence[str],
    found: Sequence[StoredId],
) -> AppendResult | ConflictError:
    """The outcome of an append some of whose event ids are already stored.

    Appends are idempotent by event id (as in EventStoreDB): when *every* id of
    the batch is stored in this stream, at consecutive versions in batch order
    right after `expected` (any place when `expected` is None), the batch is a
    retry of an append that already happened: its original result, nothing
    written.  Any other overlap (some ids only, another stream, other
    versions) is a `ConflictError` with reason `DUPLICATE_EVENT_ID`.
    """
    by_id = {row[0]: row for row in found}
    first = by_id.get(event_ids[0])
    if first is not None and len(by_id) == len(event_ids):
        start = first[2] - 1
        rows = [by_id[event_id] for event_id in event_ids]
        if (expected is None or expected == start) and all(
            row[1] == stream_id and row[2] == start + i for i, row in enumerate(rows, start=1)
        ):
            return AppendResult(tuple(row[3] for row in rows), start + len(rows))
    event_id = next(i for i in event_ids if i in by_id)
    _, other_stream, other_version, _ = by_id[event_id]
    return ConflictError(
        f"event id {event_id} is already stored in stream {other_stream!r} at version"
        f" {other_version}: a retry must resend the same events to the same place;"
        " new events need new ids",
        reason="DUPLICATE_EVENT_ID",
        metadata={
            "stream_id": stream_id,
            "event_id": event_id,
            "stored_stream_id": other_stream,
            "stored_version": str(other_version),
        },
    )
