"""Decode any event of the system by its type name (for `events tail` and the demo).

The generated modules of every contract under `gen/` are imported once, so their
message types are in the default descriptor pool; an event's `type` (its message's
full name) then finds its class.  Unknown types decode to None.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

__all__ = ["decode"]


@functools.cache
def _load_contracts() -> None:
    import gen

    for module in pkgutil.walk_packages(gen.__path__, "gen."):
        if module.name.endswith("_pb2"):
            importlib.import_module(module.name)


def decode(type_name: str, payload: bytes) -> Message | None:
    """The event message, or None when no contract defines `type_name`."""
    _load_contracts()
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(type_name)
    except KeyError:
        return None
    message = message_factory.GetMessageClass(descriptor)()
    try:
        message.ParseFromString(payload)
    except DecodeError:
        return None
    return message
