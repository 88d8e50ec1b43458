"""What the gateway decides before any hop: tokens, scopes, rate limits, CORS; the trace."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from framework.policies.breaker import CircuitBreakerPolicy
from framework.policies.validation import ValidationPolicy
from framework.telemetry.tracing import TracingPolicy
from tests.gateway.conftest import Harness, bearer, harness, mint


def _reason(body: dict[str, Any]) -> str:
    return str(next(d for d in body["details"] if "ErrorInfo" in d["@type"])["reason"])


async def test_missing_token_is_401_before_any_hop(gw: Harness) -> None:
    """A method that needs a token, called without one: 401, WWW-Authenticate, no backend call."""
    reply = await gw.client.post("/v1/echo", json={"text": "x"})
    assert reply.status_code == 401
    assert reply.headers["www-authenticate"] == "Bearer"
    assert _reason(reply.json()) == "TOKEN_MISSING"
    assert gw.echo.calls.get("Echo", 0) == 0


async def test_forged_token_is_401(gw: Harness) -> None:
    """A token signed with another key is refused at the gateway (TOKEN_BAD_SIGNATURE)."""
    forged = mint(["echo:read"], secret="another-secret-that-is-long-enough-0123")
    reply = await gw.client.post("/v1/echo", json={}, headers={"authorization": f"Bearer {forged}"})
    assert reply.status_code == 401
    assert _reason(reply.json()) == "TOKEN_BAD_SIGNATURE"
    assert gw.echo.calls.get("Echo", 0) == 0


async def test_missing_scope_is_403(gw: Harness) -> None:
    """A valid token without the contract's scope: 403 SCOPE_MISSING, no backend call."""
    reply = await gw.client.post("/v1/echo", json={}, headers=bearer("other:scope"))
    assert reply.status_code == 403
    assert _reason(reply.json()) == "SCOPE_MISSING"
    assert gw.echo.calls.get("Echo", 0) == 0


async def test_token_and_metadata_are_forwarded(gw: Harness) -> None:
    """Authorization, Idempotency-Key and Grpc-Metadata-* reach the backend as metadata."""
    headers = {
        **bearer("library:write"),
        "idempotency-key": "k-1",
        "grpc-metadata-x-tenant": "acme",
        "x-not-forwarded": "1",
    }
    reply = await gw.client.post(
        "/v1/shelves/s1/books", params={"bookId": "m1"}, json={}, headers=headers
    )
    assert reply.status_code == 200, reply.text
    seen = gw.library.metadata["CreateBook"]
    assert seen["authorization"] == headers["authorization"]
    assert (seen["idempotency-key"], seen["x-tenant"]) == ("k-1", "acme")
    assert "x-not-forwarded" not in seen


async def test_public_method_needs_no_token(gw: Harness) -> None:
    """auth_required: false in the contract: served without a token."""
    reply = await gw.client.get("/v1/shelves/s1/books")
    assert reply.status_code == 200


async def test_rate_limit_per_verified_caller() -> None:
    """Over the per-caller limit: 429 with Retry-After; another caller has its own bucket."""
    async with harness(rate_per_s=0.5, burst=2) as gw:
        alice, bob = bearer("echo:read", subject="alice"), bearer("echo:read", subject="bob")
        codes = [
            (await gw.client.post("/v1/echo", json={}, headers=alice)).status_code for _ in range(3)
        ]
        limited = await gw.client.post("/v1/echo", json={}, headers=alice)
        other = await gw.client.post("/v1/echo", json={}, headers=bob)
        assert codes == [200, 200, 429]
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1
        assert _reason(limited.json()) == "RATE_LIMITED"
        assert other.status_code == 200
        assert gw.echo.calls["Echo"] == 3


async def test_rate_limit_by_client_address_trusts_only_configured_proxies() -> None:
    """Anonymous callers are limited by address; X-Forwarded-For counts from trusted proxies."""
    async with harness(rate_per_s=0.5, burst=1, trusted_proxies=("127.0.0.1",)) as gw:
        path = "/v1/shelves/s1/books"
        a1 = await gw.client.get(path, headers={"x-forwarded-for": "203.0.113.7"})
        a2 = await gw.client.get(path, headers={"x-forwarded-for": "203.0.113.7"})
        b1 = await gw.client.get(path, headers={"x-forwarded-for": "203.0.113.8"})
        assert (a1.status_code, a2.status_code, b1.status_code) == (200, 429, 200)
    async with harness(rate_per_s=0.5, burst=1) as gw:  # no trusted proxy: the peer counts
        path = "/v1/shelves/s1/books"
        a1 = await gw.client.get(path, headers={"x-forwarded-for": "203.0.113.7"})
        b1 = await gw.client.get(path, headers={"x-forwarded-for": "203.0.113.8"})
        assert (a1.status_code, b1.status_code) == (200, 429)


async def test_cors_preflight_and_exposed_headers() -> None:
    """An allowed origin gets the CORS answers (gRPC-Web headers exposed); others do not."""
    async with harness(cors_origins=("https://app.example",)) as gw:
        preflight = await gw.client.options(
            "/v1/echo",
            headers={
                "origin": "https://app.example",
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        simple = await gw.client.get(
            "/v1/shelves/s1/books", headers={"origin": "https://app.example"}
        )
        assert "grpc-status" in simple.headers["access-control-expose-headers"]
        denied = await gw.client.options(
            "/v1/echo",
            headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
        )
        assert denied.status_code == 400
        assert "access-control-allow-origin" not in denied.headers


def _tracing() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


async def test_trace_is_continued_from_traceparent_or_started() -> None:
    """The backend's span joins the caller's trace; without traceparent the gateway starts one."""
    gateway_tp, gateway_spans = _tracing()
    backend_tp, backend_spans = _tracing()
    async with harness(
        backend_policies=[TracingPolicy(backend_tp), ValidationPolicy()],
        ingress_policies=[TracingPolicy(gateway_tp)],
        client_policies=[TracingPolicy(gateway_tp), CircuitBreakerPolicy()],
        auth="off",
    ) as gw:
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        parent = f"00-{trace_id}-00f067aa0ba902b7-01"
        joined = await gw.client.get("/v1/shelves/s1/books", headers={"traceparent": parent})
        assert joined.status_code == 200
        started = await gw.client.get("/v1/shelves/s2/books")
        assert started.status_code == 200
    backend = [s for s in backend_spans.get_finished_spans() if s.kind is SpanKind.SERVER]
    gateway = gateway_spans.get_finished_spans()
    assert f"{backend[0].context.trace_id:032x}" == trace_id
    root = next(s for s in gateway if s.kind is SpanKind.SERVER and s.parent is None)
    assert backend[1].context.trace_id == root.context.trace_id
    client = next(
        s
        for s in gateway
        if s.kind is SpanKind.CLIENT and s.context.trace_id == root.context.trace_id
    )
    assert backend[1].parent is not None and backend[1].parent.span_id == client.context.span_id
