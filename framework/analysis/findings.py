"""Findings and coupling metrics over a `SystemModel`.

Findings, each with one line of explanation and a suggestion, ranked by severity:

| kind | severity | what |
|---|---|---|
| `cycle` | error | services that depend on each other in a circle (calls or events) |
| `shared-entity` | error | an entity claimed (`owns`) by more than one bounded context |
| `undeclared` | error | a call in the code or traces that the contract does not declare |
| `shared-model` | warning | a message type of one context carried by another context's RPC |
| `deep-chain` | warning | a synchronous chain crossing more than N contexts (suggest an event) |
| `unstable-dependency` | warning | depending on something less stable (stable dependencies) |
| `unused-declared` | info | a declared dependency neither the code nor the traces show |

Coupling per service, over calls and event subscriptions from every source: afferent
Ca (who depends on it), efferent Ce (what it depends on), instability Ce / (Ca + Ce)
(None when it is isolated).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from framework.analysis.model import SystemModel, is_neutral

__all__ = [
    "FINDING_KINDS",
    "Coupling",
    "Finding",
    "Report",
    "analyze",
    "coupling",
    "cycles",
]

Severity = Literal["error", "warning", "info"]
# enough for any real system map; stops a pathological dense graph from exploding
_MAX_PATHS = 10_000
_RANK: dict[Severity, int] = {"error": 0, "warning": 1, "info": 2}
FINDING_KINDS = (
    "cycle",
    "shared-entity",
    "undeclared",
    "shared-model",
    "deep-chain",
    "unstable-dependency",
    "unused-declared",
)


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str
    severity: Severity
    subject: str  # what it is about: "a -> b", a service, an entity
    explanation: str
    suggestion: str
    services: tuple[str, ...] = ()  # services to highlight in the picture
    edges: tuple[tuple[str, str], ...] = ()  # edges to highlight


@dataclass(frozen=True, slots=True)
class Coupling:
    service: str
    context: str
    afferent: int
    efferent: int

    @property
    def instability(self) -> float | None:
        total = self.afferent + self.efferent
        return None if total == 0 else self.efferent / total


@dataclass(frozen=True, slots=True)
class Report:
    model: SystemModel
    findings: tuple[Finding, ...]
    coupling: tuple[Coupling, ...]

    def kinds(self) -> set[str]:
        return {f.kind for f in self.findings}


# ------------------------------------------------------------------ graphs


def _adjacency(pairs: Iterable[tuple[str, str]]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for source, target in pairs:
        graph.setdefault(source, set()).add(target)
        graph.setdefault(target, set())
    return graph


def cycles(pairs: Iterable[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components with more than one node, each sorted, in order."""
    graph = _adjacency(pairs)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        # iterative Tarjan: (node, iterator over successors)
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            advanced = False
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = counter
                    counter += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    advanced = True
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def coupling(model: SystemModel) -> list[Coupling]:
    """Ca, Ce and instability of every service of the contracts."""
    pairs = model.dependency_pairs()
    return [
        Coupling(
            service=name,
            context=service.context,
            afferent=sum(1 for s, t in pairs if t == name),
            efferent=sum(1 for s, t in pairs if s == name),
        )
        for name, service in sorted(model.services.items())
    ]


def _longest_context_chains(model: SystemModel) -> list[list[str]]:
    """Longest simple synchronous paths, measured in context crossings, from each start."""
    graph = _adjacency(model.dependency_pairs(kinds=("call",)))
    best: list[list[str]] = []

    def crossings(path: list[str]) -> int:
        return sum(
            1 for a, b in itertools.pairwise(path) if model.context_of(a) != model.context_of(b)
        )

    def walk(path: list[str]) -> None:
        if len(best) >= _MAX_PATHS:
            return
        extended = False
        for succ in sorted(graph.get(path[-1], ())):
            if succ not in path:
                extended = True
                walk([*path, succ])
        if not extended and len(path) > 1:
            best.append(path)

    called = {t for targets in graph.values() for t in targets}
    roots = [n for n in sorted(graph) if n not in called] or sorted(graph)
    for start in roots:
        if len(best) >= _MAX_PATHS:
            break
        walk([start])
    return sorted(best, key=lambda p: (-crossings(p), p))


# ---------------------------------------------------------------- findings


def _cycle_findings(model: SystemModel) -> list[Finding]:
    found = []
    pairs = model.dependency_pairs()
    for component in cycles(pairs):
        members = set(component)
        edges = tuple(sorted((s, t) for s, t in pairs if s in members and t in members))
        shown = " -> ".join(s.rsplit(".", 1)[-1] for s in component)
        found.append(
            Finding(
                kind="cycle",
                severity="error",
                subject=" <-> ".join(component),
                explanation=f"{shown} depend on each other: none can change or deploy alone",
                suggestion="break the cycle: let one side publish an event the other consumes, "
                "or move the shared behaviour into one context",
                services=tuple(component),
                edges=edges,
            )
        )
    return found


def _shared_entities(model: SystemModel) -> list[Finding]:
    claims: dict[str, set[str]] = {}
    owners: dict[str, set[str]] = {}
    for service in model.services.values():
        for entity in service.owns:
            claims.setdefault(entity, set()).add(service.context)
            owners.setdefault(entity, set()).add(service.name)
    return [
        Finding(
            kind="shared-entity",
            severity="error",
            subject=entity,
            explanation=f"entity {entity} is owned by {len(contexts)} contexts "
            f"({', '.join(sorted(contexts))}): two writers of one truth",
            suggestion="give it one owner; the others keep a copy fed by its events, "
            "or call the owner",
            services=tuple(sorted(owners[entity])),
        )
        for entity, contexts in sorted(claims.items())
        if len(contexts) > 1
    ]


def _shared_models(model: SystemModel) -> list[Finding]:
    found = []
    for service in sorted(model.services.values(), key=lambda s: s.name):
        foreign: dict[str, list[str]] = {}
        for message in service.messages:
            if is_neutral(message):
                continue
            package = model.message_packages.get(message)
            owner = model.package_context(package) if package else None
            if owner is not None and owner != service.context:
                foreign.setdefault(owner, []).append(message)
        for owner, messages in sorted(foreign.items()):
            found.append(
                Finding(
                    kind="shared-model",
                    severity="warning",
                    subject=f"{service.name} uses {', '.join(sorted(messages))}",
                    explanation=f"{service.short} ({service.context}) carries {owner}'s "
                    f"message type in its API: a change in {owner} breaks its callers",
                    suggestion=f"define {service.context}'s own message and translate at "
                    "the boundary (anti-corruption layer)",
                    services=(service.name,),
                )
            )
    return found


def _undeclared(model: SystemModel) -> list[Finding]:
    found = []
    seen: set[tuple[str, str]] = set()
    for edge in model.call_edges(("code", "trace")):
        if edge.source not in model.services or edge.target not in model.services:
            continue
        if edge.source == edge.target or (edge.source, edge.target) in seen:
            continue
        if edge.target in model.services[edge.source].depends_on:
            continue
        seen.add((edge.source, edge.target))
        where = "the code" if edge.origin == "code" else "the traces"
        found.append(
            Finding(
                kind="undeclared",
                severity="error",
                subject=f"{edge.source} -> {edge.target}",
                explanation=f"{where} show {edge.source} calling {edge.target} "
                f"({edge.detail}), but its contract does not declare it",
                suggestion=f'add "{edge.target}" to depends_on in {edge.source}\'s '
                "service_policy, or remove the call",
                services=(edge.source,),
                edges=((edge.source, edge.target),),
            )
        )
    return found


def _unused(model: SystemModel) -> list[Finding]:
    """Declared but never seen, for services the code implements or the traces show."""
    used = {(e.source, e.target) for e in model.call_edges(("code", "trace"))}
    found = []
    for service in sorted(model.services.values(), key=lambda s: s.name):
        evidence = [
            where
            for where, seen in (("the code", model.implemented), ("the traces", model.traced))
            if service.name in seen
        ]
        if not evidence:
            continue
        for dep in service.depends_on:
            if (service.name, dep) in used:
                continue
            found.append(
                Finding(
                    kind="unused-declared",
                    severity="info",
                    subject=f"{service.name} -> {dep}",
                    explanation=f"{service.short} declares a dependency on {dep} that "
                    f"{' and '.join(evidence)} never {'show' if len(evidence) > 1 else 'shows'}",
                    suggestion="remove it from depends_on if it is gone, or check it is "
                    "still reached",
                    services=(service.name,),
                    edges=((service.name, dep),),
                )
            )
    return found


def _deep_chains(model: SystemModel, max_chain: int) -> list[Finding]:
    found = []
    reported: set[tuple[str, ...]] = set()
    for path in _longest_context_chains(model):
        contexts = [model.context_of(path[0])]
        for service in path[1:]:
            if model.context_of(service) != contexts[-1]:
                contexts.append(model.context_of(service))
        hops = len(contexts) - 1
        if hops <= max_chain or tuple(path) in reported:
            continue
        reported.add(tuple(path))
        found.append(
            Finding(
                kind="deep-chain",
                severity="warning",
                subject=" -> ".join(path),
                explanation=f"a synchronous chain crosses {hops} context boundaries "
                f"(more than {max_chain}): latency and failure add up along it",
                suggestion=f"let {path[-1].rsplit('.', 1)[-1]} publish an event, or keep a "
                f"read model in {path[-2].rsplit('.', 1)[-1]}, instead of calling through",
                services=tuple(path),
                edges=tuple(itertools.pairwise(path)),
            )
        )
    return found


def _unstable_dependencies(model: SystemModel, metrics: list[Coupling]) -> list[Finding]:
    instability = {c.service: c.instability for c in metrics}
    found = []
    for source, target in sorted(model.dependency_pairs()):
        mine, theirs = instability.get(source), instability.get(target)
        if mine is None or theirs is None or theirs <= mine:
            continue
        found.append(
            Finding(
                kind="unstable-dependency",
                severity="warning",
                subject=f"{source} -> {target}",
                explanation=f"{source.rsplit('.', 1)[-1]} (I={mine:.2f}) depends on the less "
                f"stable {target.rsplit('.', 1)[-1]} (I={theirs:.2f}): its changes ripple back",
                suggestion="depend on the more stable side, or invert the dependency "
                "(the stable side publishes events)",
                services=(source, target),
                edges=((source, target),),
            )
        )
    return found


def analyze(model: SystemModel, max_chain: int = 2) -> Report:
    """Every finding, ranked (severity, kind, subject), and the coupling table."""
    if max_chain < 1:
        raise ValueError(f"max_chain must be >= 1, got {max_chain}")
    metrics = coupling(model)
    findings = [
        *_cycle_findings(model),
        *_shared_entities(model),
        *_undeclared(model),
        *_shared_models(model),
        *_deep_chains(model, max_chain),
        *_unstable_dependencies(model, metrics),
        *_unused(model),
    ]
    findings.sort(key=lambda f: (_RANK[f.severity], FINDING_KINDS.index(f.kind), f.subject))
    return Report(model=model, findings=tuple(findings), coupling=tuple(metrics))
