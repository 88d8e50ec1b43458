"""Coupling analysis: findings from purpose-built contracts, code and traces; exact metrics."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from framework.analysis import analyze, load_system, to_dot, to_json, to_mermaid, to_text
from framework.analysis.cli import main as analyze_main
from framework.analysis.findings import cycles
from framework.analysis.traces import read_otlp_json, spans_from_sdk, write_otlp_json
from framework.client import connect
from framework.telemetry.sdk import Telemetry, TelemetryConfig
from framework.testing import serve
from gen.inventory.v1 import inventory_pb2, inventory_pb2_grpc
from gen.payment.v1 import payment_pb2, payment_pb2_grpc
from tests.analysis.conftest import ROOT, Writer


def kinds(report: Any) -> list[tuple[str, str]]:
    return [(f.kind, f.subject) for f in report.findings]


def test_cycle_is_found_and_fails_the_check(contracts: Writer, capsys: Any) -> None:
    """a -> b -> c -> a declared in the contracts is one cycle; --fail-on cycle exits 1."""
    root = contracts(
        a=dict(name="AService", context="alpha", depends_on=["b.v1.BService"]),
        b=dict(name="BService", context="beta", depends_on=["c.v1.CService"]),
        c=dict(name="CService", context="gamma", depends_on=["a.v1.AService"]),
    )
    report = analyze(load_system(root))
    cycle = [f for f in report.findings if f.kind == "cycle"]
    assert [f.subject for f in cycle] == ["a.v1.AService <-> b.v1.BService <-> c.v1.CService"]
    assert cycle[0].severity == "error"
    assert analyze_main([str(root), "--fail-on", "cycle"]) == 1
    assert "failing on cycle" in capsys.readouterr().err
    assert analyze_main([str(root), "--fail-on", "undeclared"]) == 0


def test_tarjan_finds_separate_cycles_and_ignores_chains() -> None:
    """Two disjoint cycles are reported separately; a plain chain is no cycle."""
    pairs = [("a", "b"), ("b", "a"), ("c", "d"), ("d", "e"), ("e", "c"), ("x", "y")]
    assert cycles(pairs) == [["a", "b"], ["c", "d", "e"]]
    assert cycles([("x", "y"), ("y", "z")]) == []


def test_entity_owned_by_two_contexts(contracts: Writer) -> None:
    """`owns: Customer` in two bounded contexts is a shared entity naming both."""
    root = contracts(
        crm=dict(name="CrmService", context="crm", owns=["Customer", "Lead"]),
        billing=dict(name="BillingService", context="billing", owns=["Customer", "Invoice"]),
    )
    report = analyze(load_system(root))
    shared = [f for f in report.findings if f.kind == "shared-entity"]
    assert [f.subject for f in shared] == ["Customer"]
    assert "billing, crm" in shared[0].explanation


def test_message_from_another_context_in_an_rpc(contracts: Writer) -> None:
    """An RPC of `shipping` returning `crm`'s Customer message is a shared model."""
    root = contracts(
        crm=dict(name="CrmService", context="crm", extra="message Customer { string id = 1; }"),
        shipping=dict(
            name="ShippingService",
            context="shipping",
            extra='import "crm/v1/crm.proto";',
            response_fields="crm.v1.Customer customer = 2;",
        ),
    )
    report = analyze(load_system(root))
    assert ("shared-model", "shipping.v1.ShippingService uses crm.v1.Customer") in kinds(report)
    assert all(f.kind != "shared-model" or "Crm" not in f.subject for f in report.findings)


def _service_code(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "__init__.py").write_text("")
    for name, text in files.items():
        (folder / name).write_text(text)


def test_undeclared_call_found_in_code(contracts: Writer, tmp_path: Path) -> None:
    """Code of `a` creating b's stub without declaring it is undeclared (with file:line)."""
    root = contracts(
        a=dict(name="AService", context="alpha", depends_on=["c.v1.CService"]),
        b=dict(name="BService", context="beta"),
        c=dict(name="CService", context="gamma"),
    )
    services = tmp_path / "services"
    _service_code(
        services / "a",
        {
            "servicer.py": "from gen.a.v1 import a_pb2_grpc\n\n"
            "class A(a_pb2_grpc.AServiceServicer):\n    pass\n",
            "clients.py": "from gen.b.v1.b_pb2_grpc import BServiceStub\n"
            "from gen.c.v1 import c_pb2_grpc as c\n\n"
            "def make(channel):\n    return BServiceStub(channel), c.CServiceStub(channel)\n",
        },
    )
    report = analyze(load_system(root, code=services))
    undeclared = [f for f in report.findings if f.kind == "undeclared"]
    assert [f.subject for f in undeclared] == ["a.v1.AService -> b.v1.BService"]
    assert "services/a/clients.py:5" in undeclared[0].explanation
    assert not [f for f in report.findings if f.kind == "unused-declared"]  # c is used


def test_declared_but_unused_and_event_consumption_from_code(
    contracts: Writer, tmp_path: Path
) -> None:
    """A declared dependency the code never calls is reported; consuming events is an edge."""
    root = contracts(
        orders=dict(name="OrderService", context="ordering", events=["OrderPlaced"]),
        mail=dict(name="MailService", context="mail", depends_on=["orders.v1.OrderService"]),
    )
    services = tmp_path / "services"
    _service_code(
        services / "mail",
        {
            "main.py": "from gen.mail.v1 import mail_pb2_grpc\n"
            "from gen.orders.v1 import events_pb2\n\n"
            "def wire(server):\n    mail_pb2_grpc.add_MailServiceServicer_to_server(None, server)\n"
            "    return [events_pb2.OrderPlaced, 'orders.v1.OrderPlaced']\n",
        },
    )
    model = load_system(root, code=services)
    report = analyze(model)
    assert ("unused-declared", "mail.v1.MailService -> orders.v1.OrderService") in kinds(report)
    events = [e for e in model.edges if e.kind == "event"]
    assert [(e.source, e.target, e.origin) for e in events] == [
        ("mail.v1.MailService", "orders.v1.OrderService", "code")
    ]
    assert model.events == {"ordering": ("orders.v1.OrderPlaced",)}
    assert "-.->|events|" in to_mermaid(report)


def _otlp(spans: list[dict[str, Any]], service: str = "proc") -> dict[str, Any]:
    return {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"stringValue": service}}]
                },
                "scopeSpans": [{"spans": spans}],
            }
        ]
    }


def _span(span_id: str, parent: str, kind: str, service: str, code: int = 0) -> dict[str, Any]:
    return {
        "traceId": "t1",
        "spanId": span_id,
        "parentSpanId": parent,
        "name": f"{service}/Do",
        "kind": kind,
        "attributes": [
            {"key": "rpc.service", "value": {"stringValue": service}},
            {"key": "rpc.grpc.status_code", "value": {"intValue": str(code)}},
        ],
        "status": {"code": 2 if code else 0},
    }


def test_undeclared_call_found_in_traces(contracts: Writer, tmp_path: Path) -> None:
    """A trace of a calling c (not declared) is undeclared, with call and error counts."""
    root = contracts(
        a=dict(name="AService", context="alpha"),
        c=dict(name="CService", context="gamma"),
    )
    trace = tmp_path / "traces.json"
    spans = [
        _span("s1", "", "SPAN_KIND_SERVER", "a.v1.AService"),
        _span("c1", "s1", "SPAN_KIND_CLIENT", "c.v1.CService"),
        _span("c2", "s1", "SPAN_KIND_CLIENT", "c.v1.CService", code=14),
        _span("s2", "c1", "SPAN_KIND_SERVER", "c.v1.CService"),  # counted once, from c1
    ]
    trace.write_text(json.dumps(_otlp(spans)))
    model = load_system(root, traces=trace)
    observed = [(e.source, e.target, e.calls, e.errors) for e in model.edges if e.origin == "trace"]
    assert ("a.v1.AService", "c.v1.CService", 2, 1) in observed
    assert ("(untraced client)", "a.v1.AService", 1, 0) in observed
    report = analyze(model)
    assert ("undeclared", "a.v1.AService -> c.v1.CService") in kinds(report)
    assert (
        "the traces show" in next(f for f in report.findings if f.kind == "undeclared").explanation
    )


async def test_live_traces_of_real_grpc_calls_show_the_call_graph(tmp_path: Path) -> None:
    """Real traced calls inventory -> payment become an observed, undeclared edge."""
    telemetry = Telemetry.build(TelemetryConfig(service_name="system", traces_exporter="memory"))
    try:

        class Payment(payment_pb2_grpc.PaymentServiceServicer):
            async def GetPayment(self, request: Any, context: Any) -> Any:
                return payment_pb2.GetPaymentResponse()

        async with serve(Payment(), policies=telemetry.policies()) as pay:
            channel = connect(pay.target, policies=telemetry.policies())
            payments = payment_pb2_grpc.PaymentServiceStub(channel)

            class Inventory(inventory_pb2_grpc.InventoryServiceServicer):
                async def GetStock(self, request: Any, context: Any) -> Any:
                    await payments.GetPayment(payment_pb2.GetPaymentRequest())
                    return inventory_pb2.GetStockResponse()

            async with serve(Inventory(), policies=telemetry.policies()) as inv:
                stub = inv.stub(inventory_pb2_grpc.InventoryServiceStub)
                for _ in range(3):
                    await stub.GetStock(inventory_pb2.GetStockRequest(sku="x"))
            await channel.close()
        exporter = telemetry.span_exporter
        finished = list(exporter.get_finished_spans())  # type: ignore[union-attr]
    finally:
        telemetry.shutdown()
    direct = load_system(ROOT / "protos", traces=spans_from_sdk(finished))
    edges = {(e.source, e.target): e.calls for e in direct.edges if e.origin == "trace"}
    assert edges[("inventory.v1.InventoryService", "payment.v1.PaymentService")] == 3
    assert edges[("(untraced client)", "inventory.v1.InventoryService")] == 3  # the test stub
    report = analyze(direct)
    assert (
        "undeclared",
        "inventory.v1.InventoryService -> payment.v1.PaymentService",
    ) in kinds(report)
    # the same through an OTLP JSON file
    path = tmp_path / "spans.json"
    write_otlp_json(finished, path)
    assert len(read_otlp_json(path)) == len(finished)
    from_file = load_system(ROOT / "protos", traces=path)
    assert {(e.source, e.target, e.calls) for e in from_file.edges if e.origin == "trace"} == {
        (e.source, e.target, e.calls) for e in direct.edges if e.origin == "trace"
    }


def test_exact_coupling_metrics_and_unstable_dependency(contracts: Writer) -> None:
    """Known graph: Ca, Ce and instability exact; depending on a less stable service is found."""
    # a -> b, a -> c, b -> c, d -> c, c -> e, e -> f, e -> g
    root = contracts(
        a=dict(name="AService", context="ca", depends_on=["b.v1.BService", "c.v1.CService"]),
        b=dict(name="BService", context="cb", depends_on=["c.v1.CService"]),
        c=dict(name="CService", context="cc", depends_on=["e.v1.EService"]),
        d=dict(name="DService", context="cd", depends_on=["c.v1.CService"]),
        e=dict(name="EService", context="ce", depends_on=["f.v1.FService", "g.v1.GService"]),
        f=dict(name="FService", context="cf"),
        g=dict(name="GService", context="cg"),
    )
    report = analyze(load_system(root), max_chain=5)
    table = {
        c.service.split(".")[0]: (c.afferent, c.efferent, c.instability) for c in report.coupling
    }
    assert table == {
        "a": (0, 2, 1.0),
        "b": (1, 1, 0.5),
        "c": (3, 1, 0.25),
        "d": (0, 1, 1.0),
        "e": (1, 2, 2 / 3),
        "f": (1, 0, 0.0),
        "g": (1, 0, 0.0),
    }
    unstable = [f.subject for f in report.findings if f.kind == "unstable-dependency"]
    assert unstable == ["c.v1.CService -> e.v1.EService"]  # 0.25 depends on 0.67


def test_deep_synchronous_chain(contracts: Writer) -> None:
    """a -> b -> c -> d across four contexts exceeds --max-chain 2; 3 allows it."""
    root = contracts(
        a=dict(name="AService", context="ca", depends_on=["b.v1.BService"]),
        b=dict(name="BService", context="cb", depends_on=["c.v1.CService"]),
        c=dict(name="CService", context="cc", depends_on=["d.v1.DService"]),
        d=dict(name="DService", context="cd"),
    )
    model = load_system(root)
    deep = [f for f in analyze(model, max_chain=2).findings if f.kind == "deep-chain"]
    assert [f.subject for f in deep] == [
        "a.v1.AService -> b.v1.BService -> c.v1.CService -> d.v1.DService"
    ]
    assert "3 context boundaries" in deep[0].explanation
    assert not [f for f in analyze(model, max_chain=3).findings if f.kind == "deep-chain"]


def test_outputs_text_json_dot_mermaid(contracts: Writer) -> None:
    """Every output names the services; JSON parses; errors are drawn red in DOT and Mermaid."""
    root = contracts(
        a=dict(name="AService", context="alpha", depends_on=["b.v1.BService"]),
        b=dict(name="BService", context="beta", depends_on=["a.v1.AService"]),
    )
    report = analyze(load_system(root))
    text = to_text(report)
    assert "[error] cycle" in text and "a.v1.AService" in text
    data = json.loads(to_json(report))
    assert next(f["kind"] for f in data["findings"]) == "cycle"
    assert {c["service"] for c in data["coupling"]} == {"a.v1.AService", "b.v1.BService"}
    dot = to_dot(report)
    assert 'label="alpha"' in dot and "#c62828" in dot
    mermaid = to_mermaid(report)
    assert mermaid.startswith("flowchart LR") and "linkStyle 0 stroke:#c62828" in mermaid


def test_svg_picture_through_graphviz(contracts: Writer, tmp_path: Path) -> None:
    """--graph x.svg renders through Graphviz's dot (installed by .ci/run)."""
    if shutil.which("dot") is None:
        pytest.skip("Graphviz 'dot' is not installed (Debian package graphviz)")
    root = contracts(a=dict(name="AService", context="alpha"))
    out = tmp_path / "system.svg"
    assert analyze_main([str(root), "--graph", str(out), "--format", "json"]) == 0
    assert out.read_text().lstrip().startswith(("<?xml", "<svg"))
    assert "AService" in out.read_text()


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "framework", "analyze", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def test_bad_input_is_one_clear_line_and_exit_2(contracts: Writer, tmp_path: Path) -> None:
    """Missing dir, a proto that does not compile, a trace not JSON: exit 2, no traceback."""
    missing = _run(str(tmp_path / "nowhere"))
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr and "Traceback" not in missing.stderr

    root = contracts(a=dict(name="AService", context="alpha"))
    (root / "a/v1/broken.proto").write_text('syntax = "proto3";\nmessage {')
    broken = _run(str(root))
    assert broken.returncode == 2
    assert "do not compile" in broken.stderr and "Traceback" not in broken.stderr

    (root / "a/v1/broken.proto").unlink()
    trace = tmp_path / "t.json"
    trace.write_text("this is not json\n")
    bad_trace = _run(str(root), "--traces", str(trace))
    assert bad_trace.returncode == 2
    assert "not JSON" in bad_trace.stderr and "Traceback" not in bad_trace.stderr

    assert _run(str(root), "--fail-on", "nonsense").returncode == 2
    assert _run(str(root), "--code", str(tmp_path / "nocode")).returncode == 2
