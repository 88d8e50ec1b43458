"""Print a compiled `.proto` file (a FileDescriptorProto) back as `.proto` source.

Used for one job: the protovalidate package carries `buf/validate/validate.proto`
only as a serialized descriptor, while `buf lint`/`buf breaking` read contracts
(and their imports) from source. `make protos` prints that descriptor into
`protos/buf/validate/validate.proto`, and a test checks that compiling the printed
file gives back the same descriptor. Comments are not in a descriptor, so the
printed file has none but its header.

Covers proto2 and proto3 files: messages (nested types, maps, oneofs, proto3
`optional`, extension and reserved ranges, defaults, json names), enums,
extensions, services, and options, custom ones (extensions) included; options are
read in a private pool built from the file and its dependencies, so the extensions
the file declares for its own options are understood.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf.message import Message

__all__ = ["print_proto"]

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    _F.TYPE_DOUBLE: "double",
    _F.TYPE_FLOAT: "float",
    _F.TYPE_INT64: "int64",
    _F.TYPE_UINT64: "uint64",
    _F.TYPE_INT32: "int32",
    _F.TYPE_FIXED64: "fixed64",
    _F.TYPE_FIXED32: "fixed32",
    _F.TYPE_BOOL: "bool",
    _F.TYPE_STRING: "string",
    _F.TYPE_BYTES: "bytes",
    _F.TYPE_UINT32: "uint32",
    _F.TYPE_SFIXED32: "sfixed32",
    _F.TYPE_SFIXED64: "sfixed64",
    _F.TYPE_SINT32: "sint32",
    _F.TYPE_SINT64: "sint64",
}
_LABELS = {
    _F.LABEL_OPTIONAL: "optional",
    _F.LABEL_REQUIRED: "required",
    _F.LABEL_REPEATED: "repeated",
}
_MAX_FIELD = 536870911  # "max" in extension and reserved ranges


def _json_name(name: str) -> str:
    """protoc's default JSON name: lowerCamelCase of the field name."""
    out: list[str] = []
    upper = False
    for ch in name:
        if ch == "_":
            upper = True
        elif upper:
            out.append(ch.upper())
            upper = False
        else:
            out.append(ch)
    return "".join(out)


def _quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


class _Printer:
    def __init__(self, file: descriptor_pb2.FileDescriptorProto, pool: Any) -> None:
        self.file = file
        self.pool = pool
        self.proto3 = file.syntax == "proto3"
        self.lines: list[str] = []

    # options ---------------------------------------------------------------------------
    def _options(self, options: Message) -> list[str]:
        """`name = value` for every option set, custom ones as `(full.name) = ...`."""
        if not options.ByteSize():
            return []
        cls = message_factory.GetMessageClass(
            self.pool.FindMessageTypeByName(options.DESCRIPTOR.full_name)
        )
        parsed = cls.FromString(options.SerializeToString())
        out: list[str] = []
        for field, value in parsed.ListFields():
            name = f"({field.full_name})" if field.is_extension else field.name
            values = value if field.is_repeated else [value]
            out.extend(f"{name} = {self._value(field, v)}" for v in values)
        return out

    def _value(self, field: Any, value: Any) -> str:
        if field.message_type is not None:
            body = text_format.MessageToString(value, as_one_line=True, as_utf8=True)
            return "{ " + body + " }" if body else "{}"
        if field.enum_type is not None:
            return str(field.enum_type.values_by_number[value].name)
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return _quote(value)
        if isinstance(value, bytes):
            return _quote(value.decode("latin-1"))
        if isinstance(value, float):
            return _float(value)
        return str(value)

    def _option_lines(self, options: Message, indent: str) -> None:
        for option in self._options(options):
            self.lines.append(f"{indent}option {option};")

    # fields ----------------------------------------------------------------------------
    def _type(self, field: descriptor_pb2.FieldDescriptorProto) -> str:
        if field.type in _SCALARS:
            return _SCALARS[field.type]
        return field.type_name  # fully qualified with a leading dot: valid in .proto

    def _field(
        self,
        field: descriptor_pb2.FieldDescriptorProto,
        indent: str,
        maps: dict[str, descriptor_pb2.DescriptorProto],
        in_oneof: bool,
    ) -> None:
        entry = maps.get(field.type_name) if field.type == _F.TYPE_MESSAGE else None
        if entry is not None:
            key, value = entry.field[0], entry.field[1]
            kind = f"map<{self._type(key)}, {self._type(value)}>"
        else:
            kind = self._type(field)
            label = ""
            if field.label == _F.LABEL_REPEATED:
                label = "repeated "
            elif field.proto3_optional or (not self.proto3 and not in_oneof):
                label = f"{_LABELS[field.label]} "
            kind = label + kind
        extras: list[str] = []
        if field.HasField("default_value"):
            extras.append(f"default = {self._default(field)}")
        if field.HasField("json_name") and field.json_name != _json_name(field.name):
            extras.append(f"json_name = {_quote(field.json_name)}")
        extras.extend(self._options(field.options))
        suffix = f" [{', '.join(extras)}]" if extras else ""
        self.lines.append(f"{indent}{kind} {field.name} = {field.number}{suffix};")

    def _default(self, field: descriptor_pb2.FieldDescriptorProto) -> str:
        text = field.default_value
        if field.type in (_F.TYPE_STRING, _F.TYPE_BYTES):
            return _quote(text)
        return text  # numbers, bools and enum value names are written as they are stored

    # messages --------------------------------------------------------------------------
    def _message(self, message: descriptor_pb2.DescriptorProto, scope: str, indent: str) -> None:
        full = f"{scope}.{message.name}"
        maps = {
            f"{full}.{nested.name}": nested
            for nested in message.nested_type
            if nested.options.map_entry
        }
        self.lines.append(f"{indent}message {message.name} {{")
        inner = indent + "  "
        self._option_lines(message.options, inner)
        real_oneofs = {
            i
            for i, f in enumerate(message.field)
            if f.HasField("oneof_index") and not f.proto3_optional
        }
        oneof_members = {message.field[i].oneof_index for i in real_oneofs}
        printed_oneofs: set[int] = set()
        for i, field in enumerate(message.field):
            if i in real_oneofs:
                index = field.oneof_index
                if index in printed_oneofs:
                    continue
                printed_oneofs.add(index)
                decl = message.oneof_decl[index]
                self.lines.append(f"{inner}oneof {decl.name} {{")
                self._option_lines(decl.options, inner + "  ")
                for member in message.field:
                    if member.HasField("oneof_index") and member.oneof_index == index:
                        self._field(member, inner + "  ", maps, in_oneof=True)
                self.lines.append(f"{inner}}}")
            else:
                self._field(field, inner, maps, in_oneof=False)
        for index, decl in enumerate(message.oneof_decl):
            if index in oneof_members and index not in printed_oneofs:
                raise ValueError(f"{full}: oneof {decl.name} not printed")
        for nested in message.nested_type:
            if not nested.options.map_entry:
                self._message(nested, full, inner)
        for enum in message.enum_type:
            self._enum(enum, inner)
        self._extensions(message.extension, inner)
        for ext_range in message.extension_range:
            opts = self._options(ext_range.options)
            suffix = f" [{', '.join(opts)}]" if opts else ""
            self.lines.append(
                f"{inner}extensions {_range(ext_range.start, ext_range.end - 1)}{suffix};"
            )
        if message.reserved_range:
            ranges = ", ".join(_range(r.start, r.end - 1) for r in message.reserved_range)
            self.lines.append(f"{inner}reserved {ranges};")
        if message.reserved_name:
            self.lines.append(f"{inner}reserved {', '.join(map(_quote, message.reserved_name))};")
        self.lines.append(f"{indent}}}")

    def _enum(self, enum: descriptor_pb2.EnumDescriptorProto, indent: str) -> None:
        self.lines.append(f"{indent}enum {enum.name} {{")
        inner = indent + "  "
        self._option_lines(enum.options, inner)
        for value in enum.value:
            opts = self._options(value.options)
            suffix = f" [{', '.join(opts)}]" if opts else ""
            self.lines.append(f"{inner}{value.name} = {value.number}{suffix};")
        if enum.reserved_range:
            ranges = ", ".join(_range(r.start, r.end) for r in enum.reserved_range)
            self.lines.append(f"{inner}reserved {ranges};")
        if enum.reserved_name:
            self.lines.append(f"{inner}reserved {', '.join(map(_quote, enum.reserved_name))};")
        self.lines.append(f"{indent}}}")

    def _extensions(
        self, extensions: Sequence[descriptor_pb2.FieldDescriptorProto], indent: str
    ) -> None:
        extendees: list[str] = []
        for ext in extensions:
            if ext.extendee not in extendees:
                extendees.append(ext.extendee)
        for extendee in extendees:
            self.lines.append(f"{indent}extend {extendee} {{")
            for ext in extensions:
                if ext.extendee == extendee:
                    self._field(ext, indent + "  ", {}, in_oneof=False)
            self.lines.append(f"{indent}}}")

    def _service(self, service: descriptor_pb2.ServiceDescriptorProto) -> None:
        self.lines.append(f"service {service.name} {{")
        self._option_lines(service.options, "  ")
        for method in service.method:
            req = ("stream " if method.client_streaming else "") + method.input_type
            resp = ("stream " if method.server_streaming else "") + method.output_type
            opts = self._options(method.options)
            head = f"  rpc {method.name}({req}) returns ({resp})"
            if opts:
                self.lines.append(head + " {")
                self.lines.extend(f"    option {o};" for o in opts)
                self.lines.append("  }")
            else:
                self.lines.append(head + ";")
        self.lines.append("}")

    def render(self, header: Iterable[str]) -> str:
        file = self.file
        self.lines.extend(f"// {line}".rstrip() for line in header)
        self.lines.append(f'syntax = "{file.syntax or "proto2"}";')
        self.lines.append("")
        if file.package:
            self.lines.append(f"package {file.package};")
            self.lines.append("")
        public, weak = set(file.public_dependency), set(file.weak_dependency)
        for i, dep in enumerate(file.dependency):
            kind = "public " if i in public else "weak " if i in weak else ""
            self.lines.append(f"import {kind}{_quote(dep)};")
        if file.dependency:
            self.lines.append("")
        before = len(self.lines)
        self._option_lines(file.options, "")
        if len(self.lines) > before:
            self.lines.append("")
        scope = f".{file.package}" if file.package else ""
        for message in file.message_type:
            self._message(message, scope, "")
            self.lines.append("")
        for enum in file.enum_type:
            self._enum(enum, "")
            self.lines.append("")
        if file.extension:
            self._extensions(file.extension, "")
            self.lines.append("")
        for service in file.service:
            self._service(service)
            self.lines.append("")
        return "\n".join(self.lines).rstrip("\n") + "\n"


def _range(start: int, end: int) -> str:
    if start == end:
        return str(start)
    return f"{start} to {'max' if end >= _MAX_FIELD else end}"


def _float(value: float) -> str:
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if math.isnan(value):
        return "nan"
    return repr(value)


def print_proto(
    file: descriptor_pb2.FileDescriptorProto,
    dependencies: Sequence[descriptor_pb2.FileDescriptorProto],
    header: Iterable[str] = (),
) -> str:
    """`.proto` source for `file`; `dependencies` are every file it imports, transitively.

    `header` lines are written first as `//` comments.
    """
    pool = descriptor_pool.DescriptorPool()
    for dep in dependencies:
        pool.Add(dep)
    pool.Add(file)
    return _Printer(file, pool).render(header)
