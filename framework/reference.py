"""A Markdown reference of the contracts, generated from their descriptors.

`python -m framework reference` (what `make docs` runs) compiles `protos/` with
protoc's source info (so the proto comments come along), and writes
`docs/reference.md`: per package, every service (bounded context, owned
entities, dependencies), every method with what it requires (auth and scopes,
default deadline, rate limit, idempotency, saga role) and its request fields
with their validation rules, then the other messages, enums and domain events.
The output depends only on the contracts, so regenerating it is a no-op when
nothing changed and CI can check it is current.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import descriptor_pb2

from framework.policies.validation import describe_rules
from gen.buf.validate import validate_pb2
from gen.framework.v1 import options_pb2

__all__ = ["ReferenceConfig", "compile_contracts", "render", "write_reference"]

FDP = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    value: name.removeprefix("TYPE_").lower()
    for name, value in FDP.Type.items()
    if name not in ("TYPE_MESSAGE", "TYPE_ENUM", "TYPE_GROUP")
}
_ARITY = {
    (False, False): "unary",
    (False, True): "server streaming",
    (True, False): "client streaming",
    (True, True): "bidirectional streaming",
}
# Paths into FileDescriptorProto (field numbers), for comments in source info.
_MESSAGE, _ENUM, _SERVICE, _SYNTAX = 4, 5, 6, 12
_FIELD, _NESTED, _NESTED_ENUM, _VALUE, _METHOD = 2, 3, 4, 2, 2


@dataclass(frozen=True, slots=True)
class ReferenceConfig:
    """Where the contracts are and where the reference goes."""

    proto_root: Path = Path("protos")
    out: Path = Path("docs/reference.md")


def compile_contracts(proto_root: Path) -> descriptor_pb2.FileDescriptorSet:
    """Every contract under `proto_root` (and its imports), with comments."""
    from grpc_tools import protoc

    from framework.codegen import contract_files, include_dirs

    protos = [str(p) for p in contract_files(proto_root)]
    if not protos:
        raise FileNotFoundError(f"no .proto files under {proto_root}")
    with tempfile.TemporaryDirectory(prefix="reference-") as scratch:
        out = Path(scratch) / "contracts.binpb"
        args = [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            *(f"-I{d}" for d in include_dirs()),
            "--include_source_info",
            "--include_imports",
            f"--descriptor_set_out={out}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed; see its messages above")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def write_reference(config: ReferenceConfig) -> bool:
    """Regenerate the reference; return whether the file changed."""
    text = render(compile_contracts(config.proto_root))
    if config.out.exists() and config.out.read_text() == text:
        return False
    config.out.parent.mkdir(parents=True, exist_ok=True)
    config.out.write_text(text)
    return True


# ------------------------------------------------------------------ rendering


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|") or "-"


def _code(text: str) -> str:
    return f"`{text}`" if text else "-"


def _number(value: float) -> str:
    return f"{value:g}"


class _Comments:
    """Leading comments of one file, by descriptor path."""

    def __init__(self, file: descriptor_pb2.FileDescriptorProto) -> None:
        self._by_path = {
            tuple(loc.path): loc.leading_comments.strip()
            for loc in file.source_code_info.location
            if loc.leading_comments.strip()
        }
        # The file's header: the comment above `syntax` (leading, or detached by a blank line).
        self.header = ""
        for loc in file.source_code_info.location:
            if tuple(loc.path) == (_SYNTAX,):
                texts = [*loc.leading_detached_comments, loc.leading_comments]
                self.header = " ".join(" ".join(t.split()) for t in texts if t.strip())

    def get(self, *path: int) -> str:
        lines = self._by_path.get(path, "").splitlines()
        return " ".join(line.strip() for line in lines)


@dataclass(frozen=True, slots=True)
class _Declared:
    """A message or enum with where it was declared (for its comments)."""

    full_name: str
    proto: descriptor_pb2.DescriptorProto | descriptor_pb2.EnumDescriptorProto
    file: str
    path: tuple[int, ...]
    comments: _Comments

    def comment(self, *sub: int) -> str:
        return self.comments.get(*self.path, *sub)


class _Types:
    """Every message and enum of the set, by full name, in declaration order."""

    def __init__(self, files: Iterable[descriptor_pb2.FileDescriptorProto]) -> None:
        self.messages: dict[str, _Declared] = {}
        self.enums: dict[str, _Declared] = {}
        for file in files:
            comments = _Comments(file)
            self._add(file, comments, file.package, file.message_type, file.enum_type, ())

    def _add(
        self,
        file: descriptor_pb2.FileDescriptorProto,
        comments: _Comments,
        scope: str,
        messages: Iterable[descriptor_pb2.DescriptorProto],
        enums: Iterable[descriptor_pb2.EnumDescriptorProto],
        parent: tuple[int, ...],
    ) -> None:
        message_tag, enum_tag = (_NESTED, _NESTED_ENUM) if parent else (_MESSAGE, _ENUM)
        for index, message in enumerate(messages):
            name = f"{scope}.{message.name}"
            path = (*parent, message_tag, index)
            self.messages[name] = _Declared(name, message, file.name, path, comments)
            self._add(file, comments, name, message.nested_type, message.enum_type, path)
        for index, enum in enumerate(enums):
            name = f"{scope}.{enum.name}"
            path = (*parent, enum_tag, index)
            self.enums[name] = _Declared(name, enum, file.name, path, comments)

    def type_name(self, field: descriptor_pb2.FieldDescriptorProto) -> str:
        name = field.type_name.lstrip(".")
        entry = self.messages.get(name)
        if entry is not None:
            proto = entry.proto
            assert isinstance(proto, descriptor_pb2.DescriptorProto)
            if proto.options.map_entry:
                key, value = proto.field[0], proto.field[1]
                return f"map<{self.type_name(key)}, {self.type_name(value)}>"
        base = name or _SCALARS.get(field.type, "?")
        return f"repeated {base}" if field.label == FDP.LABEL_REPEATED else base

    def rules(self, field: descriptor_pb2.FieldDescriptorProto) -> str:
        if not field.options.HasExtension(validate_pb2.field):
            return "-"
        rules = describe_rules(field.options.Extensions[validate_pb2.field])
        return "<br>".join(f"{_cell(words)} (`{rule}`)" for rule, words in rules) or "-"

    def message_rules(self, message: descriptor_pb2.DescriptorProto) -> list[str]:
        """The message's own rules (CEL across fields, oneof rules), as list items."""
        if not message.options.HasExtension(validate_pb2.message):
            return []
        rules = message.options.Extensions[validate_pb2.message]
        lines = [f"- `{r.id}`: {_cell(r.message or r.expression)}" for r in rules.cel]
        lines += [f"- `{e}`" for e in rules.cel_expression]
        for oneof in rules.oneof:
            which = "exactly one" if oneof.required else "at most one"
            lines.append(f"- {which} of " + ", ".join(f"`{f}`" for f in oneof.fields))
        return [*lines, ""] if lines else []

    def fields_table(self, declared: _Declared) -> list[str]:
        message = declared.proto
        assert isinstance(message, descriptor_pb2.DescriptorProto)
        if not message.field:
            return ["No fields.", ""]
        lines = ["| Field | # | Type | Rules | Description |", "|---|---|---|---|---|"]
        for index, field in enumerate(message.field):
            rules = self.rules(field)
            description = declared.comment(_FIELD, index)
            lines.append(
                f"| `{field.name}` | {field.number} | `{self.type_name(field)}` | {rules} "
                f"| {_cell(description)} |"
            )
        lines.append("")
        if own := self.message_rules(message):
            lines += ["Rules across fields:", "", *own]
        return lines


def _policy_lines(policy: options_pb2.MethodPolicy) -> list[str]:
    if not policy.HasField("auth_required"):
        auth = "caller required (default)"
    elif policy.auth_required:
        auth = "caller required"
    else:
        auth = "public: no caller needed"
    if policy.scopes:
        auth += "; scopes: " + ", ".join(f"`{s}`" for s in policy.scopes)
    idempotent = "yes" if policy.idempotent else "no (never retried automatically)"
    if policy.idempotency_key_required:
        idempotent += "; callers must send an `idempotency-key` metadata entry"
    limit = policy.rate_limit
    deadline = f"{_number(policy.timeout_s)} s" if policy.timeout_s else "none (the caller's)"
    rate = (
        f"{_number(limit.rate_per_s)} calls/s per caller, burst {limit.burst}"
        if limit.rate_per_s
        else "none"
    )
    lines = [
        f"- Auth: {auth}",
        f"- Default deadline: {deadline}",
        f"- Rate limit: {rate}",
        f"- Idempotent: {idempotent}",
    ]
    if policy.saga.compensated_by:
        lines.append(f"- Saga step: action, undone by `{policy.saga.compensated_by}`")
    elif policy.saga.compensates:
        lines.append(f"- Saga step: compensation, undoes `{policy.saga.compensates}`")
    return lines


def _summary_row(method: descriptor_pb2.MethodDescriptorProto) -> str:
    policy = method.options.Extensions[options_pb2.method_policy]
    saga = policy.saga
    if saga.compensated_by:
        saga_text = f"undone by `{saga.compensated_by}`"
    elif saga.compensates:
        saga_text = f"undoes `{saga.compensates}`"
    else:
        saga_text = "-"
    if policy.idempotency_key_required:
        idempotent = "yes, key required"
    else:
        idempotent = "yes" if policy.idempotent else "no"
    deadline = f"{_number(policy.timeout_s)} s" if policy.timeout_s else "-"
    scopes = ", ".join(f"`{s}`" for s in policy.scopes) or "-"
    request = method.input_type.rsplit(".", 1)[-1]
    response = method.output_type.rsplit(".", 1)[-1]
    return (
        f"| [`{method.name}`](#{method.name.lower()}) | `{request}` -> `{response}` | {scopes} "
        f"| {deadline} | {idempotent} | {saga_text} |"
    )


def _service_section(
    file: descriptor_pb2.FileDescriptorProto, index: int, comments: _Comments, types: _Types
) -> list[str]:
    service = file.service[index]
    full = f"{file.package}.{service.name}"
    policy = service.options.Extensions[options_pb2.service_policy]
    lines = [f"### Service `{full}`", ""]
    if comment := comments.get(_SERVICE, index):
        lines += [comment, ""]
    lines += [
        f"- Bounded context: {_code(policy.bounded_context)}",
        "- Owns: " + (", ".join(f"`{e}`" for e in policy.owns) or "-"),
        "- Depends on: " + (", ".join(f"`{d}`" for d in policy.depends_on) or "-"),
        f"- Contract: `{file.name}`",
        "",
        "| Method | Request -> Response | Scopes | Deadline | Idempotent | Saga |",
        "|---|---|---|---|---|---|",
        *(_summary_row(m) for m in service.method),
        "",
    ]
    for m_index, method in enumerate(service.method):
        policy_m = method.options.Extensions[options_pb2.method_policy]
        request, response = method.input_type.lstrip("."), method.output_type.lstrip(".")
        arity = _ARITY[(method.client_streaming, method.server_streaming)]
        lines += [f"#### {method.name}", ""]
        if comment := comments.get(_SERVICE, index, _METHOD, m_index):
            lines += [comment, ""]
        lines += [f"- Call: `{request}` -> `{response}` ({arity})", *_policy_lines(policy_m), ""]
        declared = types.messages.get(request)
        if declared is not None and declared.file == file.name:
            lines += [f"Request `{request}`:", "", *types.fields_table(declared)]
    return lines


def _file_section(file: descriptor_pb2.FileDescriptorProto, types: _Types) -> list[str]:
    comments = _Comments(file)
    lines: list[str] = []
    requests = {m.input_type.lstrip(".") for s in file.service for m in s.method}
    if file.service and comments.header:
        lines += [f"> {comments.header}", ""]
    for index in range(len(file.service)):
        lines += _service_section(file, index, comments, types)
    heading = "Events" if file.name.endswith("events.proto") else "Messages"
    messages = [
        d
        for d in types.messages.values()
        if d.file == file.name
        and d.full_name not in requests
        and not (isinstance(d.proto, descriptor_pb2.DescriptorProto) and d.proto.options.map_entry)
    ]
    enums = [d for d in types.enums.values() if d.file == file.name]
    if messages or enums:
        lines += [f"### {heading} in `{file.name}`", ""]
    for declared in messages:
        lines += [f"#### `{declared.full_name}`", ""]
        if comment := declared.comment():
            lines += [comment, ""]
        lines += types.fields_table(declared)
    for declared in enums:
        enum = declared.proto
        assert isinstance(enum, descriptor_pb2.EnumDescriptorProto)
        lines += [f"#### Enum `{declared.full_name}`", ""]
        if comment := declared.comment():
            lines += [comment, ""]
        lines += ["| Value | # | Description |", "|---|---|---|"]
        for v_index, value in enumerate(enum.value):
            description = declared.comment(_VALUE, v_index)
            lines.append(f"| `{value.name}` | {value.number} | {_cell(description)} |")
        lines.append("")
    return lines


def render(contracts: descriptor_pb2.FileDescriptorSet) -> str:
    """The whole reference as Markdown; depends only on `contracts`."""
    files = sorted(
        (f for f in contracts.file if not f.name.startswith(("google/", "buf/"))),
        key=lambda f: f.name,
    )
    types = _Types(files)
    packages = sorted({f.package for f in files})
    lines = [
        "# Contract reference",
        "",
        "Generated from `protos/` by `python -m framework reference` (`make docs`); "
        "do not edit by hand.",
        "",
        "Per method: the policy declared with `framework.v1.method_policy` (auth and scopes, "
        "default deadline, rate limit, idempotency, saga role), and per field the "
        "protovalidate rules declared with `buf.validate`, which `ValidationPolicy` checks "
        "before the handler runs (a broken rule answers INVALID_ARGUMENT with a "
        "`google.rpc.BadRequest` naming the field and the rule id; bounds declared together, "
        "such as `gte` and `lte`, share one id, `int32.gte_lte`).",
        "",
        "## Services",
        "",
    ]
    for file in files:
        for service in file.service:
            policy = service.options.Extensions[options_pb2.service_policy]
            context = f" ({policy.bounded_context})" if policy.bounded_context else ""
            lines.append(f"- `{file.package}.{service.name}`{context}: `{file.name}`")
    lines.append("")
    for package in packages:
        lines += [f"## Package `{package}`", ""]
        # Services first, then other messages, domain events last.
        in_package = sorted(
            (f for f in files if f.package == package),
            key=lambda f: (not f.service, f.name.endswith("events.proto"), f.name),
        )
        for file in in_package:
            lines += _file_section(file, types)
    return "\n".join(lines).rstrip() + "\n"
