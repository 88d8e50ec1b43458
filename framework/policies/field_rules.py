"""Field rules from the contract (`framework.v1.rules`), compiled into tests.

`field_rules(field)` reads a field's `FieldRules` option and returns one
`RuleSpec` per rule: its id (mirroring protovalidate's: `string.uuid`,
`int64.gt`, `repeated.min_items` ...), a description a person can act on, and
a test closed over the rule's bound, compiled regex or allowed values. A rule
that does not fit the field's type raises `ValueError` naming the field.
`framework.policies.validation` turns these into per-message validators;
`framework.reference` uses `rule_specs` to describe them in the docs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from gen.framework.v1 import validate_pb2

__all__ = ["RuleSpec", "field_rules", "is_map", "is_repeated", "rule_specs"]

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


def is_repeated(field: FieldDescriptor) -> bool:
    return field.is_repeated


def is_map(field: FieldDescriptor) -> bool:
    message = field.message_type
    return bool(message is not None and message.GetOptions().map_entry)


def field_rules(field: FieldDescriptor) -> list[RuleSpec]:
    """The rules declared on `field`, checked against its type; in declaration order."""
    rules = _rules_of(field)
    if rules is None:
        return []
    if is_map(field):
        raise ValueError(f"{field.full_name}: validation rules on map fields are not supported")
    enum_values = (
        [(v.name, v.number) for v in field.enum_type.values] if field.enum_type is not None else []
    )
    return rule_specs(
        rules,
        where=field.full_name,
        field_type=field.type,
        repeated=is_repeated(field),
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
