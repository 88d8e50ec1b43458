"""Idempotency keys required by the contract (`idempotency_key_required`).

Methods that declare `idempotency_key_required: true` (saga actions and other
writes a caller may repeat) must carry an `idempotency-key` metadata entry; the
server refuses a call without one with INVALID_ARGUMENT before the handler runs,
and `current_idempotency_key()` gives it to the handler. The client half,
`IdempotencyKeyPolicy(side=CLIENT)`, attaches a fresh UUID to such calls that
carry none, so a retry by the C core repeats the same key.
"""

from __future__ import annotations

import uuid
from contextvars import ContextVar

from framework.config import expect
from framework.errors import FieldViolation, InvalidArgumentError
from framework.policy import BasePolicy, Call, Enter, Exit, Method, Side

KEY = "idempotency-key"
MAX_KEY_LEN = 200

_current_key: ContextVar[str | None] = ContextVar("framework_idempotency_key", default=None)


def current_idempotency_key() -> str | None:
    """The idempotency key of the inbound call being handled, if it carried one."""
    return _current_key.get()


class IdempotencyKeyPolicy(BasePolicy):
    """Server: require the key where the contract asks; client: attach one where missing."""

    def __init__(self, side: Side = Side.SERVER) -> None:
        expect(side, Side, "IdempotencyKeyPolicy(side)", "Side.SERVER or Side.CLIENT")
        self.side = side
        self.sides = frozenset({side})

    def bind(self, method: Method) -> Enter | None:
        required = method.policy.idempotency_key_required
        if self.side is Side.CLIENT:
            return self._attach if required else None
        name = method.full_name

        def enter(call: Call) -> Exit | None:
            value = call.header(KEY)
            if isinstance(value, bytes):
                value = value.decode(errors="replace")
            if value:
                if len(value) > MAX_KEY_LEN:
                    raise InvalidArgumentError(
                        f"the {KEY} metadata entry is longer than {MAX_KEY_LEN} characters",
                        violations=[FieldViolation(KEY, f"at most {MAX_KEY_LEN} characters")],
                    )
                _current_key.set(value)
            elif required:
                raise InvalidArgumentError(
                    f"{name} needs an '{KEY}' metadata entry (e.g. a UUID) so a repeated "
                    "call is applied once",
                    violations=[FieldViolation(KEY, "required by the contract", "required")],
                )
            return None

        return enter

    @staticmethod
    def _attach(call: Call) -> Exit | None:
        if call.header(KEY) is None:
            call.add_metadata(KEY, str(uuid.uuid4()))
        return None
