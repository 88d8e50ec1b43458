"""Schema evolution: upcasters turn an old event version into the current one on read.

An upcaster is registered for (event type, schema version it reads) and
returns the event at the next version, possibly under a new type name.  The
store writes every event with its type's current schema version and, on read,
applies upcasters in a chain until no more apply, so domain code only ever
sees current events.  Stored rows are never rewritten.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from google.protobuf.message import Message

from framework.errors import InvalidArgumentError

RawUpcast = Callable[[bytes], tuple[str, bytes]]
M = TypeVar("M", bound=Message)


class Upcasters:
    """A table (type, from_version) -> function, applied in a chain on read.

    A step that keeps the type moves the event to `from_version + 1` (or
    `to_version`).  A step that renames the type (returns another full name)
    moves it to version 1 of the target type, or `to_version` when the step
    already produces a later version of it; so the target type's own upcasters
    then run from there.  (Keeping the old number across a rename would label
    old data with a version of the new type it does not have.)
    """

    __slots__ = ("_current", "_table")

    def __init__(self) -> None:
        self._table: dict[tuple[str, int], tuple[RawUpcast, int | None]] = {}
        self._current: dict[str, int] = {}

    def add_raw(
        self,
        event_type: str,
        from_version: int,
        upcast: RawUpcast,
        *,
        to_version: int | None = None,
    ) -> None:
        """Register `upcast(payload) -> (type, payload)` for `event_type` at `from_version`.

        `to_version`: the version of what `upcast` returns (default: the next
        version of the same type, or version 1 of a renamed type).
        """
        if from_version < 1:
            raise ValueError(f"from_version must be >= 1, got {from_version}")
        if to_version is not None and to_version < 1:
            raise ValueError(f"to_version must be >= 1, got {to_version}")
        key = (event_type, from_version)
        if key in self._table:
            raise ValueError(f"an upcaster for {event_type} v{from_version} is already registered")
        self._table[key] = (upcast, to_version)
        self._current[event_type] = max(self._current.get(event_type, 1), from_version + 1)

    def add(
        self,
        old_class: type[M],
        from_version: int,
        upcast: Callable[[M], Message],
        *,
        to_version: int | None = None,
    ) -> None:
        """Register a message-level upcaster: `upcast(old message) -> newer message`.

        The returned message's full name becomes the event's type (a rename is
        allowed); its version becomes `from_version + 1` for the same type, or
        `to_version` (default 1) for a renamed one: see the class docstring.
        """

        def raw(payload: bytes) -> tuple[str, bytes]:
            old = old_class()
            old.ParseFromString(payload)
            new = upcast(old)
            return new.DESCRIPTOR.full_name, new.SerializeToString()

        self.add_raw(old_class.DESCRIPTOR.full_name, from_version, raw, to_version=to_version)

    def current_version(self, event_type: str) -> int:
        """Schema version new events of `event_type` are written with (1 without upcasters)."""
        return self._current.get(event_type, 1)

    def upcast(self, event_type: str, payload: bytes, version: int) -> tuple[str, bytes, int]:
        """Bring (type, payload) at `version` to the current version; returns the new triple."""
        if not self._table:
            return event_type, payload, version
        for _ in range(len(self._table) + 1):
            entry = self._table.get((event_type, version))
            if entry is None:
                return event_type, payload, version
            step, to_version = entry
            new_type, payload = step(payload)
            if to_version is not None:
                version = to_version
            elif new_type == event_type:
                version += 1
            else:
                version = 1
            event_type = new_type
        raise InvalidArgumentError(f"upcaster chain for {event_type} does not end (a cycle?)")
