"""HTTP/JSON <-> protobuf for one binding, per the protobuf JSON mapping.

Request: the body (the whole request for `body: "*"`, one field for
`body: "field"`, none otherwise) is parsed with protobuf's own JSON parser
(`json_format`: lowerCamel or original names, int64 as string or number,
enums by name or number, well-known types in their JSON forms); then path
variables, then query parameters (only when the body is not `*`) are merged in.
A query parameter names a field by its dotted path (`filter.min_pages=10`,
lowerCamel or original names); repeating it fills a repeated field.  Path
values win over the body.  Anything that does not fit raises
`InvalidArgumentError` naming the field and the problem.

Response: the whole message, or the `response_body` field, as JSON with every
field shown (zero values included; message fields only when set).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from framework.errors import FieldViolation, InvalidArgumentError
from framework.gateway.routes import Binding

__all__ = ["RequestCodec", "to_json_bytes"]

_FD = FieldDescriptor
_INTEGER_TYPES = frozenset(
    {
        _FD.TYPE_INT32,
        _FD.TYPE_INT64,
        _FD.TYPE_UINT32,
        _FD.TYPE_UINT64,
        _FD.TYPE_SINT32,
        _FD.TYPE_SINT64,
        _FD.TYPE_FIXED32,
        _FD.TYPE_FIXED64,
        _FD.TYPE_SFIXED32,
        _FD.TYPE_SFIXED64,
    }
)
_FLOAT_TYPES = frozenset({_FD.TYPE_DOUBLE, _FD.TYPE_FLOAT})
# Well-known message types whose JSON form is a string, so a query parameter can carry them.
_STRING_FORMS = frozenset(
    {
        "google.protobuf.Timestamp",
        "google.protobuf.Duration",
        "google.protobuf.FieldMask",
        "google.protobuf.Value",
    }
)
_WRAPPERS = frozenset(
    f"google.protobuf.{n}Value"
    for n in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
)


def _bad(field: str, description: str, message: str | None = None) -> InvalidArgumentError:
    return InvalidArgumentError(
        message or f"{field}: {description}",
        violations=[FieldViolation(field, description)],
    )


def to_json_bytes(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _scalar(field: FieldDescriptor, raw: str, name: str) -> Any:
    """A query or path string as the JSON value the parser expects for `field`."""
    kind = field.type
    if kind == _FD.TYPE_STRING or kind == _FD.TYPE_BYTES:
        return raw
    if kind == _FD.TYPE_BOOL:
        lowered = raw.lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
        raise _bad(name, f"expected true or false, got {raw!r}")
    if kind in _INTEGER_TYPES:
        return raw  # the JSON parser reads integers from strings and checks the range
    if kind in _FLOAT_TYPES:
        if raw in ("NaN", "Infinity", "-Infinity"):
            return raw
        try:
            return float(raw)
        except ValueError:
            raise _bad(name, f"expected a number, got {raw!r}") from None
    if kind == _FD.TYPE_ENUM:
        return int(raw) if raw.lstrip("-").isdigit() else raw
    message = field.message_type
    if message is not None:
        if message.full_name in _STRING_FORMS:
            return raw
        if message.full_name in _WRAPPERS:
            return _scalar(message.fields_by_name["value"], raw, name)
    raise _bad(name, "this field cannot be set from a query parameter or path")


class RequestCodec:
    """Builds the request message of one binding; one per binding, made once."""

    __slots__ = ("_body_field", "_cls", "_response_field", "binding", "query_fields")

    def __init__(self, binding: Binding) -> None:
        self.binding = binding
        self._cls: type[Message] = GetMessageClass(binding.method.input_type)
        self._body_field = (
            binding.method.input_type.fields_by_name[binding.body]
            if binding.body not in ("", "*")
            else None
        )
        response = binding.method.output_type
        self._response_field = (
            response.fields_by_name[binding.response_body] if binding.response_body else None
        )
        # Query parameter name (dotted, original or lowerCamel) -> (field path, leaf field)
        self.query_fields: dict[str, tuple[tuple[str, ...], FieldDescriptor]] = {}
        if binding.body != "*":
            excluded = set(binding.path_fields)
            if binding.body:
                excluded.add(binding.body)
            for path, leaf in _leaves(binding.method.input_type, ()):
                dotted = ".".join(path)
                if any(dotted == e or dotted.startswith(e + ".") for e in excluded):
                    continue
                self.query_fields[dotted] = (path, leaf)
                camel = ".".join(_json_names(binding.method.input_type, path))
                self.query_fields.setdefault(camel, (path, leaf))

    def request(
        self,
        body: bytes,
        path_variables: Mapping[str, str],
        query: Iterable[tuple[str, str]],
    ) -> Message:
        message = self._cls()
        if self.binding.body:
            self._parse_body(message, body)
        updates: dict[str, Any] = {}
        for key, raw in query:
            found = self.query_fields.get(key)
            if found is None:
                raise _unknown_parameter(key, self.binding)
            path, leaf = found
            value = _scalar(leaf, raw, key)
            if leaf.is_repeated:
                _container(updates, path[:-1]).setdefault(path[-1], []).append(value)
            else:
                _container(updates, path[:-1])[path[-1]] = value
        request_type = self.binding.method.input_type
        for name, raw in path_variables.items():
            path = tuple(name.split("."))
            leaf = _leaf(request_type, path)
            _container(updates, path[:-1])[path[-1]] = _scalar(leaf, raw, name)
        if updates:
            _parse(updates, message, "the path or query parameters")
        return message

    def _parse_body(self, message: Message, body: bytes) -> None:
        if not body.strip():
            return  # no body: an empty message (or field)
        try:
            value = json.loads(body)
        except RecursionError:
            raise _bad("body", "the JSON is nested too deeply") from None
        except (UnicodeDecodeError, ValueError) as error:
            raise _bad("body", f"the request body is not valid JSON: {error}") from None
        field = self._body_field
        if field is None:
            if not isinstance(value, dict):
                raise _bad("body", f"expected a JSON object, got {type(value).__name__}")
            _parse(value, message, "the request body")
        else:
            _parse({field.name: value}, message, f"the request body (field {field.name})")

    def response(self, message: Message) -> Any:
        """The JSON value of the response (the whole message or its response_body)."""
        field = self._response_field
        if field is None:
            return _to_dict(message)
        if field.message_type is not None and not field.is_repeated:
            return _to_dict(getattr(message, field.name))
        return _to_dict(message).get(field.json_name)


def _to_dict(message: Message) -> Any:
    return json_format.MessageToDict(
        message, always_print_fields_with_no_presence=True, preserving_proto_field_name=False
    )


def _parse(value: Any, message: Message, what: str) -> None:
    try:
        json_format.ParseDict(value, message, ignore_unknown_fields=False)
    except json_format.ParseError as error:
        text = str(error)
        raise InvalidArgumentError(
            f"{what} does not fit {message.DESCRIPTOR.full_name}: {text}",
            violations=[FieldViolation(_field_named(text), text)],
        ) from None
    except RecursionError:
        raise _bad("body", "the JSON is nested too deeply") from None


def _field_named(text: str) -> str:
    """The field a json_format error is about (its messages say `... field: ...` or
    `has no field named "x"`), else "body"."""
    marker = 'has no field named "'
    start = text.find(marker)
    if start >= 0:
        end = text.find('"', start + len(marker))
        return text[start + len(marker) : end]
    if text.startswith("Failed to parse "):
        return text[len("Failed to parse ") :].split(" field", 1)[0]
    return "body"


def _container(root: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    node = root
    for name in path:
        node = node.setdefault(name, {})
    return node


def _leaf(message: Descriptor, path: tuple[str, ...]) -> FieldDescriptor:
    descriptor: Descriptor | None = message
    field: FieldDescriptor | None = None
    for name in path:
        assert descriptor is not None
        field = descriptor.fields_by_name[name]
        descriptor = field.message_type
    assert field is not None
    return field


def _json_names(message: Descriptor, path: tuple[str, ...]) -> list[str]:
    names: list[str] = []
    descriptor: Descriptor | None = message
    for name in path:
        assert descriptor is not None
        field = descriptor.fields_by_name[name]
        names.append(field.json_name)
        descriptor = field.message_type
    return names


def _leaves(
    message: Descriptor, prefix: tuple[str, ...], depth: int = 0
) -> Iterable[tuple[tuple[str, ...], FieldDescriptor]]:
    """Fields a query parameter can set: scalars, enums, string-form and wrapper WKTs,
    repeated ones of those; nested messages recursively (not maps, bounded depth)."""
    for field in message.fields:
        path = (*prefix, field.name)
        nested = field.message_type
        if nested is None or nested.full_name in _STRING_FORMS or nested.full_name in _WRAPPERS:
            yield path, field
        elif not field.is_repeated and not nested.GetOptions().map_entry and depth < 5:
            if nested.full_name.startswith("google.protobuf."):
                continue  # Struct, Any, ...: JSON bodies only
            yield from _leaves(nested, path, depth + 1)


def _unknown_parameter(key: str, binding: Binding) -> InvalidArgumentError:
    if binding.body == "*":
        hint = "this route takes every field in the JSON body, so it accepts no query parameters"
    else:
        hint = "query parameters name request fields by their dotted path, e.g. a.b=1"
    return _bad(key, f"unknown query parameter {key!r}; {hint}")
