"""Request validation declared in the contract (`framework/v1/validate.proto`).

Each message type is compiled once into a flat tuple of field checks (closures
over the rule's bound, compiled regex or allowed values; see
`framework.policies.field_rules`), so validating a
request costs a few attribute reads and comparisons, no descriptor walk.  A
contract whose rules do not fit the field (a `uuid` rule on a number, a broken
regex) fails when its message is compiled, i.e. when the server binds the
method, not on a call.

`ValidationPolicy` runs the compiled checks on the server before the handler
(and, if also listed in a client chain, before the request is sent):
a bad request becomes `InvalidArgumentError` (INVALID_ARGUMENT) with one
`FieldViolation` per failed rule (dotted field path, a readable description
and the rule id such as `string.uuid`), which the error mapping sends as a
`google.rpc.BadRequest`.

Streamed requests (client-streaming and bidi methods) are validated on the
server message by message, through the chain's per-message hook
(`bind_messages`): the first bad message ends the call with INVALID_ARGUMENT.

Rule ids mirror protovalidate's (`required`, `string.min_len`, `int64.gt`,
`repeated.min_items`, `enum.defined_only` ...), so moving the annotations to
`buf.validate` later is a mechanical rewrite.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from framework.errors import FieldViolation, InvalidArgumentError
from framework.policies.field_rules import RuleSpec, field_rules, is_map, is_repeated
from framework.policy import BasePolicy, Call, Enter, Exit, Method, Side

__all__ = ["MessageValidator", "ValidationPolicy", "Validators"]

Violations = list[FieldViolation]
FieldCheck = Callable[[Any, str, Violations], None]
_MESSAGE = FieldDescriptor.TYPE_MESSAGE


def _field_check(
    field: FieldDescriptor, specs: Sequence[RuleSpec], nested: MessageValidator | None
) -> FieldCheck:
    """One closure checking every rule of one field (and its nested message's rules)."""
    name = field.name
    plain = [s for s in specs if not s.presence]
    whole = tuple((s.test, s.rule, s.description) for s in plain if not s.per_item)
    items = tuple((s.test, s.rule, s.description) for s in plain if s.per_item)
    presence = any(s.presence for s in specs)
    repeated = is_repeated(field)
    singular_message = field.type == _MESSAGE and not repeated

    def check(message: Any, prefix: str, out: Violations) -> None:
        if presence and not message.HasField(name):
            out.append(FieldViolation(prefix + name, "is required", "required"))
            return
        value = getattr(message, name)
        for test, rule, description in whole:
            if not test(value):
                out.append(FieldViolation(prefix + name, description, rule))
        if items:
            for i, item in enumerate(value):
                for test, rule, description in items:
                    if not test(item):
                        out.append(FieldViolation(f"{prefix}{name}[{i}]", description, rule))
        if nested is not None:
            if singular_message:
                if message.HasField(name):
                    nested.collect(value, f"{prefix}{name}.", out)
            else:
                for i, item in enumerate(value):
                    nested.collect(item, f"{prefix}{name}[{i}].", out)

    return check


class MessageValidator:
    """The compiled checks of one message type."""

    __slots__ = ("checks", "full_name", "name")

    def __init__(self, descriptor: Descriptor) -> None:
        self.full_name: str = descriptor.full_name
        self.name: str = descriptor.name
        self.checks: tuple[FieldCheck, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.checks

    def collect(self, message: Any, prefix: str, out: Violations) -> None:
        for check in self.checks:
            check(message, prefix, out)

    def violations(self, message: Message) -> list[FieldViolation]:
        """Every rule `message` breaks, in field order; empty when it is valid."""
        out: Violations = []
        for check in self.checks:
            check(message, "", out)
        return out

    def validate(self, message: Message) -> None:
        """Raise `InvalidArgumentError` listing every broken rule; return if valid."""
        out: Violations = []
        for check in self.checks:
            check(message, "", out)
        if out:
            details = "; ".join(f"{v.field} {v.description}" for v in out)
            raise InvalidArgumentError(f"invalid {self.name}: {details}", violations=out)


class Validators:
    """Compiled validators by message type: each type is compiled once, on first use."""

    def __init__(self) -> None:
        self._compiled: dict[str, MessageValidator] = {}
        self._compiling: set[str] = set()

    def for_descriptor(self, descriptor: Descriptor) -> MessageValidator:
        validator = self._compiled.get(descriptor.full_name)
        if validator is None:
            validator = self._compile(descriptor)
        return validator

    def validate(self, message: Message) -> None:
        """Check one message against its type's rules (e.g. each message of a stream)."""
        self.for_descriptor(message.DESCRIPTOR).validate(message)  # type: ignore[arg-type]

    def _compile(self, descriptor: Descriptor) -> MessageValidator:
        name = descriptor.full_name
        validator = MessageValidator(descriptor)
        # Registered before its fields are compiled, so recursive types refer to it;
        # a type still being compiled counts as having checks (they are filled in below).
        self._compiled[name] = validator
        self._compiling.add(name)
        try:
            checks: list[FieldCheck] = []
            for field in descriptor.fields:
                specs = field_rules(field)
                nested: MessageValidator | None = None
                if field.message_type is not None and not is_map(field):
                    candidate = self.for_descriptor(field.message_type)
                    if not candidate.empty or candidate.full_name in self._compiling:
                        nested = candidate
                if specs or nested is not None:
                    checks.append(_field_check(field, specs, nested))
        except BaseException:
            del self._compiled[name]  # never leave a half-compiled type that passes all
            raise
        finally:
            self._compiling.discard(name)
        validator.checks = tuple(checks)
        return validator


class ValidationPolicy(BasePolicy):
    """Reject requests that break their contract's field rules.

    On the server it runs before the handler. It may also go in a client chain,
    to fail fast without a network hop; the caller gets the same
    `InvalidArgumentError` either way. Bound once per method: methods whose
    request type declares no rules get no enter at all; streamed requests are
    checked per message (see the module doc).
    """

    sides = frozenset({Side.SERVER, Side.CLIENT})

    def __init__(self, validators: Validators | None = None) -> None:
        self.validators = validators or Validators()

    def bind(self, method: Method) -> Enter | None:
        descriptor = method.descriptor
        if descriptor is None or method.arity.request_streaming:
            return None
        validator = self.validators.for_descriptor(descriptor.input_type)
        if validator.empty:
            return None
        validate = validator.validate

        def enter(call: Call) -> Exit | None:
            validate(call.request)  # type: ignore[arg-type]
            return None

        return enter

    def bind_messages(self, method: Method) -> Callable[[Any], None] | None:
        """Server side, streamed requests: validate every message as it arrives."""
        descriptor = method.descriptor
        if descriptor is None:
            return None
        validator = self.validators.for_descriptor(descriptor.input_type)
        return None if validator.empty else validator.validate

    def __repr__(self) -> str:
        return "ValidationPolicy()"
