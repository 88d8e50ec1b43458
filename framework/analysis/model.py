"""The system as the analysis sees it: services, contexts, events and dependency edges.

Built from three sources, each optional but the first:
- the contracts (`from_contracts`): every service with its bounded context, owned
  entities, declared dependencies (`framework.v1.service_policy`), the message types its
  RPCs carry, and the domain events each context publishes (`events.proto` files);
- the code (`framework.analysis.code`): the stubs and event types each service uses;
- traces (`framework.analysis.traces`): who really called whom, how often, with errors.

Edges always point from the dependent to what it depends on: a `call` edge from the
caller to the callee, an `event` edge from a consumer to the context publishing the
event (drawn the other way round, as the flow of events).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from google.protobuf import descriptor_pb2

from gen.framework.v1 import options_pb2

__all__ = [
    "Edge",
    "EdgeKind",
    "Origin",
    "Service",
    "SystemModel",
    "from_contracts",
]

EdgeKind = Literal["call", "event"]
Origin = Literal["contract", "code", "trace"]

# Packages whose messages are shared infrastructure, never another context's model.
_NEUTRAL_PREFIXES = ("google.", "framework.", "grpc.")


@dataclass(frozen=True, slots=True)
class Service:
    """One gRPC service of the contracts."""

    name: str  # full name, e.g. "order.v1.OrderService"
    package: str  # e.g. "order.v1"
    context: str  # bounded context; the package's first segment when undeclared
    owns: tuple[str, ...] = ()
    depends_on: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    # message types reachable from its RPC signatures (requests, responses, their fields)
    messages: tuple[str, ...] = ()

    @property
    def short(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True, slots=True)
class Edge:
    """`source` depends on `target` (both service full names, or an outside caller)."""

    source: str
    target: str
    kind: EdgeKind
    origin: Origin
    calls: int = 0  # observed calls (traces)
    errors: int = 0  # observed failed calls (traces)
    detail: str = ""  # where it was found: file:line, event types, ...


@dataclass(slots=True)
class SystemModel:
    """Services by full name, events by publishing context, edges from every source."""

    services: dict[str, Service] = field(default_factory=dict)
    # context -> full names of the domain events it publishes
    events: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # message full name -> package, for every message of the contracts
    message_packages: dict[str, str] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)
    sources: set[Origin] = field(default_factory=set)
    # callers seen in code or traces that are not services of the contracts
    outside: set[str] = field(default_factory=set)
    # services whose implementation the code scan found / that appear in the traces
    implemented: set[str] = field(default_factory=set)
    traced: set[str] = field(default_factory=set)

    # ------------------------------------------------------------ lookups
    def context_of(self, name: str) -> str | None:
        """Bounded context of a service, or None for an outside caller."""
        service = self.services.get(name)
        return service.context if service else None

    def package_context(self, package: str) -> str | None:
        """Context owning a package: the context of its services, None if it has none."""
        for service in self.services.values():
            if service.package == package:
                return service.context
        return None

    def event_context(self, message: str) -> str | None:
        """The context publishing a domain event type, or None if it is not one."""
        for context, events in self.events.items():
            if message in events:
                return context
        return None

    def find_service(self, short_name: str, package: str | None = None) -> str | None:
        """Full name of a service by its short name (and package when known)."""
        matches = [
            s.name
            for s in self.services.values()
            if s.short == short_name and (package is None or s.package == package)
        ]
        return matches[0] if len(matches) == 1 else None

    def add(self, edges: Iterable[Edge], origin: Origin) -> None:
        self.edges.extend(edges)
        self.sources.add(origin)

    def call_edges(self, origins: Iterable[Origin] | None = None) -> list[Edge]:
        wanted = set(origins) if origins is not None else {"contract", "code", "trace"}
        return [e for e in self.edges if e.kind == "call" and e.origin in wanted]

    def dependency_pairs(
        self, kinds: Iterable[EdgeKind] = ("call", "event")
    ) -> set[tuple[str, str]]:
        """Distinct (source, target) service pairs over every origin, self-loops left out."""
        wanted = set(kinds)
        return {
            (e.source, e.target)
            for e in self.edges
            if e.kind in wanted
            and e.source != e.target
            and e.source in self.services
            and e.target in self.services
        }


# ---------------------------------------------------------------- contracts


def _message_closure(
    roots: Iterable[str], messages: dict[str, descriptor_pb2.DescriptorProto]
) -> set[str]:
    """Every message type reachable from `roots` through message-typed fields."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        proto = messages.get(name)
        if proto is None:
            continue
        todo.extend(
            f.type_name.lstrip(".")
            for f in proto.field
            if f.type == descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
        )
    return seen


def _collect_messages(
    prefix: str,
    protos: Iterable[descriptor_pb2.DescriptorProto],
    package: str,
    into: dict[str, descriptor_pb2.DescriptorProto],
    packages: dict[str, str],
) -> None:
    for proto in protos:
        name = f"{prefix}.{proto.name}" if prefix else proto.name
        into[name] = proto
        packages[name] = package
        _collect_messages(name, proto.nested_type, package, into, packages)


def from_contracts(files: descriptor_pb2.FileDescriptorSet) -> SystemModel:
    """The model's contract half: services, contexts, declared dependencies, events."""
    model = SystemModel()
    messages: dict[str, descriptor_pb2.DescriptorProto] = {}
    event_files: list[descriptor_pb2.FileDescriptorProto] = []
    for file in files.file:
        _collect_messages(
            file.package, file.message_type, file.package, messages, model.message_packages
        )
        if file.name.endswith("events.proto"):
            event_files.append(file)
    for file in files.file:
        for service in file.service:
            policy = service.options.Extensions[options_pb2.service_policy]
            full = f"{file.package}.{service.name}" if file.package else service.name
            roots = [t.lstrip(".") for m in service.method for t in (m.input_type, m.output_type)]
            model.services[full] = Service(
                name=full,
                package=file.package,
                context=policy.bounded_context or file.package.split(".")[0] or full,
                owns=tuple(policy.owns),
                depends_on=tuple(policy.depends_on),
                methods=tuple(m.name for m in service.method),
                messages=tuple(sorted(_message_closure(roots, messages))),
            )
    for file in event_files:
        context = model.package_context(file.package) or file.package.split(".")[0]
        names = tuple(
            sorted(
                f"{file.package}.{m.name}" if file.package else m.name for m in file.message_type
            )
        )
        model.events[context] = tuple(sorted({*model.events.get(context, ()), *names}))
    model.add(
        (
            Edge(source=s.name, target=dep, kind="call", origin="contract")
            for s in model.services.values()
            for dep in s.depends_on
        ),
        "contract",
    )
    return model


def is_neutral(message: str) -> bool:
    """Shared infrastructure types (google.*, framework.*) belong to no context."""
    return message.startswith(_NEUTRAL_PREFIXES)
