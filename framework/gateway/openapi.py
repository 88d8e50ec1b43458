"""OpenAPI 3.1 from the descriptors: one operation per HTTP binding.

- Paths: each template with its variables as path parameters (a variable
  bound to several segments, `{name=shelves/*}`, gets a `pattern`).
- Parameters: path variables, query parameters (every field the body does not
  carry, dotted for nested messages), `Idempotency-Key` where the contract
  requires it, `grpc-timeout`.
- Schemas: one per message and enum, per the protobuf JSON mapping (int64 as
  integer or string, enums by name, well-known types in their JSON forms), the
  contract's `buf.validate` rules as constraints (`maxLength`, `pattern`,
  `minimum`, `minItems`, `format: uuid|email`, `enum` for `in`...; CEL rules,
  which JSON Schema cannot say, are left to the service), and the proto comments
  (`gen/comments.json`, written by `make protos`) as descriptions.
- Responses: 200 with the response (or its `response_body` field; NDJSON and
  Server-Sent Events for server streams), every error as `google.rpc.Status`.
- Security: a bearer-token scheme; methods that need a token list the
  contract's scopes, public methods have none.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from framework.gateway.config import GatewayConfig
from framework.gateway.routes import Binding, RouteTable
from framework.gateway.transcode import RequestCodec
from framework.policies.validation import rules_of
from framework.policy import Chain, Method
from gen.buf.validate import validate_pb2

__all__ = ["openapi_document"]

logger = logging.getLogger(__name__)

_FD = FieldDescriptor
_REF = "#/components/schemas/"
_STATUS = "google.rpc.Status"
_SIGNED = {_FD.TYPE_INT32, _FD.TYPE_SINT32, _FD.TYPE_SFIXED32}
_UNSIGNED = {_FD.TYPE_UINT32, _FD.TYPE_FIXED32}
_LONG = {_FD.TYPE_INT64, _FD.TYPE_SINT64, _FD.TYPE_SFIXED64}
_ULONG = {_FD.TYPE_UINT64, _FD.TYPE_FIXED64}
_FLOATS = {_FD.TYPE_DOUBLE, _FD.TYPE_FLOAT}
_INT64_PATTERN = "^-?[0-9]+$"
_UINT64_PATTERN = "^[0-9]+$"
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$"},
    "google.protobuf.FieldMask": {"type": "string"},
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array"},
    "google.protobuf.Empty": {"type": "object", "additionalProperties": False},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
    },
    "google.protobuf.DoubleValue": {"type": ["number", "string", "null"]},
    "google.protobuf.FloatValue": {"type": ["number", "string", "null"]},
    "google.protobuf.Int64Value": {"type": ["integer", "string", "null"]},
    "google.protobuf.UInt64Value": {"type": ["integer", "string", "null"]},
    "google.protobuf.Int32Value": {"type": ["integer", "null"]},
    "google.protobuf.UInt32Value": {"type": ["integer", "null"], "minimum": 0},
    "google.protobuf.BoolValue": {"type": ["boolean", "null"]},
    "google.protobuf.StringValue": {"type": ["string", "null"]},
    "google.protobuf.BytesValue": {"type": ["string", "null"], "contentEncoding": "base64"},
}


@cache
def contract_comments() -> Mapping[str, str]:
    """Proto comments by full name, from `gen/comments.json` (empty when absent)."""
    try:
        text = resources.files("gen").joinpath("comments.json").read_text()
    except (FileNotFoundError, ModuleNotFoundError):
        logger.warning("gen/comments.json not found: OpenAPI without proto comments")
        return {}
    loaded: dict[str, str] = json.loads(text)
    return loaded


class _Schemas:
    """Component schemas, built on demand as messages are referenced."""

    def __init__(self, comments: Mapping[str, str]) -> None:
        self.comments = comments
        self.components: dict[str, Any] = {}

    def ref(self, message: Descriptor) -> dict[str, Any]:
        known = _WELL_KNOWN.get(message.full_name)
        if known is not None:
            return dict(known)
        name = message.full_name
        if name not in self.components:
            self.components[name] = {}  # placeholder: recursive messages refer to it
            self.components[name] = self.message(message)
        return {"$ref": _REF + name}

    def enum_ref(self, enum: EnumDescriptor) -> dict[str, Any]:
        name = enum.full_name
        if name not in self.components:
            values = [v.name for v in enum.values]
            schema: dict[str, Any] = {
                "anyOf": [{"type": "string", "enum": values}, {"type": "integer"}],
            }
            described = [
                f"{v.name}: {self.comments[f'{name}.{v.name}']}"
                for v in enum.values
                if f"{name}.{v.name}" in self.comments
            ]
            text = " ".join(filter(None, [self.comments.get(name, ""), "; ".join(described)]))
            if text:
                schema["description"] = text
            self.components[name] = schema
        return {"$ref": _REF + name}

    def message(self, message: Descriptor, *, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
        properties: dict[str, Any] = {}
        required: list[str] = []
        for field in message.fields:
            if field.name in skip:
                continue
            rules = _rules(field)
            if rules is not None and rules.required:
                required.append(field.json_name)
            properties[field.json_name] = self.field(field)
        schema: dict[str, Any] = {
            "type": "object",
            "properties": properties,
            "additionalProperties": False,
        }
        if required:
            schema["required"] = required
        description = self.comments.get(message.full_name)
        if description:
            schema["description"] = description
        return schema

    def field(self, field: FieldDescriptor) -> dict[str, Any]:
        rules = _rules(field)
        if _is_map(field):
            entry = _message(field)
            values = rules.map.values if rules is not None and rules.HasField("map") else None
            schema: dict[str, Any] = {
                "type": "object",
                "additionalProperties": self.single(entry.fields_by_name["value"], values),
            }
            if rules is not None and rules.HasField("map"):
                if rules.map.HasField("min_pairs"):
                    schema["minProperties"] = rules.map.min_pairs
                if rules.map.HasField("max_pairs"):
                    schema["maxProperties"] = rules.map.max_pairs
            if rules is not None and rules.required:
                schema["minProperties"] = max(1, schema.get("minProperties", 0))
        elif field.is_repeated:
            repeated = rules.repeated if rules is not None and rules.HasField("repeated") else None
            items = repeated.items if repeated is not None and repeated.HasField("items") else None
            schema = {"type": "array", "items": self.single(field, items)}
            if repeated is not None:
                if repeated.HasField("min_items"):
                    schema["minItems"] = repeated.min_items
                if repeated.HasField("max_items"):
                    schema["maxItems"] = repeated.max_items
                if repeated.unique:
                    schema["uniqueItems"] = True
            if rules is not None and rules.required:
                schema["minItems"] = max(1, schema.get("minItems", 0))
        else:
            schema = self.single(field, rules)
        description = self.comments.get(field.full_name)
        if description:
            if "$ref" in schema:
                schema = {"allOf": [schema], "description": description}
            else:
                schema["description"] = description
        return schema

    def single(
        self, field: FieldDescriptor, rules: validate_pb2.FieldRules | None
    ) -> dict[str, Any]:
        kind = field.type
        if kind == _FD.TYPE_MESSAGE:
            return self.ref(_message(field))
        if kind == _FD.TYPE_ENUM:
            enum = field.enum_type
            assert enum is not None
            ref = self.enum_ref(enum)
            enum_rules = rules.enum if rules is not None and rules.HasField("enum") else None
            required = rules is not None and rules.required
            if required or (
                enum_rules is not None and (enum_rules.defined_only or getattr(enum_rules, "in"))
            ):
                allowed = (
                    set(getattr(enum_rules, "in"))
                    if enum_rules is not None and getattr(enum_rules, "in")
                    else None
                )
                banned = set(enum_rules.not_in) if enum_rules is not None else set()
                names = [
                    v.name
                    for v in enum.values
                    if (v.number != 0 or not required)
                    and (allowed is None or v.number in allowed)
                    and v.number not in banned
                ]
                return {"type": "string", "enum": names}
            return ref
        schema: dict[str, Any]
        if kind == _FD.TYPE_STRING:
            schema = {"type": "string"}
        elif kind == _FD.TYPE_BYTES:
            schema = {"type": "string", "contentEncoding": "base64"}
        elif kind == _FD.TYPE_BOOL:
            schema = {"type": "boolean"}
        elif kind in _FLOATS:
            schema = {"type": ["number", "string"]}
        elif kind in _SIGNED:
            schema = {"type": "integer", "format": "int32"}
        elif kind in _UNSIGNED:
            schema = {"type": "integer", "format": "int32", "minimum": 0}
        elif kind in _LONG:
            schema = {"type": ["integer", "string"], "format": "int64", "pattern": _INT64_PATTERN}
        elif kind in _ULONG:
            schema = {"type": ["integer", "string"], "format": "int64", "minimum": 0}
            schema["pattern"] = _UINT64_PATTERN
        else:  # pragma: no cover - every scalar type is listed above
            schema = {}
        if rules is not None:
            _constrain(schema, field, rules)
        return schema


def _message(field: FieldDescriptor) -> Descriptor:
    message = field.message_type
    assert message is not None, f"{field.full_name} is not a message field"
    return message


def _is_map(field: FieldDescriptor) -> bool:
    message = field.message_type
    return bool(message is not None and message.GetOptions().map_entry)


def _rules(field: FieldDescriptor) -> validate_pb2.FieldRules | None:
    return rules_of(field)


_UUID = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
_NUMBER_RULES = frozenset(
    {"float", "double", "int32", "int64", "uint32", "uint64", "sint32", "sint64"}
    | {"fixed32", "fixed64", "sfixed32", "sfixed64"}
)


def _constrain(
    schema: dict[str, Any], field: FieldDescriptor, rules: validate_pb2.FieldRules
) -> None:
    kind = rules.WhichOneof("type")
    if field.type == _FD.TYPE_STRING:
        text = rules.string if kind == "string" else validate_pb2.StringRules()
        low = text.min_len if text.HasField("min_len") else 0
        if text.HasField("len"):
            low = text.len
            schema["maxLength"] = text.len
        if rules.required:
            low = max(low, 1)
        if low:
            schema["minLength"] = low
        if text.HasField("max_len"):
            schema["maxLength"] = text.max_len
        if text.HasField("pattern"):
            schema["pattern"] = text.pattern  # both RE2 and JSON Schema search, unanchored
        if text.uuid:
            schema["format"] = "uuid"
            schema["pattern"] = _UUID
        if text.email:
            schema["format"] = "email"
        if text.HasField("const"):
            schema["const"] = text.const
        if getattr(text, "in"):
            schema["enum"] = list(getattr(text, "in"))
        return
    if kind in _NUMBER_RULES and (field.type in _FLOATS or "integer" in str(schema.get("type"))):
        bounds = getattr(rules, kind)
        if bounds.HasField("gt"):
            schema["exclusiveMinimum"] = _number(bounds.gt)
        if bounds.HasField("gte"):
            schema["minimum"] = max(_number(bounds.gte), schema.get("minimum", _number(bounds.gte)))
        if bounds.HasField("lt"):
            schema["exclusiveMaximum"] = _number(bounds.lt)
        if bounds.HasField("lte"):
            schema["maximum"] = _number(bounds.lte)
        if bounds.HasField("const"):
            schema["const"] = _number(bounds.const)
        if getattr(bounds, "in"):
            schema["enum"] = [_number(v) for v in getattr(bounds, "in")]
    if rules.required and (field.type in _FLOATS or "integer" in str(schema.get("type"))):
        schema["not"] = {"const": 0}


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _status_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "google.rpc.Status: the gRPC status code, a message a person can act "
        "on, and details (ErrorInfo, BadRequest, RetryInfo...), each with its @type.",
        "properties": {
            "code": {"type": "integer", "description": "gRPC status code (google.rpc.Code)."},
            "message": {"type": "string"},
            "details": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"@type": {"type": "string"}},
                    "required": ["@type"],
                },
            },
        },
        "required": ["code", "message"],
    }


def _parameter_schema(field: FieldDescriptor, schemas: _Schemas) -> dict[str, Any]:
    schema = schemas.field(field)
    schema.pop("description", None)
    if field.type == _FD.TYPE_MESSAGE and _message(field).full_name in _WELL_KNOWN:
        base = dict(_WELL_KNOWN[_message(field).full_name])
        if isinstance(base.get("type"), list):  # wrappers: a query value is never null
            base["type"] = [t for t in base["type"] if t != "null"]
        return base
    if "allOf" in schema:
        schema = schema["allOf"][0]
    if field.type in _LONG or field.type in _ULONG:
        schema["type"] = "string"  # a query or path value is text
    if field.type in _FLOATS:
        schema["type"] = "number"
    return schema


def _operation(
    binding: Binding, schemas: _Schemas, chain: Chain | None, auth_on: bool
) -> dict[str, Any]:
    method = binding.method
    comments = schemas.comments
    request = method.input_type
    codec = RequestCodec(binding)
    operation: dict[str, Any] = {
        "operationId": binding.operation_id,
        "tags": [method.containing_service.full_name],
        "summary": method.name,
    }
    description = comments.get(method.full_name)
    if description:
        operation["description"] = description
    parameters: list[dict[str, Any]] = []
    for name, variable, role in binding.template.openapi_path()[1]:
        if role == "field":
            leaf = _leaf(request, variable.field_path)
            schema = _parameter_schema(leaf, schemas)
            text = comments.get(leaf.full_name, "")
        else:
            schema = (
                {"type": "string", "pattern": "^[^/]+$"}
                if role == "segment"
                else {"type": "string"}
            )
            text = (
                f"Part of `{variable.name}` ({binding.template.source}: the field holds the "
                "whole matched path)."
            )
        param: dict[str, Any] = {"name": name, "in": "path", "required": True, "schema": schema}
        if text:
            param["description"] = text
        parameters.append(param)
    seen: set[tuple[str, ...]] = set()
    for name, (path, leaf) in codec.query_fields.items():
        if path in seen or name != ".".join(path):
            continue  # one parameter per field, under its proto name
        seen.add(path)
        schema = _parameter_schema(leaf, schemas)
        if leaf.is_repeated and schema.get("type") != "array":
            schema = {"type": "array", "items": schema}
        param = {"name": name, "in": "query", "schema": schema}
        if leaf.is_repeated:
            param["style"], param["explode"] = "form", True
        if comments.get(leaf.full_name):
            param["description"] = comments[leaf.full_name]
        parameters.append(param)
    policy = Method.resolve(binding.full_name).policy
    if policy.idempotency_key_required:
        parameters.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": True,
                "description": "Names this request: a retry with the same key has the effect "
                "of the first attempt.",
                "schema": {"type": "string", "minLength": 1, "maxLength": 200},
            }
        )
    if parameters:
        operation["parameters"] = parameters
    if binding.body:
        if binding.body == "*":
            body_schema = (
                schemas.message(request, skip=binding.path_fields)
                if binding.path_fields
                else schemas.ref(request)
            )
        else:
            body_schema = schemas.field(request.fields_by_name[binding.body])
            body_schema.pop("description", None)
            if "allOf" in body_schema:
                body_schema = body_schema["allOf"][0]
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": body_schema}},
        }
    operation["responses"] = _responses(binding, schemas)
    needs_token = auth_on and _requires_token(binding, chain)
    operation["security"] = [{"bearer": sorted(policy.scopes)}] if needs_token else []
    return operation


def _requires_token(binding: Binding, chain: Chain | None) -> bool:
    policy = Method.resolve(binding.full_name).policy
    if policy.HasField("auth_required"):
        return policy.auth_required
    return True


def _responses(binding: Binding, schemas: _Schemas) -> dict[str, Any]:
    output = binding.method.output_type
    if binding.response_body:
        schema = schemas.field(output.fields_by_name[binding.response_body])
        schema.pop("description", None)
        if "allOf" in schema:
            schema = schema["allOf"][0]
    else:
        schema = schemas.ref(output)
    status_ref = {"$ref": _REF + _STATUS}
    if binding.arity.response_streaming:
        line = {
            "type": "object",
            "description": 'One line per message ({"result": ...}); a failure after the '
            'stream started ends it with {"error": google.rpc.Status}.',
            "properties": {"result": schema, "error": status_ref},
        }
        ok: dict[str, Any] = {
            "description": "A stream of messages, as newline-delimited JSON or as "
            "Server-Sent Events (send Accept: text/event-stream).",
            "content": {
                "application/x-ndjson": {"schema": line},
                "text/event-stream": {"schema": {"type": "string"}},
            },
        }
    else:
        ok = {"description": "OK", "content": {"application/json": {"schema": schema}}}
    return {
        "200": ok,
        "default": {
            "description": "An error: the gRPC status mapped to HTTP (400, 401, 403, 404, "
            "409, 429 with Retry-After, 503, 504...), with a google.rpc.Status body.",
            "content": {"application/json": {"schema": status_ref}},
        },
    }


def _leaf(message: Descriptor, path: tuple[str, ...]) -> FieldDescriptor:
    descriptor: Descriptor | None = message
    found: FieldDescriptor | None = None
    for name in path:
        assert descriptor is not None
        found = descriptor.fields_by_name[name]
        descriptor = found.message_type
    assert found is not None
    return found


def openapi_document(
    routes: RouteTable, config: GatewayConfig, chain: Chain | None = None
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every binding in `routes`."""
    comments = contract_comments()
    schemas = _Schemas(comments)
    schemas.components[_STATUS] = _status_schema()
    paths: dict[str, dict[str, Any]] = {}
    auth_on = config.auth != "off"
    tags: dict[str, str] = {}
    for binding in routes.bindings:
        service = binding.method.containing_service
        tags[service.full_name] = comments.get(service.full_name, "")
        item = paths.setdefault(binding.template.openapi_path()[0], {})
        verb = binding.http_method.lower()
        operation = _operation(binding, schemas, chain, auth_on)
        if verb in ("get", "put", "post", "delete", "patch", "head", "options", "trace"):
            item[verb] = operation
        else:
            # OpenAPI 3.1 has no custom methods: describe it as an extension.
            item.setdefault(f"x-{verb}", operation)
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": config.title,
            "version": config.version,
            "description": "HTTP/JSON routes of the services' contracts (google.api.http), "
            "per the protobuf JSON mapping. Also served as gRPC-Web at POST "
            "/{package.Service}/{Method}.",
        },
        "tags": [
            {"name": name, **({"description": text} if text else {})}
            for name, text in sorted(tags.items())
        ],
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(schemas.components.items())),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "A JWT in Authorization: Bearer <token>; an operation's "
                    "scopes are listed in its security requirement.",
                }
            },
        },
    }
    return document
