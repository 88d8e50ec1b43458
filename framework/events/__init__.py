"""Event sourcing: the event store interface, aggregates, projections, upcasters.

Backends live in their own modules (`framework.events.sqlite`,
`framework.events.postgres`, `framework.events.nats`) so importing this package
imports no driver.
"""

from framework.events.aggregate import Aggregate, Repository, applies
from framework.events.projection import (
    Projection,
    ProjectionConfig,
    ProjectionHost,
    ProjectionRunner,
)
from framework.events.store import (
    AppendResult,
    EventMetadata,
    EventStore,
    NewEvent,
    RecordedEvent,
    Snapshot,
)
from framework.events.typeregistry import EventTypeRegistry
from framework.events.upcast import Upcasters

__all__ = [
    "Aggregate",
    "AppendResult",
    "EventMetadata",
    "EventStore",
    "EventTypeRegistry",
    "NewEvent",
    "Projection",
    "ProjectionConfig",
    "ProjectionHost",
    "ProjectionRunner",
    "RecordedEvent",
    "Repository",
    "Snapshot",
    "Upcasters",
    "applies",
]
