"""Event sourcing: the event store interface, aggregates, projections, upcasters.

Backends live in their own modules (`framework.events.sqlite`,
`framework.events.postgres`) so importing this package imports no driver.
"""

from framework.events.store import (
    AppendResult,
    EventMetadata,
    EventStore,
    NewEvent,
    RecordedEvent,
    Snapshot,
)

__all__ = [
    "AppendResult",
    "EventMetadata",
    "EventStore",
    "NewEvent",
    "RecordedEvent",
    "Snapshot",
]
