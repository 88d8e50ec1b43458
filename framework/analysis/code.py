"""What the services' code really depends on, found statically (the code is never run).

Each folder under the services root is one deployable (`services/order/`, ...). Its
Python files are parsed; names imported from generated modules are followed:
- a `...Servicer` base class or `add_...Servicer_to_server` call: the folder implements
  that service;
- a `...Stub` (called or referenced): the folder calls that service;
- a message of another context's `events_pb2` module, or that event's full name as a
  string: the folder consumes that context's domain events.

A folder that implements no service of the contracts (a demo, a CLI) is an outside
caller: its calls are drawn but never reported as undeclared.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from framework.analysis.model import Edge, SystemModel

__all__ = ["CodeUse", "add_code", "scan_folder"]


@dataclass(frozen=True, slots=True)
class CodeUse:
    """One use of a generated name: what kind, of what, where."""

    kind: str  # "implements" | "stub" | "event"
    package: str  # proto package, e.g. "inventory.v1"
    name: str  # service short name or event message name
    where: str  # path:line


def _package_of(module: str) -> tuple[str, str] | None:
    """("inventory.v1", "inventory_pb2_grpc") for "gen.inventory.v1.inventory_pb2_grpc"."""
    parts = module.split(".")
    if len(parts) < 2 or "_pb2" not in parts[-1]:
        return None
    if parts[0] == "gen":
        parts = parts[1:]
    return ".".join(parts[:-1]), parts[-1]


def _aliases(tree: ast.Module) -> dict[str, tuple[str, str | None]]:
    """Local name -> (generated module, attribute or None for the module itself)."""
    found: dict[str, tuple[str, str | None]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if "_pb2" in alias.name:
                    found[alias.asname or alias.name] = (alias.name, None)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                local = alias.asname or alias.name
                if "_pb2" in alias.name:
                    found[local] = (f"{node.module}.{alias.name}", None)
                elif "_pb2" in node.module:
                    found[local] = (node.module, alias.name)
    return found


def _uses(path: Path, shown: str, events: set[str]) -> Iterator[CodeUse]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    aliases = _aliases(tree)
    for node in ast.walk(tree):
        module: str | None = None
        attr: str | None = None
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            target = aliases.get(node.value.id)
            if target and target[1] is None:
                module, attr = target[0], node.attr
        elif isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Store):
            target = aliases.get(node.id)
            if target and target[1] is not None:
                module, attr = target
        elif (
            isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in events
        ):
            package, _, name = node.value.rpartition(".")
            yield CodeUse("event", package, name, f"{shown}:{node.lineno}")
            continue
        if module is None or attr is None:
            continue
        split = _package_of(module)
        if split is None:
            continue
        package, stem = split
        where = f"{shown}:{getattr(node, 'lineno', 0)}"
        if stem.endswith("_pb2_grpc"):
            if attr.endswith("Stub"):
                yield CodeUse("stub", package, attr.removesuffix("Stub"), where)
            elif attr.endswith("Servicer") and not attr.startswith("add_"):
                yield CodeUse("implements", package, attr.removesuffix("Servicer"), where)
            elif attr.startswith("add_") and attr.endswith("Servicer_to_server"):
                name = attr.removeprefix("add_").removesuffix("Servicer_to_server")
                yield CodeUse("implements", package, name, where)
        elif stem == "events_pb2" and f"{package}.{attr}" in events:
            yield CodeUse("event", package, attr, where)


def scan_folder(folder: Path, root: Path, events: set[str]) -> list[CodeUse]:
    """Every use of generated names in one service folder, in a stable order."""
    uses: list[CodeUse] = []
    for path in sorted(folder.rglob("*.py")):
        shown = path.relative_to(root.parent).as_posix() if root.parent != path else path.name
        try:
            uses.extend(_uses(path, shown, events))
        except SyntaxError as error:
            raise ValueError(
                f"{shown}: not valid Python ({error.msg}, line {error.lineno})"
            ) from None
    return uses


def add_code(model: SystemModel, root: Path) -> None:
    """Add the code's call and event edges for every service folder under `root`."""
    if not root.is_dir():
        raise FileNotFoundError(f"code directory {root} does not exist")
    events = {e for names in model.events.values() for e in names}
    edges: list[Edge] = []
    folders = sorted(p for p in root.iterdir() if p.is_dir() and any(p.rglob("*.py")))
    for folder in folders:
        uses = scan_folder(folder, root, events)
        implemented = sorted(
            {
                name
                for use in uses
                if use.kind == "implements"
                and (name := model.find_service(use.name, use.package)) is not None
            }
        )
        model.implemented.update(implemented)
        callers = implemented or [f"{root.name}/{folder.name}"]
        first: dict[tuple[str, str, str], str] = {}
        for use in uses:
            if use.kind == "stub":
                target = model.find_service(use.name, use.package)
                if target is None:
                    continue
                for caller in callers:
                    first.setdefault((caller, target, "call"), use.where)
            elif use.kind == "event":
                publishers = [s.name for s in model.services.values() if s.package == use.package]
                for caller in callers:
                    for publisher in publishers:
                        if model.context_of(caller) != model.context_of(publisher):
                            key = (caller, publisher, "event")
                            first.setdefault(key, use.where)
        for (source, target, kind), where in sorted(first.items()):
            if source == target:
                continue
            if source not in model.services:
                model.outside.add(source)
            edges.append(
                Edge(
                    source=source,
                    target=target,
                    kind="call" if kind == "call" else "event",
                    origin="code",
                    detail=where,
                )
            )
    model.add(edges, "code")
