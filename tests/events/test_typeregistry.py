"""The event type registry: full names to message classes, bad types and payloads refused."""

from __future__ import annotations

import pytest

from framework.errors import InvalidArgumentError
from framework.events.typeregistry import EventTypeRegistry
from gen.events.v1 import testing_pb2
from gen.events.v1.testing_pb2 import AmountDeposited

DEPOSITED = "events.v1.testing.AmountDeposited"


def test_type_registry_from_modules_and_pool_names() -> None:
    """The registry resolves full names to classes from modules or the descriptor pool."""
    by_module = EventTypeRegistry.from_modules(testing_pb2)
    by_name = EventTypeRegistry.from_names(DEPOSITED)
    assert DEPOSITED in by_module and list(by_name) == [DEPOSITED]
    decoded = by_name.decode(DEPOSITED, AmountDeposited(amount=4).SerializeToString())
    assert isinstance(decoded, AmountDeposited) and decoded.amount == 4
    with pytest.raises(ValueError, match="not in the descriptor pool"):
        EventTypeRegistry.from_names("no.such.Type")


def test_unknown_type_and_bad_payload_are_invalid_argument() -> None:
    """Unknown names and unparsable payloads raise InvalidArgumentError with a stable reason."""
    registry = EventTypeRegistry.from_modules(testing_pb2)
    with pytest.raises(InvalidArgumentError) as unknown:
        registry.resolve("x.v1.Nope")
    assert unknown.value.reason == "UNKNOWN_EVENT_TYPE"
    with pytest.raises(InvalidArgumentError) as bad:
        registry.decode(DEPOSITED, b"\xff\xff")
    assert bad.value.reason == "BAD_EVENT_PAYLOAD"
    assert bad.value.violations[0].field == "payload"
