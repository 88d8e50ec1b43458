"""Decomposition and coupling analysis from the contracts, the code and live traces.

    model = load_system(Path("protos"), code=Path("services"), traces=Path("traces.json"))
    report = analyze(model)            # findings ranked, coupling per service
    text = to_text(report)             # the table the CLI writes

`python -m framework analyze [protos] [--code services] [--traces FILE]` is the same from
the command line (see `framework/analysis/README.md`).
"""

from __future__ import annotations

from framework.analysis.findings import Coupling, Finding, Report, analyze
from framework.analysis.load import load_system
from framework.analysis.model import Edge, Service, SystemModel
from framework.analysis.render import render_graph, to_dot, to_json, to_mermaid, to_text

__all__ = [
    "Coupling",
    "Edge",
    "Finding",
    "Report",
    "Service",
    "SystemModel",
    "analyze",
    "load_system",
    "render_graph",
    "to_dot",
    "to_json",
    "to_mermaid",
    "to_text",
]
