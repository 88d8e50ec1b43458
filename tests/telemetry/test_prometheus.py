"""/metrics in both namings: promtool-clean, classic grpc-prometheus families, exemplars."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from framework.telemetry.names import GRPC_PROMETHEUS, OTEL
from tests.telemetry.busy import OPENMETRICS, busy_scrape


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        message = "promtool is not installed (Debian package 'prometheus')"
        if os.environ.get("REQUIRE_SERVICES") == "1":
            pytest.fail(f"{message}; REQUIRE_SERVICES=1: .ci/run installs it")
        pytest.skip(f"{message}; set REQUIRE_SERVICES=1 to make this a failure")
    return path


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if v}
            out.setdefault(sample.name, []).append((labels, sample.value))
    return out


@pytest.mark.parametrize("naming", [OTEL, GRPC_PROMETHEUS])
async def test_promtool_accepts_a_busy_servers_metrics(naming: str) -> None:
    """`promtool check metrics` finds no problem in a scrape of a busy server."""
    promtool = _promtool()
    text = await busy_scrape(naming)
    assert "_bucket" in text and "breaker_state" in text
    checked = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (checked.returncode, checked.stdout + checked.stderr) == (0, "")


async def test_otel_naming_has_durations_in_seconds_by_status() -> None:
    """OTel naming: rpc_{server,client}_call_duration_seconds by rpc_method and status code."""
    samples = _samples(await busy_scrape(OTEL))
    counts = samples["rpc_server_call_duration_seconds_count"]
    by_status = {}
    for labels, value in counts:
        assert labels["rpc_system_name"] == "grpc"
        assert labels["rpc_method"].startswith("echo.v1.EchoService/")
        by_status[labels["rpc_response_status_code"]] = (
            by_status.get(labels["rpc_response_status_code"], 0) + value
        )
    assert {"OK", "NOT_FOUND", "UNAVAILABLE", "RESOURCE_EXHAUSTED"} <= set(by_status)
    reasons = {labels.get("error_type") for labels, _ in counts}
    assert {None, "NOT_FOUND", "RATE_LIMITED"} <= reasons
    client = {
        labels.get("error_type") for labels, _ in samples["rpc_client_call_duration_seconds_count"]
    }
    assert "CIRCUIT_OPEN" in client
    assert not any("milliseconds" in name for name in samples)


async def test_classic_naming_has_the_grpc_prometheus_families() -> None:
    """grpc_prometheus naming: started/handled counters and handling_seconds histograms with
    grpc_type, grpc_service, grpc_method and Go-spelled grpc_code; started == handled."""
    samples = _samples(await busy_scrape(GRPC_PROMETHEUS))
    for side in ("server", "client"):
        started = samples[f"grpc_{side}_started_total"]
        handled = samples[f"grpc_{side}_handled_total"]
        assert {labels["grpc_type"] for labels, _ in started} == {
            "unary",
            "server_stream",
            "client_stream",
        }
        assert all(labels["grpc_service"] == "echo.v1.EchoService" for labels, _ in handled)
        codes = {labels["grpc_code"] for labels, _ in handled}
        assert {"OK", "NotFound", "Unavailable", "ResourceExhausted"} <= codes
        assert sum(v for _, v in started) == sum(v for _, v in handled)  # nothing in flight
        histogram = samples[f"grpc_{side}_handling_seconds_count"]
        assert sum(v for _, v in histogram) == sum(v for _, v in handled)
        assert all("grpc_code" not in labels for labels, _ in histogram)
    assert not any(name.startswith("rpc_server_call_duration") for name in samples)


@pytest.mark.parametrize("naming", [OTEL, GRPC_PROMETHEUS])
async def test_duration_buckets_carry_trace_exemplars_in_openmetrics(naming: str) -> None:
    """Asked for OpenMetrics, duration buckets carry trace_id/span_id exemplars; the classic
    text format has none."""
    text = await busy_scrape(naming, accept=OPENMETRICS)
    assert text.rstrip().endswith("# EOF")
    exemplars = [
        sample.exemplar
        for family in openmetrics_families(text)
        if family.type == "histogram"
        for sample in family.samples
        if sample.exemplar is not None
    ]
    assert exemplars
    for exemplar in exemplars:
        assert len(exemplar.labels["trace_id"]) == 32 and int(exemplar.labels["trace_id"], 16)
        assert len(exemplar.labels["span_id"]) == 16
        assert exemplar.value >= 0
    plain = await busy_scrape(naming)
    assert " # {" not in plain
