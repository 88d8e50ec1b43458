"""The shipped Grafana dashboard: valid JSON, valid PromQL, only metrics the framework exports."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from framework.telemetry.names import OTEL
from tests.telemetry.busy import busy_scrape
from tests.telemetry.test_prometheus import _promtool

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "grpc-microframework.json"

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*(?:\s*\()?")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "le", "inf", "nan"}


def _load() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression: panel targets and query variables."""
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if variable["type"] == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, labels, keywords left out)."""
    if expr.startswith("label_values("):
        return {expr.removeprefix("label_values(").split(",")[0].strip()}
    text = _VARIABLE.sub("x", expr)
    for pattern in (_STRING, _MATCHERS, _RANGE, _GROUPING):
        text = pattern.sub(" ", text)
    names = set()
    for token in _IDENTIFIER.findall(text):
        if token.endswith("(") or token.rstrip().endswith("("):
            continue  # a function or aggregation
        if token not in _KEYWORDS and not token.replace(".", "").isdigit():
            names.add(token)
    return names


def test_metric_names_are_found_in_promql() -> None:
    """The PromQL reader finds metrics and skips functions, labels, ranges and variables."""
    expr = (
        'histogram_quantile(0.99, sum by (le, rpc_method) (rate(a_bucket{job=~"$job", '
        'x!="OK"}[$__rate_interval]))) / sum(rate(b_total[5m]))'
    )
    assert metric_names(expr) == {"a_bucket", "b_total"}
    assert metric_names("label_values(c_count, job)") == {"c_count"}


def test_the_dashboard_is_valid_json_with_panels_and_queries() -> None:
    """The file parses, has a uid, panels with queries, a data source and a job variable."""
    dashboard = _load()
    assert dashboard["uid"] and dashboard["title"]
    assert len(dashboard["panels"]) >= 6
    assert all(panel["targets"] for panel in dashboard["panels"])
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job"} <= variables
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("requests", "errors", "latency", "breaker", "rate-limit", "in flight"):
        assert topic in titles


async def test_every_query_names_only_metrics_a_busy_server_exports() -> None:
    """Each metric the dashboard reads is in a scrape of a busy framework server."""
    text = await busy_scrape(OTEL)
    exported = {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }
    used = set().union(*(metric_names(expr) for expr in _queries(_load())))
    assert used  # the reader found something to check
    assert used - exported == set()


async def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool accepts every query (Grafana variables filled in) as a recording rule."""
    promtool = _promtool()
    exprs = [e for e in _queries(_load()) if not e.startswith("label_values(")]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {
                        "record": f"dashboard:query_{i}",
                        "expr": e.replace("$__rate_interval", "5m").replace("$job", ".*"),
                    }
                    for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "rules.json"  # YAML is a superset of JSON
    path.write_text(json.dumps(rules))
    checked = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in checked.stdout
