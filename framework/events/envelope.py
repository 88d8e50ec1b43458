"""Conversions between the store's dataclasses, database rows and the protobuf envelope.

Both backends store the same row shape; this module is the one place that
validates an append batch and turns it into rows, and turns rows back into
`RecordedEvent`s (upcasting old schema versions on the way).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType

from google.protobuf.timestamp_pb2 import Timestamp

from framework.errors import InvalidArgumentError
from framework.events.store import (
    EMPTY_METADATA,
    EventMetadata,
    NewEvent,
    RecordedEvent,
    check_expected_version,
    check_stream_id,
)
from framework.events.typeregistry import EventTypeRegistry
from framework.events.upcast import Upcasters
from gen.events.v1 import envelope_pb2, store_pb2

MAX_BATCH = 10_000

# (event_id, type, schema_version, metadata bytes, payload)
EventRow = tuple[str, str, int, bytes, bytes]

# (position, stream_id, aggregate_type, version, event_id, type, schema_version,
#  metadata, payload, recorded_at in microseconds since the epoch, UTC)
StoredRow = tuple[int, str, str, int, str, str, int, bytes, bytes, int]


@dataclass(frozen=True, slots=True)
class Codec:
    """What a backend needs to check writes and decode reads: types and upcasters."""

    types: EventTypeRegistry
    upcasters: Upcasters

    def rows(
        self, stream_id: str, events: Sequence[NewEvent], expected_version: int | None
    ) -> list[EventRow]:
        """Validate an append batch; InvalidArgumentError before anything is written."""
        check_stream_id(stream_id)
        check_expected_version(expected_version)
        if not events:
            raise InvalidArgumentError(f"append to {stream_id!r} has no events: send at least one")
        if len(events) > MAX_BATCH:
            raise InvalidArgumentError(
                f"append to {stream_id!r} has {len(events)} events; the limit is {MAX_BATCH}"
            )
        out: list[EventRow] = []
        seen: set[str] = set()
        for index, event in enumerate(events):
            try:
                if event.serialized_here:
                    self.types.resolve(event.type)
                else:
                    self.types.decode(event.type, event.payload)
            except InvalidArgumentError as exc:
                raise InvalidArgumentError(
                    f"events[{index}]: {exc.message}",
                    reason=exc.reason,
                    violations=exc.violations,
                    metadata={**exc.metadata, "stream_id": stream_id, "index": str(index)},
                ) from exc
            if not event.event_id:
                raise InvalidArgumentError(f"events[{index}].event_id is empty: send a UUID")
            if event.event_id in seen:
                raise InvalidArgumentError(
                    f"events[{index}].event_id {event.event_id} appears twice in the batch:"
                    " every event needs its own id",
                    metadata={"stream_id": stream_id, "index": str(index)},
                )
            seen.add(event.event_id)
            meta = event.metadata
            version = meta.schema_version or self.upcasters.current_version(event.type)
            out.append((event.event_id, event.type, version, encode_metadata(meta), event.payload))
        return out

    def recorded(self, row: StoredRow) -> RecordedEvent:
        position, stream_id, aggregate_type, version, event_id, type_, schema, meta, payload, at = (
            row
        )
        type_, payload, schema = self.upcasters.upcast(type_, payload, schema)
        return RecordedEvent(
            position=position,
            stream_id=stream_id,
            aggregate_type=aggregate_type,
            version=version,
            event_id=event_id,
            type=type_,
            payload=payload,
            metadata=decode_metadata(meta, schema),
            recorded_at=from_micros(at),
        )


def encode_metadata(meta: EventMetadata) -> bytes:
    """Metadata minus schema_version (kept in its own column); b"" when empty."""
    if meta is EMPTY_METADATA:
        return b""
    ids = meta.correlation_id or meta.causation_id
    if not (ids or meta.traceparent or meta.tracestate or meta.extra):
        return b""
    return envelope_pb2.EventMetadata(
        correlation_id=meta.correlation_id,
        causation_id=meta.causation_id,
        traceparent=meta.traceparent,
        tracestate=meta.tracestate,
        extra=dict(meta.extra),
    ).SerializeToString()


def decode_metadata(data: bytes, schema_version: int) -> EventMetadata:
    if not data:
        return EventMetadata(schema_version=schema_version)
    proto = envelope_pb2.EventMetadata.FromString(data)
    return metadata_from_proto(proto, schema_version)


def metadata_from_proto(proto: envelope_pb2.EventMetadata, schema_version: int) -> EventMetadata:
    return EventMetadata(
        correlation_id=proto.correlation_id,
        causation_id=proto.causation_id,
        traceparent=proto.traceparent,
        tracestate=proto.tracestate,
        schema_version=schema_version,
        extra=MappingProxyType(dict(proto.extra)),
    )


def to_micros(moment: datetime) -> int:
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(micros: int) -> datetime:
    return datetime.fromtimestamp(micros / 1_000_000, tz=UTC)


def to_envelope(event: RecordedEvent) -> envelope_pb2.EventEnvelope:
    """The protobuf envelope of a stored event (what gRPC and the bus send)."""
    recorded_at = Timestamp()
    recorded_at.FromDatetime(event.recorded_at)
    meta = event.metadata
    return envelope_pb2.EventEnvelope(
        event_id=event.event_id,
        type=event.type,
        aggregate_type=event.aggregate_type,
        stream_id=event.stream_id,
        version=event.version,
        position=event.position,
        recorded_at=recorded_at,
        metadata=envelope_pb2.EventMetadata(
            correlation_id=meta.correlation_id,
            causation_id=meta.causation_id,
            traceparent=meta.traceparent,
            tracestate=meta.tracestate,
            schema_version=meta.schema_version,
            extra=dict(meta.extra),
        ),
        payload=event.payload,
    )


def from_envelope(envelope: envelope_pb2.EventEnvelope) -> RecordedEvent:
    """A stored event from its envelope (e.g. received from the bus)."""
    return RecordedEvent(
        position=envelope.position,
        stream_id=envelope.stream_id,
        aggregate_type=envelope.aggregate_type,
        version=envelope.version,
        event_id=envelope.event_id,
        type=envelope.type,
        payload=envelope.payload,
        metadata=metadata_from_proto(envelope.metadata, envelope.metadata.schema_version),
        recorded_at=envelope.recorded_at.ToDatetime(tzinfo=UTC),
    )


def from_proposed(proposed: store_pb2.ProposedEvent) -> NewEvent:
    """The NewEvent for a gRPC ProposedEvent (a fresh UUID when it carries none)."""
    meta = proposed.metadata
    metadata = (
        metadata_from_proto(meta, meta.schema_version)
        if proposed.HasField("metadata")
        else EMPTY_METADATA
    )
    if proposed.event_id:
        return NewEvent(proposed.type, proposed.payload, metadata, proposed.event_id)
    return NewEvent(proposed.type, proposed.payload, metadata)
