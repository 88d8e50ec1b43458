"""Request validation declared in the contract (`framework/v1/validate.proto`).

Each message type is compiled once into a flat tuple of field checks (closures
over the rule's bound, compiled regex or allowed values), so validating a
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

Client-streaming methods are not validated by the policy: its enter runs
before the first message arrives.  Their handlers validate each message with
`Validators.validate(message)`.

Rule ids mirror protovalidate's (`required`, `string.min_len`, `int64.gt`,
`repeated.min_items`, `enum.defined_only` ...), so moving the annotations to
`buf.validate` later is a mechanical rewrite.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from framework.errors import FieldViolation, InvalidArgumentError
from framework.policy import BasePolicy, Call, Enter, Exit, Method, Side
from gen.framework.v1 import validate_pb2

__all__ = [
    "MessageValidator",
    "RuleSpec",
    "ValidationPolicy",
    "Validators",
    "field_rules",
    "rule_specs",
]

Violations = list[FieldViolation]
FieldCheck = Callable[[Any, str, Violations], None]
Test = Callable[[Any], bool]

UUID_PATTERN = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
EMAIL_PATTERN = re.compile(r"[^@\s]+@[^@\s.]+(\.[^@\s.]+)+")
EMAIL_MAX_LEN = 254

_T = FieldDescriptor
_TYPE_NAMES = {
    _T.TYPE_DOUBLE: "double",
    _T.TYPE_FLOAT: "float",
    _T.TYPE_INT64: "int64",
    _T.TYPE_UINT64: "uint64",
    _T.TYPE_INT32: "int32",
    _T.TYPE_FIXED64: "fixed64",
    _T.TYPE_FIXED32: "fixed32",
    _T.TYPE_BOOL: "bool",
    _T.TYPE_STRING: "string",
    _T.TYPE_BYTES: "bytes",
    _T.TYPE_UINT32: "uint32",
    _T.TYPE_ENUM: "enum",
    _T.TYPE_SFIXED32: "sfixed32",
    _T.TYPE_SFIXED64: "sfixed64",
    _T.TYPE_SINT32: "sint32",
    _T.TYPE_SINT64: "sint64",
    _T.TYPE_MESSAGE: "message",
}
_NUMBER_TYPES = frozenset(
    t for t, n in _TYPE_NAMES.items() if n not in {"string", "bytes", "bool", "enum", "message"}
)
_COMPARISONS: tuple[tuple[str, str, Callable[[float], Test]], ...] = (
    ("gt", "greater than", lambda b: lambda v: v > b),
    ("gte", "greater than or equal to", lambda b: lambda v: v >= b),
    ("lt", "less than", lambda b: lambda v: v < b),
    ("lte", "less than or equal to", lambda b: lambda v: v <= b),
)


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """One compiled rule of a field: its id, what it asks for, and its test."""

    rule: str  # "string.uuid"
    description: str  # "must be a UUID ..."
    test: Test  # True when the value passes
    per_item: bool = False  # on a repeated field: applies to each element
    presence: bool = False  # a message field that must be set (tested on the parent)


def _rules_of(field: FieldDescriptor) -> validate_pb2.FieldRules | None:
    options = field.GetOptions()
    if not options.HasExtension(validate_pb2.rules):
        return None
    return options.Extensions[validate_pb2.rules]


def _bound(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _is_repeated(field: FieldDescriptor) -> bool:
    return field.is_repeated


def _is_map(field: FieldDescriptor) -> bool:
    message = field.message_type
    return bool(message is not None and message.GetOptions().map_entry)


def field_rules(field: FieldDescriptor) -> list[RuleSpec]:
    """The rules declared on `field`, checked against its type; in declaration order."""
    rules = _rules_of(field)
    if rules is None:
        return []
    if _is_map(field):
        raise ValueError(f"{field.full_name}: validation rules on map fields are not supported")
    enum_values = (
        [(v.name, v.number) for v in field.enum_type.values] if field.enum_type is not None else []
    )
    return rule_specs(
        rules,
        where=field.full_name,
        field_type=field.type,
        repeated=_is_repeated(field),
        enum_values=enum_values,
        has_presence=field.has_presence,
    )


def rule_specs(
    rules: validate_pb2.FieldRules,
    *,
    where: str,
    field_type: int,
    repeated: bool,
    enum_values: Sequence[tuple[str, int]] = (),
    has_presence: bool = False,
) -> list[RuleSpec]:
    """Compile `rules` for a field of `field_type` (a FieldDescriptor.TYPE_* number).

    `where` names the field in errors; `enum_values` are (name, number) of its enum;
    `has_presence` (messages, proto3 `optional`, oneof members) makes `required`
    mean "set" rather than "not the default value".
    Also used by the reference generator, which reads descriptors without a pool.
    """
    kind = _TYPE_NAMES.get(field_type, "value")
    specs: list[RuleSpec] = []

    def need(ok: bool, rule: str, what: str) -> None:
        if not ok:
            raise ValueError(f"{where}: rule {rule} applies to {what} fields, not {kind}")

    if rules.required:
        if repeated:
            specs.append(RuleSpec("required", "is required (at least one item)", bool))
        elif field_type == _T.TYPE_MESSAGE or has_presence:
            specs.append(RuleSpec("required", "is required", bool, presence=True))
        else:
            specs.append(RuleSpec("required", "is required", bool))
    if rules.HasField("min_items"):
        need(repeated, "repeated.min_items", "repeated")
        least = rules.min_items
        specs.append(
            RuleSpec(
                "repeated.min_items",
                f"must have at least {_plural(least, 'item')}",
                lambda v: len(v) >= least,
            )
        )
    if rules.HasField("max_items"):
        need(repeated, "repeated.max_items", "repeated")
        most = rules.max_items
        specs.append(
            RuleSpec(
                "repeated.max_items",
                f"must have at most {_plural(most, 'item')}",
                lambda v: len(v) <= most,
            )
        )
    is_string = field_type == _T.TYPE_STRING
    if rules.HasField("min_len"):
        need(is_string, "string.min_len", "string")
        n = rules.min_len
        specs.append(
            RuleSpec(
                "string.min_len",
                f"must be at least {_plural(n, 'character')} long",
                lambda v: len(v) >= n,
                repeated,
            )
        )
    if rules.HasField("max_len"):
        need(is_string, "string.max_len", "string")
        m = rules.max_len
        specs.append(
            RuleSpec(
                "string.max_len",
                f"must be at most {_plural(m, 'character')} long",
                lambda v: len(v) <= m,
                repeated,
            )
        )
    if rules.pattern:
        need(is_string, "string.pattern", "string")
        try:
            regex = re.compile(rules.pattern)
        except re.error as error:
            raise ValueError(
                f"{where}: pattern {rules.pattern!r} is not a regex: {error}"
            ) from None
        specs.append(
            RuleSpec(
                "string.pattern",
                f"must match the pattern {rules.pattern}",
                lambda v: not v or regex.fullmatch(v) is not None,
                repeated,
            )
        )
    if rules.uuid:
        need(is_string, "string.uuid", "string")
        specs.append(
            RuleSpec(
                "string.uuid",
                "must be a UUID (8-4-4-4-12 hex digits)",
                lambda v: not v or UUID_PATTERN.fullmatch(v) is not None,
                repeated,
            )
        )
    if rules.email:
        need(is_string, "string.email", "string")
        specs.append(
            RuleSpec(
                "string.email",
                "must be an email address like name@example.com",
                lambda v: (
                    not v or (len(v) <= EMAIL_MAX_LEN and EMAIL_PATTERN.fullmatch(v) is not None)
                ),
                repeated,
            )
        )
    for name, words, make in _COMPARISONS:
        if rules.HasField(name):  # type: ignore[arg-type]
            need(field_type in _NUMBER_TYPES, f"{kind}.{name}", "number")
            bound = getattr(rules, name)
            specs.append(
                RuleSpec(
                    f"{kind}.{name}", f"must be {words} {_bound(bound)}", make(bound), repeated
                )
            )
    if rules.defined_only:
        need(field_type == _T.TYPE_ENUM, "enum.defined_only", "enum")
        allowed = frozenset(number for _, number in enum_values)
        names = ", ".join(name for name, _ in enum_values)
        specs.append(
            RuleSpec(
                "enum.defined_only",
                f"must be one of {names}",
                lambda v: v in allowed,
                repeated,
            )
        )
    return specs


def _field_check(
    field: FieldDescriptor, specs: Sequence[RuleSpec], nested: MessageValidator | None
) -> FieldCheck:
    """One closure checking every rule of one field (and its nested message's rules)."""
    name = field.name
    plain = [s for s in specs if not s.presence]
    whole = tuple((s.test, s.rule, s.description) for s in plain if not s.per_item)
    items = tuple((s.test, s.rule, s.description) for s in plain if s.per_item)
    presence = any(s.presence for s in specs)
    repeated = _is_repeated(field)
    singular_message = field.type == _T.TYPE_MESSAGE and not repeated

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
                if field.message_type is not None and not _is_map(field):
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
    request type declares no rules, and client-streaming methods (see the
    module doc), get no enter at all.
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

    def __repr__(self) -> str:
        return "ValidationPolicy()"
