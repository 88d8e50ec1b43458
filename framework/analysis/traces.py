"""The observed call graph, from traces.

Input is OTLP JSON: the `ExportTraceServiceRequest` shape (`resourceSpans` ->
`scopeSpans` -> `spans`) that the OpenTelemetry Collector's file exporter writes, one
document or one per line; `write_otlp_json` writes the same from the SDK's finished
spans (e.g. the in-memory exporter), and `spans_from_sdk` reads those directly.

A client span of `rpc.service` T is a call to T; the caller is the service of the
nearest server span above it in the same trace, or the client's resource
`service.name` when it has none (a gateway, a CLI: an outside caller). A server span
whose parent is not a client span we have counts the same way, so a trace where only
servers were instrumented still yields the graph. Errors: span status ERROR, or a
non-zero `rpc.grpc.status_code`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from framework.analysis.model import Edge, SystemModel

__all__ = [
    "UNTRACED_CALLER",
    "TraceFormatError",
    "TraceSpan",
    "add_traces",
    "observed_calls",
    "read_otlp_json",
    "spans_from_sdk",
    "write_otlp_json",
]

_KINDS = {
    "SPAN_KIND_INTERNAL": 1,
    "SPAN_KIND_SERVER": 2,
    "SPAN_KIND_CLIENT": 3,
    "SPAN_KIND_PRODUCER": 4,
    "SPAN_KIND_CONSUMER": 5,
}
_SERVER, _CLIENT = 2, 3
# the caller of a server span whose client was not traced
UNTRACED_CALLER = "(untraced client)"
_STATUS_ERROR = 2


class TraceFormatError(ValueError):
    """The trace file is not OTLP JSON."""


@dataclass(frozen=True, slots=True)
class TraceSpan:
    """The few facts of a span the analysis needs."""

    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    rpc_service: str
    resource_service: str
    error: bool


def _value(raw: Mapping[str, Any]) -> Any:
    for key in ("stringValue", "intValue", "doubleValue", "boolValue"):
        if key in raw:
            return raw[key]
    return None


def _attributes(raw: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    return {a["key"]: _value(a.get("value", {})) for a in raw if "key" in a}


def _rpc_service(attrs: Mapping[str, Any], name: str) -> str:
    service = attrs.get("rpc.service")
    if isinstance(service, str) and service:
        return service
    # semantic-convention span name "pkg.Service/Method"
    head, sep, _ = name.lstrip("/").partition("/")
    return head if sep else ""


def _kind(raw: Any) -> int:
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str):
        return _KINDS.get(raw, int(raw) if raw.isdigit() else 0)
    return 0


def _is_error(status: Mapping[str, Any], attrs: Mapping[str, Any]) -> bool:
    code = status.get("code", 0)
    if code in (_STATUS_ERROR, "STATUS_CODE_ERROR"):
        return True
    grpc_code = attrs.get("rpc.grpc.status_code")
    try:
        return grpc_code is not None and int(grpc_code) != 0
    except (TypeError, ValueError):
        return False


def _spans_of(document: Mapping[str, Any]) -> Iterable[TraceSpan]:
    resources = document.get("resourceSpans")
    if not isinstance(resources, list):
        raise TraceFormatError("no 'resourceSpans' list: not an OTLP JSON trace export")
    for resource in resources:
        attrs = _attributes(resource.get("resource", {}).get("attributes", []))
        service_name = str(attrs.get("service.name", "unknown"))
        scopes = resource.get("scopeSpans", resource.get("instrumentationLibrarySpans", []))
        for scope in scopes:
            for span in scope.get("spans", []):
                span_attrs = _attributes(span.get("attributes", []))
                yield TraceSpan(
                    trace_id=str(span.get("traceId", "")),
                    span_id=str(span.get("spanId", "")),
                    parent_id=str(span.get("parentSpanId", "") or ""),
                    kind=_kind(span.get("kind", 0)),
                    rpc_service=_rpc_service(span_attrs, str(span.get("name", ""))),
                    resource_service=service_name,
                    error=_is_error(span.get("status", {}) or {}, span_attrs),
                )


def read_otlp_json(path: Path) -> list[TraceSpan]:
    """Spans of an OTLP JSON file: one document, or one document per line."""
    if not path.is_file():
        raise FileNotFoundError(f"trace file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        documents: list[Any] = [json.loads(text)]
    except json.JSONDecodeError:
        documents = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                documents.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise TraceFormatError(
                    f"{path}: line {number} is not JSON ({error.msg}); expected OTLP JSON"
                ) from None
    spans: list[TraceSpan] = []
    for document in documents:
        if not isinstance(document, dict):
            raise TraceFormatError(f"{path}: expected a JSON object with 'resourceSpans'")
        spans.extend(_spans_of(document))
    return spans


def _sdk_spans_document(spans: Sequence[Any]) -> dict[str, Any]:
    """OTLP JSON for finished SDK spans (`opentelemetry.sdk.trace.ReadableSpan`)."""
    by_resource: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        service = str(span.resource.attributes.get("service.name", "unknown"))
        context = span.context
        parent = span.parent
        attrs = [
            {"key": k, "value": {"intValue" if isinstance(v, int) else "stringValue": str(v)}}
            for k, v in (span.attributes or {}).items()
            if isinstance(v, str | int) and not isinstance(v, bool)
        ]
        by_resource.setdefault(service, []).append(
            {
                "traceId": f"{context.trace_id:032x}",
                "spanId": f"{context.span_id:016x}",
                "parentSpanId": f"{parent.span_id:016x}" if parent is not None else "",
                "name": span.name,
                "kind": span.kind.value + 1,  # SDK SpanKind starts at INTERNAL=0
                "attributes": attrs,
                "status": {"code": span.status.status_code.value},
            }
        )
    return {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"stringValue": name}}]
                },
                "scopeSpans": [{"spans": items}],
            }
            for name, items in sorted(by_resource.items())
        ]
    }


def write_otlp_json(spans: Sequence[Any], path: Path) -> None:
    """Write finished SDK spans as an OTLP JSON file `analyze --traces` reads."""
    path.write_text(json.dumps(_sdk_spans_document(spans), indent=1, sort_keys=True) + "\n")


def spans_from_sdk(spans: Sequence[Any]) -> list[TraceSpan]:
    """The analysis' view of finished SDK spans, without a file in between."""
    return list(_spans_of(_sdk_spans_document(spans)))


def observed_calls(spans: Sequence[TraceSpan]) -> dict[tuple[str, str], tuple[int, int]]:
    """(caller, callee) -> (calls, errors). Callers are rpc services or resource names."""
    by_id = {(s.trace_id, s.span_id): s for s in spans}

    def caller_of(span: TraceSpan, fallback: str) -> str:
        parent_id = span.parent_id
        hops = 0
        while parent_id and hops < 256:
            parent = by_id.get((span.trace_id, parent_id))
            if parent is None:
                break
            if parent.kind == _SERVER and parent.rpc_service:
                return parent.rpc_service
            parent_id, hops = parent.parent_id, hops + 1
        return fallback

    counts: dict[tuple[str, str], list[int]] = {}
    for span in spans:
        if not span.rpc_service:
            continue
        if span.kind == _CLIENT:
            caller = caller_of(span, span.resource_service)
        elif span.kind == _SERVER:
            parent = by_id.get((span.trace_id, span.parent_id)) if span.parent_id else None
            if parent is not None and parent.kind == _CLIENT:
                continue  # counted from the client span
            caller = caller_of(span, UNTRACED_CALLER)
        else:
            continue
        entry = counts.setdefault((caller, span.rpc_service), [0, 0])
        entry[0] += 1
        entry[1] += span.error
    return {pair: (calls, errors) for pair, (calls, errors) in sorted(counts.items())}


def add_traces(model: SystemModel, spans: Sequence[TraceSpan]) -> None:
    """Add the observed call edges (with call and error counts) to the model."""
    edges = []
    model.traced.update(s.rpc_service for s in spans if s.rpc_service in model.services)
    for (caller, callee), (calls, errors) in observed_calls(spans).items():
        if caller not in model.services:
            model.outside.add(caller)
        if callee not in model.services:
            model.outside.add(callee)
        edges.append(
            Edge(
                source=caller,
                target=callee,
                kind="call",
                origin="trace",
                calls=calls,
                errors=errors,
                detail=f"{calls} calls, {errors} errors",
            )
        )
    model.add(edges, "trace")
