"""A report in three forms: terminal text, JSON, and the service graph (DOT, Mermaid, SVG/PNG).

The graph draws bounded contexts as clusters, synchronous calls as solid arrows (caller
to callee) and event flows as dashed arrows (publisher to consumer); edges and services
named by a finding of severity `error` are red, by a `warning` orange. SVG and PNG are
rendered by Graphviz's `dot` (Debian package `graphviz`). Every output depends only on
its inputs, so a committed picture can be checked current.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from framework.analysis.findings import Report
from framework.analysis.model import Edge

__all__ = ["GraphvizMissingError", "render_graph", "to_dot", "to_json", "to_mermaid", "to_text"]

_COLORS = {"error": "#c62828", "warning": "#ef6c00"}


class GraphvizMissingError(RuntimeError):
    """`dot` is not installed."""


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _instability(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def to_text(report: Report) -> str:
    """A readable terminal report: summary, findings by rank, coupling table."""
    model = report.model
    lines = [
        f"{len(model.services)} services in {len({s.context for s in model.services.values()})}"
        f" contexts; sources: {', '.join(sorted(model.sources))}",
        "",
    ]
    if report.findings:
        lines.append(f"Findings ({len(report.findings)}):")
        for number, finding in enumerate(report.findings, 1):
            lines.append(f"{number:3}. [{finding.severity}] {finding.kind}: {finding.subject}")
            lines.append(f"     {finding.explanation}")
            lines.append(f"     -> {finding.suggestion}")
    else:
        lines.append("Findings: none")
    lines += ["", "Coupling (calls and event subscriptions):"]
    width = max([len(c.service) for c in report.coupling] + [7])
    lines.append(f"  {'service':<{width}}  {'context':<14} {'Ca':>3} {'Ce':>3}     I")
    for c in report.coupling:
        lines.append(
            f"  {c.service:<{width}}  {c.context:<14} {c.afferent:>3} {c.efferent:>3}"
            f"  {_instability(c.instability):>4}"
        )
    return "\n".join(lines) + "\n"


def _edge_json(edge: Edge) -> dict[str, Any]:
    return {
        "source": edge.source,
        "target": edge.target,
        "kind": edge.kind,
        "origin": edge.origin,
        "calls": edge.calls,
        "errors": edge.errors,
        "detail": edge.detail,
    }


def to_json(report: Report) -> str:
    """The whole report as JSON (stable key order)."""
    model = report.model
    data = {
        "sources": sorted(model.sources),
        "services": [
            {
                "name": s.name,
                "context": s.context,
                "owns": list(s.owns),
                "depends_on": list(s.depends_on),
                "methods": list(s.methods),
            }
            for s in sorted(model.services.values(), key=lambda s: s.name)
        ],
        "events": {context: list(names) for context, names in sorted(model.events.items())},
        "outside_callers": sorted(model.outside),
        "edges": [_edge_json(e) for e in model.edges],
        "findings": [
            {
                "kind": f.kind,
                "severity": f.severity,
                "subject": f.subject,
                "explanation": f.explanation,
                "suggestion": f.suggestion,
            }
            for f in report.findings
        ],
        "coupling": [
            {
                "service": c.service,
                "context": c.context,
                "afferent": c.afferent,
                "efferent": c.efferent,
                "instability": c.instability,
            }
            for c in report.coupling
        ],
    }
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _highlights(report: Report) -> tuple[dict[str, str], dict[tuple[str, str], str]]:
    """Colour per service and per edge from the worst finding naming it."""
    services: dict[str, str] = {}
    edges: dict[tuple[str, str], str] = {}
    for finding in report.findings:  # ranked: the first colour set wins
        color = _COLORS.get(finding.severity)
        if color is None:
            continue
        for name in finding.services:
            services.setdefault(name, color)
        for pair in finding.edges:
            edges.setdefault(pair, color)
    return services, edges


def _graph_edges(report: Report) -> list[tuple[str, str, str, str]]:
    """(from, to, kind, label) once per drawn arrow; events drawn publisher -> consumer."""
    drawn: dict[tuple[str, str, str], set[str]] = {}
    for edge in report.model.edges:
        if edge.source == edge.target:
            continue
        if edge.kind == "event":
            key = (edge.target, edge.source, "event")
        else:
            key = (edge.source, edge.target, "call")
        labels = drawn.setdefault(key, set())
        if edge.origin == "trace":
            labels.add(f"{edge.calls} calls" + (f", {edge.errors} err" if edge.errors else ""))
        elif edge.origin == "contract" and key[2] == "call":
            labels.add("declared")
    result = []
    for (a, b, kind), labels in sorted(drawn.items()):
        label = "events" if kind == "event" else ", ".join(sorted(labels - {"declared"}))
        result.append((a, b, kind, label))
    return result


def _node_id(name: str) -> str:
    return "n_" + "".join(ch if ch.isalnum() else "_" for ch in name)


def to_dot(report: Report) -> str:
    """Graphviz DOT text of the service graph."""
    model = report.model
    colors, edge_colors = _highlights(report)
    lines = [
        "digraph system {",
        '  graph [rankdir=LR, fontname="Helvetica", fontsize=11, nodesep=0.4];',
        '  node [shape=box, style="rounded,filled", fillcolor="#f5f5f5", fontname="Helvetica",'
        " fontsize=10];",
        '  edge [fontname="Helvetica", fontsize=9];',
    ]
    by_context: dict[str, list[str]] = {}
    for service in model.services.values():
        by_context.setdefault(service.context, []).append(service.name)
    for number, (context, names) in enumerate(sorted(by_context.items())):
        lines.append(f"  subgraph cluster_{number} {{")
        lines.append(f'    label="{context}"; style="rounded"; color="#9e9e9e";')
        for name in sorted(names):
            color = colors.get(name)
            extra = f', color="{color}", penwidth=2' if color else ""
            lines.append(f'    {_node_id(name)} [label="{_short(name)}"{extra}];')
        lines.append("  }")
    for outside in sorted(model.outside):
        lines.append(f'  {_node_id(outside)} [label="{outside}", shape=ellipse, fillcolor=white];')
    for a, b, kind, label in _graph_edges(report):
        attrs = []
        if kind == "event":
            attrs += ["style=dashed", 'color="#1565c0"']
        color = edge_colors.get((a, b)) if kind == "call" else None
        if color:
            attrs += [f'color="{color}"', "penwidth=2"]
        if label:
            attrs.append(f'label="{label}"')
        lines.append(f"  {_node_id(a)} -> {_node_id(b)} [{', '.join(attrs)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_mermaid(report: Report) -> str:
    """Mermaid flowchart text of the same graph, for Markdown docs."""
    model = report.model
    colors, edge_colors = _highlights(report)
    lines = ["flowchart LR"]
    by_context: dict[str, list[str]] = {}
    for service in model.services.values():
        by_context.setdefault(service.context, []).append(service.name)
    for context, names in sorted(by_context.items()):
        lines.append(f"  subgraph {_node_id('ctx_' + context)}[{context}]")
        for name in sorted(names):
            lines.append(f"    {_node_id(name)}[{_short(name)}]")
        lines.append("  end")
    for outside in sorted(model.outside):
        lines.append(f"  {_node_id(outside)}([{outside}])")
    styles = []
    for number, (a, b, kind, label) in enumerate(_graph_edges(report)):
        arrow = "-.->" if kind == "event" else "-->"
        text = f"|{label}|" if label else ""
        lines.append(f"  {_node_id(a)} {arrow}{text} {_node_id(b)}")
        color = edge_colors.get((a, b)) if kind == "call" else None
        if color:
            styles.append(f"  linkStyle {number} stroke:{color},stroke-width:2px")
    for name, color in sorted(colors.items()):
        if name in model.services:
            styles.append(f"  style {_node_id(name)} stroke:{color},stroke-width:2px")
    return "\n".join(lines + styles) + "\n"


def render_graph(report: Report, out: Path) -> None:
    """Write the graph to `out`: `.dot`, `.mmd`, or `.svg`/`.png` through Graphviz."""
    suffix = out.suffix.lower()
    if suffix == ".dot":
        out.write_text(to_dot(report))
        return
    if suffix in (".mmd", ".mermaid"):
        out.write_text(to_mermaid(report))
        return
    if suffix not in (".svg", ".png"):
        raise ValueError(f"{out}: unknown picture format {suffix!r} (use .svg, .png, .dot or .mmd)")
    dot = shutil.which("dot")
    if dot is None:
        raise GraphvizMissingError(
            "Graphviz 'dot' is not installed: install it (Debian: apt-get install graphviz), "
            "or write .dot / .mmd instead"
        )
    result = subprocess.run(
        [dot, f"-T{suffix[1:]}", "-o", str(out)],
        input=to_dot(report).encode(),
        capture_output=True,
        check=False,
        timeout=60,
    )
    if result.returncode != 0:
        raise RuntimeError(f"dot failed: {result.stderr.decode(errors='replace').strip()}")
