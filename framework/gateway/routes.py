"""HTTP routes from the contracts' `google.api.http` options.

`RouteTable.from_services(...)` reads every method of the given services from
the descriptor pool once: its `HttpRule` (verb + path template, `body`,
`response_body`) and each `additional_bindings` become one `Binding`.  Per
request, `RouteTable.match(verb, raw_path)` finds the binding and the path
variables; candidates are indexed by verb, and templates with a custom verb
(`:cancel`) or more literal segments are tried first, so `/v1/x/{id}:cancel`
wins over `/v1/x/{id}` for `/v1/x/7:cancel`.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import (
    Descriptor,
    FieldDescriptor,
    FileDescriptor,
    MethodDescriptor,
)

from framework.gateway.templates import PathTemplate, TemplateError
from framework.policy import Arity
from gen.framework.v1 import options_pb2

__all__ = [
    "Binding",
    "RouteError",
    "RouteMatch",
    "RouteTable",
    "annotated_services",
    "import_contracts",
]

logger = logging.getLogger(__name__)

_VERBS = ("get", "put", "post", "delete", "patch")
# Services of this bounded context (the test kits' own) are not exposed by default.
TESTING_CONTEXT = "testing"


class RouteError(ValueError):
    """A binding in a contract that cannot be served; the message names the method."""


@dataclass(frozen=True, slots=True, eq=False)
class Binding:
    """One HTTP binding of one RPC."""

    http_method: str  # "GET", ..., or a custom kind such as "SEARCH"
    template: PathTemplate
    body: str  # "" (no body), "*" (the whole request) or a top-level field name
    response_body: str  # "" (the whole response) or a top-level field name
    method: MethodDescriptor
    index: int  # 0 for the main binding, 1.. for additional bindings
    path_fields: frozenset[str] = field(default=frozenset())

    @property
    def service(self) -> str:
        return self.method.containing_service.full_name

    @property
    def full_name(self) -> str:
        """The gRPC method name, "/pkg.Service/Method"."""
        return f"/{self.service}/{self.method.name}"

    @property
    def arity(self) -> Arity:
        return Arity.of(self.method.client_streaming, self.method.server_streaming)

    @property
    def operation_id(self) -> str:
        base = f"{self.method.containing_service.name}_{self.method.name}"
        return base if self.index == 0 else f"{base}_{self.index}"


@dataclass(frozen=True, slots=True)
class RouteMatch:
    binding: Binding
    variables: dict[str, str]


def _field_at(message: Descriptor, path: Sequence[str], where: str) -> FieldDescriptor:
    descriptor: Descriptor | None = message
    found: FieldDescriptor | None = None
    for i, name in enumerate(path):
        if descriptor is None:
            raise RouteError(f"{where}: {'.'.join(path[:i])} is not a message")
        found = descriptor.fields_by_name.get(name)
        if found is None:
            raise RouteError(f"{where}: {descriptor.full_name} has no field {name!r}")
        if found.is_repeated and i < len(path) - 1:
            raise RouteError(f"{where}: {name} is repeated and cannot hold a path variable")
        descriptor = found.message_type
    assert found is not None
    return found


def _bindings(method: MethodDescriptor, rule: http_pb2.HttpRule, index: int) -> Binding:
    where = f"{method.full_name} binding {index}"
    kind = rule.WhichOneof("pattern")
    if kind is None:
        raise RouteError(f"{where}: the http rule names no verb and path")
    if kind == "custom":
        verb, path = rule.custom.kind.upper(), rule.custom.path
    else:
        verb, path = kind.upper(), getattr(rule, kind)
    try:
        template = PathTemplate.parse(path)
    except TemplateError as error:
        raise RouteError(f"{where}: {error}") from None
    request = method.input_type
    path_fields: set[str] = set()
    for variable in template.variables:
        found = _field_at(request, variable.field_path, where)
        if found.is_repeated or (
            found.message_type is not None and not _is_scalar_wrapper(found.message_type)
        ):
            raise RouteError(f"{where}: path variable {variable.name} must be a scalar field")
        path_fields.add(variable.name)
    if rule.body not in ("", "*") and rule.body not in request.fields_by_name:
        raise RouteError(f"{where}: body {rule.body!r} is not a field of {request.full_name}")
    if rule.response_body and rule.response_body not in method.output_type.fields_by_name:
        raise RouteError(
            f"{where}: response_body {rule.response_body!r} is not a field of "
            f"{method.output_type.full_name}"
        )
    if method.client_streaming:
        raise RouteError(f"{where}: client-streaming methods have no HTTP/JSON binding here")
    return Binding(
        verb, template, rule.body, rule.response_body, method, index, frozenset(path_fields)
    )


def _is_scalar_wrapper(message: Descriptor) -> bool:
    return (
        message.full_name.startswith("google.protobuf.")
        and message.full_name.endswith("Value")
        and message.full_name not in ("google.protobuf.Value", "google.protobuf.ListValue")
    )


def method_bindings(method: MethodDescriptor) -> list[Binding]:
    """Every HTTP binding of one method (none when it has no `google.api.http` option)."""
    options = method.GetOptions()
    if not options.HasExtension(annotations_pb2.http):
        return []
    rule: http_pb2.HttpRule = options.Extensions[annotations_pb2.http]
    bindings = [_bindings(method, rule, 0)]
    for i, extra in enumerate(rule.additional_bindings, start=1):
        if extra.additional_bindings:
            raise RouteError(f"{method.full_name}: additional bindings cannot nest")
        bindings.append(_bindings(method, extra, i))
    return bindings


def import_contracts(package: str = "gen") -> list[FileDescriptor]:
    """Import every generated `*_pb2` module under `package` (filling the descriptor pool)."""
    root = importlib.import_module(package)
    files: list[FileDescriptor] = []
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
        if info.name.endswith("_pb2"):
            module = importlib.import_module(info.name)
            files.append(module.DESCRIPTOR)
    return files


def annotated_services(*, include_testing: bool = False, package: str = "gen") -> list[str]:
    """Services under `package` with at least one HTTP binding, sorted by name.

    Services of the `testing` bounded context are left out unless asked for.
    """
    found: set[str] = set()
    for file in import_contracts(package):
        for service in file.services_by_name.values():
            context = service.GetOptions().Extensions[options_pb2.service_policy].bounded_context
            if context == TESTING_CONTEXT and not include_testing:
                continue
            if any(method_bindings(m) for m in service.methods):
                found.add(service.full_name)
    return sorted(found)


def _priority(binding: Binding) -> tuple[int, int, int]:
    template = binding.template
    return (0 if template.verb else 1, 1 if template.deep else 0, -template.literal_count)


class RouteTable:
    """Bindings indexed by HTTP method; `match` finds one for a request."""

    def __init__(self, bindings: Iterable[Binding]) -> None:
        self.bindings: tuple[Binding, ...] = tuple(bindings)
        by_verb: dict[str, list[Binding]] = {}
        seen: dict[tuple[str, str], Binding] = {}
        for binding in self.bindings:
            key = (binding.http_method, binding.template.source)
            if key in seen:
                raise RouteError(
                    f"{binding.http_method} {binding.template.source} is bound by both "
                    f"{seen[key].method.full_name} and {binding.method.full_name}"
                )
            seen[key] = binding
            by_verb.setdefault(binding.http_method, []).append(binding)
        self._by_verb = {v: sorted(b, key=_priority) for v, b in by_verb.items()}

    @classmethod
    def from_services(cls, services: Iterable[str]) -> RouteTable:
        pool = descriptor_pool.Default()
        bindings: list[Binding] = []
        for name in services:
            try:
                service = pool.FindServiceByName(name)
            except KeyError:
                raise RouteError(
                    f"service {name!r} is not in the descriptor pool; import its _pb2 module"
                ) from None
            for method in service.methods:
                bindings.extend(method_bindings(method))
        return cls(bindings)

    @property
    def verbs(self) -> frozenset[str]:
        return frozenset(self._by_verb)

    def match(self, http_method: str, raw_path: str) -> RouteMatch | None:
        candidates = self._by_verb.get(http_method)
        if not candidates:
            return None
        return _match(candidates, raw_path)

    def allowed(self, raw_path: str) -> list[str]:
        """The HTTP methods some binding accepts for `raw_path` (for 405 answers)."""
        return sorted(v for v, c in self._by_verb.items() if _match(c, raw_path) is not None)


def _match(candidates: list[Binding], raw_path: str) -> RouteMatch | None:
    if not raw_path.startswith("/"):
        return None
    segments = raw_path[1:].split("/")
    last = segments[-1]
    verb_segments: list[str] | None = None
    verb: str | None = None
    colon = last.rfind(":")
    if colon >= 0:
        verb = last[colon + 1 :]
        verb_segments = [*segments[:-1], last[:colon]]
    for binding in candidates:
        template = binding.template
        if template.verb:
            if verb_segments is None:
                continue
            found = template.match(verb_segments, verb)
        else:
            found = template.match(segments, None)
        if found is not None:
            return RouteMatch(binding, found)
    return None
