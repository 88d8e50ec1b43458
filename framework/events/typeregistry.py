"""Event types by full name: which message class a stored `type` decodes into.

Built once from generated modules (`EventTypeRegistry.from_modules(events_pb2)`)
or classes; the store refuses to append a type it does not know or a payload
that does not parse as its type, so nothing unreadable is ever stored.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from types import ModuleType

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.message import DecodeError, Message

from framework.errors import FieldViolation, InvalidArgumentError


class EventTypeRegistry:
    """Message full name -> message class, for encoding checks and decoding."""

    __slots__ = ("_classes",)

    def __init__(self, classes: Iterable[type[Message]] = ()) -> None:
        self._classes: dict[str, type[Message]] = {}
        for cls in classes:
            self.register(cls)

    @classmethod
    def from_modules(cls, *modules: ModuleType) -> EventTypeRegistry:
        """Every top-level message of the given generated `*_pb2` modules."""
        registry = cls()
        for module in modules:
            file_descriptor = getattr(module, "DESCRIPTOR", None)
            if file_descriptor is None:
                raise TypeError(f"{module.__name__} is not a generated *_pb2 module")
            for descriptor in file_descriptor.message_types_by_name.values():
                registry.register_descriptor(descriptor)
        return registry

    @classmethod
    def from_names(cls, *full_names: str, pool: DescriptorPool | None = None) -> EventTypeRegistry:
        """The named message types, looked up in `pool` (default: the default pool)."""
        registry = cls()
        pool = pool or descriptor_pool.Default()
        for name in full_names:
            try:
                descriptor = pool.FindMessageTypeByName(name)
            except KeyError as exc:
                raise ValueError(
                    f"{name} is not in the descriptor pool: import its *_pb2 module first"
                ) from exc
            registry.register_descriptor(descriptor)
        return registry

    def register(self, cls: type[Message]) -> None:
        name = cls.DESCRIPTOR.full_name
        known = self._classes.get(name)
        if known is not None and known is not cls:
            raise ValueError(f"event type {name} is registered twice with different classes")
        self._classes[name] = cls

    def register_descriptor(self, descriptor: Descriptor) -> None:
        self.register(message_factory.GetMessageClass(descriptor))

    def __contains__(self, type_name: object) -> bool:
        return type_name in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._classes))

    def __len__(self) -> int:
        return len(self._classes)

    def resolve(self, type_name: str) -> type[Message]:
        """The class for `type_name`; InvalidArgumentError naming the type when unknown."""
        cls = self._classes.get(type_name)
        if cls is None:
            raise InvalidArgumentError(
                f"unknown event type {type_name!r}: register its message class with the "
                f"store's EventTypeRegistry ({len(self._classes)} types known)",
                reason="UNKNOWN_EVENT_TYPE",
                violations=[FieldViolation("type", f"unknown event type {type_name!r}")],
                metadata={"type": type_name},
            )
        return cls

    def decode(self, type_name: str, payload: bytes) -> Message:
        """Parse `payload` as `type_name`; InvalidArgumentError when it does not parse."""
        message = self.resolve(type_name)()
        try:
            message.ParseFromString(payload)
        except DecodeError as exc:
            raise InvalidArgumentError(
                f"payload of {len(payload)} bytes does not parse as {type_name}: {exc}",
                reason="BAD_EVENT_PAYLOAD",
                violations=[FieldViolation("payload", f"does not parse as {type_name}")],
                metadata={"type": type_name},
            ) from exc
        return message
