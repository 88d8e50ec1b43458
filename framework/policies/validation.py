"""Request validation declared in the contract with protovalidate's `buf.validate` rules.

Contracts import `buf/validate/validate.proto` and annotate fields, oneofs and
messages (`(buf.validate.field).string.uuid = true`, `(buf.validate.message).cel =
{...}` for rules across fields); the same annotations Go, Java, C++ and TypeScript
services check. The `protovalidate` package (a native engine) evaluates them,
CEL rules included, on the generated google.protobuf messages.

`ValidationPolicy` runs it on the server before the handler (and, if also listed
in a client chain, before the request is sent): a bad request becomes
`InvalidArgumentError` (INVALID_ARGUMENT) with one `FieldViolation` per broken rule
(the field path such as `lines[0].sku`, protovalidate's message, and its rule id
such as `string.uuid` or a CEL rule's own id), which the error mapping sends as a
`google.rpc.BadRequest`. It is bound once per method: a request type with no rule
anywhere (nested messages included) costs nothing per call, and a rule that does
not fit its field (a string rule on a number, a CEL expression that does not
compile) fails when the method is bound, not on a call.

Streamed requests (client-streaming and bidi methods) are validated on the server
message by message, through the chain's per-message hook (`bind_messages`): the
first bad message ends the call with INVALID_ARGUMENT.

`rules_of(field)` reads a field's `buf.validate.FieldRules` (for the reference, the
gateway's OpenAPI, saga definitions); `describe_rules` says them in words.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import protovalidate
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from framework.errors import FieldViolation, InvalidArgumentError
from framework.policy import BasePolicy, Call, Enter, Exit, Method, Side
from gen.buf.validate import validate_pb2

__all__ = ["ValidationPolicy", "Validators", "describe_rules", "rules_of"]


def rules_of(field: FieldDescriptor) -> validate_pb2.FieldRules | None:
    """The `(buf.validate.field)` rules declared on `field`, or None."""
    options = field.GetOptions()
    if options.HasExtension(validate_pb2.field):
        return options.Extensions[validate_pb2.field]
    return None


def _path(path: Any) -> str:
    """`lines[0].sku` from a buf.validate.FieldPath."""
    out: list[str] = []
    for element in path.elements:
        name = element.field_name or f"#{element.field_number}"
        out.append(("." if out else "") + name)
        subscript = element.subscript
        if subscript is not None and subscript.value is not None:
            key = subscript.value
            out.append(f"[{key!r}]" if isinstance(key, str) else f"[{key}]")
    return "".join(out)


def field_violations(found: list[protovalidate.Violation]) -> list[FieldViolation]:
    """protovalidate's violations as the framework's `FieldViolation`s, in its order."""
    out: list[FieldViolation] = []
    for violation in found:
        proto = violation.proto
        field = _path(proto.field) if proto.field is not None else ""
        if proto.for_key:
            field += " (key)"
        out.append(FieldViolation(field, proto.message or proto.rule_id, proto.rule_id))
    return out


class Validators:
    """One protovalidate engine and what it knows about each request type.

    Share one between policies (or servers) to share its compiled rules.
    """

    def __init__(self, validator: protovalidate.Validator | None = None) -> None:
        if validator is not None and not isinstance(validator, protovalidate.Validator):
            raise TypeError(
                f"validator must be a protovalidate.Validator, got {type(validator).__name__}"
            )
        self.validator = validator if validator is not None else protovalidate.Validator()
        self._has_rules: dict[str, bool] = {}

    def has_rules(self, descriptor: Descriptor) -> bool:
        """Whether `descriptor` or any message it contains declares a buf.validate rule."""
        known = self._has_rules.get(descriptor.full_name)
        if known is None:
            known = self._walk(descriptor, set())
            self._has_rules[descriptor.full_name] = known
        return known

    def _walk(self, descriptor: Descriptor, seen: set[str]) -> bool:
        if descriptor.full_name in seen:
            return False
        seen.add(descriptor.full_name)
        if descriptor.GetOptions().HasExtension(validate_pb2.message):
            return True
        if any(o.GetOptions().HasExtension(validate_pb2.oneof) for o in descriptor.oneofs):
            return True
        for field in descriptor.fields:
            if field.GetOptions().HasExtension(validate_pb2.field):
                return True
            if field.message_type is not None and self._walk(field.message_type, seen):
                return True
        return False

    def prepare(self, descriptor: Descriptor) -> None:
        """Compile the rules of `descriptor` now: a broken rule raises here, named."""
        try:
            self.validator.collect_violations(message_factory.GetMessageClass(descriptor)())
        except (protovalidate.CompilationError, protovalidate.EvaluationError) as error:
            raise ValueError(f"{descriptor.full_name}: its buf.validate rules: {error}") from None

    def violations(self, message: Message) -> list[FieldViolation]:
        """Every rule `message` breaks; empty when it is valid."""
        return field_violations(self.validator.collect_violations(message))

    def validate(self, message: Message) -> None:
        """Raise `InvalidArgumentError` listing every broken rule; return if valid."""
        found = self.validator.collect_violations(message)
        if found:
            raise _invalid(message.DESCRIPTOR.name, found)


def _invalid(name: str, found: list[protovalidate.Violation]) -> InvalidArgumentError:
    violations = field_violations(found)
    details = "; ".join(
        f"{v.field}: {v.description}" if v.field else v.description for v in violations
    )
    return InvalidArgumentError(f"invalid {name}: {details}", violations=violations)


class ValidationPolicy(BasePolicy):
    """Reject requests that break their contract's `buf.validate` rules.

    On the server it runs before the handler. It may also go in a client chain,
    to fail fast without a network hop; the caller gets the same
    `InvalidArgumentError` either way. Bound once per method: methods whose
    request type declares no rules get no enter at all; streamed requests are
    checked per message (see the module doc).
    """

    sides = frozenset({Side.SERVER, Side.CLIENT})

    def __init__(self, validators: Validators | None = None) -> None:
        if validators is not None and not isinstance(validators, Validators):
            raise TypeError(
                "validators must be a framework.policies.validation.Validators, "
                f"got {type(validators).__name__}"
            )
        self.validators = validators if validators is not None else Validators()

    def _check(self, method: Method) -> Callable[[Any], None] | None:
        descriptor = method.descriptor
        if descriptor is None:
            return None
        request = descriptor.input_type
        if not self.validators.has_rules(request):
            return None
        self.validators.prepare(request)
        collect = self.validators.validator.collect_violations
        name = request.name

        def check(message: Any) -> None:
            found = collect(message)
            if found:
                raise _invalid(name, found)

        return check

    def bind(self, method: Method) -> Enter | None:
        if method.arity.request_streaming:
            return None
        check = self._check(method)
        if check is None:
            return None

        def enter(call: Call) -> Exit | None:
            check(call.request)
            return None

        return enter

    def bind_messages(self, method: Method) -> Callable[[Any], None] | None:
        """Server side, streamed requests: validate every message as it arrives."""
        return self._check(method)

    def __repr__(self) -> str:
        return "ValidationPolicy()"


# ---------------------------------------------------------------- rules in words

_COMPARE = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
_STRING_WORDS = {
    "uuid": "a UUID",
    "tuuid": "a UUID without dashes",
    "email": "an email address",
    "hostname": "a host name",
    "ip": "an IP address",
    "ipv4": "an IPv4 address",
    "ipv6": "an IPv6 address",
    "uri": "a URI",
    "uri_ref": "a URI reference",
    "address": "a host name or IP address",
    "ulid": "a ULID",
}


def _literal(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"`{value}`" if isinstance(value, str) else str(value)


def _kind_words(kind: str, rules: Any) -> list[tuple[str, str]]:
    """(rule id, words) for the rules of one type (`string`, `int32`, `repeated`...)."""
    out: list[tuple[str, str]] = []
    for field, value in rules.ListFields():
        name = field.name
        rule = f"{kind}.{name}"
        if name in _COMPARE:
            out.append((rule, f"{_COMPARE[name]} {_literal(value)}"))
        elif name in ("min_len", "max_len", "len"):
            words = {"min_len": "at least", "max_len": "at most", "len": "exactly"}[name]
            out.append((rule, f"{words} {value} characters"))
        elif name in ("min_items", "max_items"):
            words = "at least" if name == "min_items" else "at most"
            out.append((rule, f"{words} {value} items"))
        elif name in ("min_pairs", "max_pairs"):
            words = "at least" if name == "min_pairs" else "at most"
            out.append((rule, f"{words} {value} entries"))
        elif name == "pattern":
            out.append((rule, f"matches `{value}`"))
        elif name in _STRING_WORDS and value is True:
            out.append((rule, _STRING_WORDS[name]))
        elif name == "defined_only" and value:
            out.append((rule, "a value the enum defines"))
        elif name == "unique" and value:
            out.append((rule, "no duplicates"))
        elif name in ("items", "keys", "values"):
            for sub_rule, words in describe_rules(value):
                out.append((sub_rule, f"{name}: {words}"))
        elif name in ("in", "not_in"):
            listed = ", ".join(_literal(v) for v in value)
            out.append((rule, f"{'one of' if name == 'in' else 'none of'} {listed}"))
        else:
            plain = list(value) if field.is_repeated else value
            out.append((rule, f"{name} = {_literal(plain)}"))
    return out


def describe_rules(rules: validate_pb2.FieldRules) -> list[tuple[str, str]]:
    """(rule id, what it asks for in words) for each rule in `rules`, in declaration order."""
    out: list[tuple[str, str]] = []
    if rules.required:
        out.append(("required", "required"))
    kind = rules.WhichOneof("type")
    if kind is not None:
        out.extend(_kind_words(kind, getattr(rules, kind)))
    for rule in rules.cel:
        out.append((rule.id, rule.message or f"`{rule.expression}`"))
    for expression in rules.cel_expression:
        out.append((expression, f"`{expression}`"))
    if rules.ignore:
        out.append(("ignore", validate_pb2.Ignore.Name(rules.ignore).lower().replace("_", " ")))
    return out
