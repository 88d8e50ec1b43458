"""The project's own system passes the architecture check, and its committed map is current."""

from __future__ import annotations

from framework.analysis import analyze, load_system, to_mermaid
from tests.analysis.conftest import ROOT

EXCLUDED = ("testing", "operations")  # as `make analysis` runs it


def test_example_system_has_no_cycle_or_undeclared_call() -> None:
    """protos/ + services/ give no cycle and no undeclared dependency (what CI fails on)."""
    report = analyze(load_system(ROOT / "protos", ROOT / "services", exclude_contexts=EXCLUDED))
    bad = [f"{f.kind}: {f.subject}" for f in report.findings if f.kind in ("cycle", "undeclared")]
    assert bad == []
    assert {"inventory.v1.InventoryService", "order.v1.OrderService"} <= set(report.model.services)


def test_committed_mermaid_map_is_current() -> None:
    """docs/system.mmd equals the map regenerated from today's contracts and code."""
    report = analyze(load_system(ROOT / "protos", ROOT / "services", exclude_contexts=EXCLUDED))
    committed = (ROOT / "docs/system.mmd").read_text()
    assert committed == to_mermaid(report), "docs/system.* are stale: run `make analysis`"
