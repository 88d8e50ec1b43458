"""Distributed tracing: one span per RPC per side, W3C trace context in gRPC metadata.

`TracingPolicy` goes first in both chains (outermost, so its span covers every
other policy's decision).  On the server it continues the caller's trace from
the `traceparent` / `tracestate` / `baggage` metadata (through the configured
OpenTelemetry propagator) and makes its SERVER span the current span while the
handler runs, so the handler's own outbound calls become its children.  On the
client it starts a CLIENT span under the current span and injects its context
into the outgoing metadata.

Attributes follow the RPC semantic conventions: `rpc.system`, `rpc.service`,
`rpc.method`, `rpc.grpc.status_code`, `server.address` / `server.port`, and
`error.type` (the typed error's reason) on failures, whose span status is ERROR
with "REASON: message".  Other policies reject by raising typed errors, and the
tracing policy sees them in its exit: a breaker that is open, a rate limit, a
full bulkhead or an injected fault become span events ("breaker open", ...).

Everything that does not change per call is computed once per method in
`bind()`: span name, attribute dict, target address.  `TracingPolicy(None)`
binds to nothing, so disabled tracing costs nothing per call.

Events carry the same context: `inject_trace_context(metadata)` when an event is
recorded, `continue_trace(metadata, name)` in the handler (see its docstring
for child-vs-link).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any

import grpc
from opentelemetry import baggage, propagate
from opentelemetry import trace as trace_api
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import Getter, Setter, TextMapPropagator
from opentelemetry.trace import (
    Link,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceState,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from framework.policy import Call, Exit, Method, Side
from framework.telemetry.rpcstats import outcome_code
from framework.telemetry.spans import SpanFactory
from framework.telemetry.tracecontext import (
    FLAGS,
    RemoteSpan,
    attach,
    context_with,
    current_context,
    detach,
    span_context,
)

# Typed-error reasons that stand for a decision of another policy.
DECISION_EVENTS: Mapping[str, str] = {
    "CIRCUIT_OPEN": "breaker open",
    "RATE_LIMITED": "rate limited",
    "BULKHEAD_FULL": "bulkhead full",
    "FAULT_INJECTED": "fault injected",
    "DEADLINE_EXCEEDED": "deadline exceeded",
}
_RETRY_HEADER = "grpc-previous-rpc-attempts"
_CODE = "rpc.grpc.status_code"


class _CallGetter(Getter[Call]):
    def get(self, carrier: Call, key: str) -> list[str] | None:
        value = carrier.header(key)
        if value is None:
            return None
        return [value if isinstance(value, str) else value.decode("latin-1")]

    def keys(self, carrier: Call) -> list[str]:
        return [key for key, _ in carrier.metadata]


class _CallSetter(Setter[Call]):
    def set(self, carrier: Call, key: str, value: str) -> None:
        carrier.add_metadata(key, value)


_GETTER = _CallGetter()
_SETTER = _CallSetter()
_BAGGAGE = W3CBaggagePropagator()
_BAGGAGE_KEY = next(iter(baggage.set_baggage("k", "v", Context())))  # where baggage lives


def split_address(target: str) -> tuple[str, int | None]:
    """`"dns:///host:50051"` -> ("host", 50051); `"[::1]:80"` -> ("::1", 80)."""
    address = target.rpartition("///")[2] if "///" in target else target
    for scheme in ("ipv4:", "ipv6:", "dns:", "unix:"):
        if address.startswith(scheme):
            address = address[len(scheme) :]
            break
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or (host.count(":") and not host.startswith("[")):
        return address, None
    return host.strip("[]"), int(port)


def _ended(span: trace_api.Span, side: Side, error: BaseException | None) -> None:
    """Record the outcome on the span (before `end()`)."""
    if error is None:
        return
    code = outcome_code(error)
    reason = getattr(error, "reason", None) or code.name
    span.set_attribute(_CODE, code.value[0])
    span.set_attribute("error.type", reason)
    message = getattr(error, "message", None) or str(error) or type(error).__name__
    span.set_status(Status(StatusCode.ERROR, f"{reason}: {message}"))
    event = DECISION_EVENTS.get(reason)
    if event is not None:
        span.add_event(event, {"reason": reason, "side": side.value})
    # unexpected: the stack trace belongs on the span (the server's error mapping hands
    # exits the INTERNAL error the caller sees, caused by what was really raised)
    if hasattr(error, "reason"):
        cause = error.__cause__ if code is grpc.StatusCode.INTERNAL else None
    else:
        cause = error
    if cause is not None and not (
        hasattr(cause, "reason") or isinstance(cause, grpc.RpcError | asyncio.CancelledError)
    ):
        span.record_exception(cause)


_TRACEPARENT_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def _is_default_w3c(propagator: TextMapPropagator) -> bool:
    """True for OpenTelemetry's default propagator: W3C trace context, then W3C baggage."""
    inner = getattr(propagator, "_propagators", None)
    kinds = [type(p) for p in inner or ()]
    return isinstance(propagator, CompositePropagator) and kinds == [
        TraceContextTextMapPropagator,
        W3CBaggagePropagator,
    ]


_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16
_NOT_SAMPLED_DIGITS = frozenset("02468ace")


def _well_formed(value: str) -> bool:
    """A version-00 traceparent with non-zero ids, as the W3C propagator accepts it."""
    return (
        _TRACEPARENT_00.fullmatch(value) is not None
        and value[3:35] != _ZERO_TRACE
        and value[36:52] != _ZERO_SPAN
    )


def _parse_traceparent(value: str | bytes, tracestate: str | bytes | None) -> SpanContext | None:
    """The common case of the W3C propagator (version 00, valid ids, no baggage), inline.

    Returns None for anything else, and the caller then asks the propagator itself,
    so the result is always what `TraceContextTextMapPropagator.extract` gives.
    """
    if not isinstance(value, str) or not _well_formed(value):
        return None
    state = None
    if tracestate is not None:
        if not isinstance(tracestate, str):
            return None
        state = TraceState.from_header([tracestate])
    return span_context(
        int(value[3:35], 16), int(value[36:52], 16), True, FLAGS[int(value[53:55], 16)], state
    )


class TracingPolicy:
    """Spans for every RPC on either side; pass the tracer provider, or None to disable.

    `server_address` ("host:port") names this server on SERVER spans; the server
    calls `on_started(server)` when it is a hook, which fills it in after port 0.
    """

    def __init__(
        self,
        tracer_provider: trace_api.TracerProvider | None,
        *,
        propagator: TextMapPropagator | None = None,
        server_address: str = "",
    ) -> None:
        if tracer_provider is not None and not isinstance(
            tracer_provider, trace_api.TracerProvider
        ):
            raise TypeError(
                "TracingPolicy(tracer_provider) must be a TracerProvider "
                "(telemetry.tracer_provider, or use telemetry.policies()), "
                f"got {type(tracer_provider).__name__}"
            )
        self._factory = SpanFactory(tracer_provider) if tracer_provider is not None else None
        self._propagator = propagator or propagate.get_global_textmap()
        self._fields = tuple(sorted(self._propagator.fields))
        self._w3c = _is_default_w3c(self._propagator)
        self._server_attrs: dict[str, Any] = {}
        self._targets: dict[str, dict[str, Any]] = {}
        if server_address:
            self._set_server(server_address)

    def _set_server(self, address: str) -> None:
        host, port = split_address(address)
        self._server_attrs = {"server.address": host}
        if port is not None:
            self._server_attrs["server.port"] = port

    async def on_started(self, server: Any) -> None:
        """Server hook: learn the bound address (port 0 is resolved only at start)."""
        address = getattr(server, "address", "")
        if address:
            self._set_server(str(address))

    def bind(self, method: Method) -> _Enter | None:
        if self._factory is None:
            return None
        return _Enter(self, method)

    # ----- per side, per call
    def _target_attrs(self, target: str) -> dict[str, Any]:
        attrs = self._targets.get(target)
        if attrs is None:
            host, port = split_address(target)
            attrs = {"server.address": host}
            if port is not None:
                attrs["server.port"] = port
            if len(self._targets) < 1024:  # bounded: targets are few and long-lived
                self._targets[target] = attrs
        return attrs

    def _extract(self, call: Call) -> tuple[Context | None, SpanContext | None]:
        """The propagated context, or (fast path) just the caller's span context."""
        if self._w3c:
            traceparent = call.header("traceparent")
            if traceparent is None:
                if call.header("baggage") is None:
                    return None, None
            elif call.header("baggage") is None:
                parent = _parse_traceparent(traceparent, call.header("tracestate"))
                if parent is not None:
                    return None, parent
            return self._propagator.extract(call, getter=_GETTER), None
        for key in self._fields:
            if call.header(key) is not None:
                return self._propagator.extract(call, getter=_GETTER), None
        return None, None  # nothing propagated: a root span, no extraction work


class _Enter:
    """The bound enter for one method: names and attributes computed once."""

    __slots__ = ("base", "client_base", "factory", "name", "policy", "server_base")

    def __init__(self, policy: TracingPolicy, method: Method) -> None:
        assert policy._factory is not None
        self.policy = policy
        self.factory = policy._factory
        self.name = f"{method.service}/{method.name}"
        self.base = {
            "rpc.system": "grpc",
            "rpc.service": method.service,
            "rpc.method": method.name,
            _CODE: 0,
        }
        self.client_base: dict[str, dict[str, Any]] = {}
        self.server_base: tuple[dict[str, Any] | None, dict[str, Any]] = (None, self.base)

    def __call__(self, call: Call) -> Exit | None:
        if call.side is Side.SERVER:
            return self._server(call)
        return self._client(call)

    def _server(self, call: Call) -> Exit:
        policy = self.policy
        if policy._w3c and self.factory.follows_parent:
            # The common case inline: a well-formed version-00 traceparent, no baggage.
            headers = call.inbound()
            traceparent = headers.get("traceparent")
            if (
                type(traceparent) is str
                and len(traceparent) == 55
                and "baggage" not in headers
                and _TRACEPARENT_00.fullmatch(traceparent) is not None
                and traceparent[3:35] != _ZERO_TRACE
                and traceparent[36:52] != _ZERO_SPAN
            ):
                tracestate = headers.get("tracestate")
                if tracestate is None or type(tracestate) is str:
                    if traceparent[-1] in _NOT_SAMPLED_DIGITS:  # the caller did not sample
                        token = attach(context_with(RemoteSpan(traceparent, tracestate)))
                        return lambda error: detach(token)
                    parent = span_context(
                        int(traceparent[3:35], 16),
                        int(traceparent[36:52], 16),
                        True,
                        FLAGS[int(traceparent[53:55], 16)],
                        TraceState.from_header([tracestate]) if tracestate else None,
                    )
                    base = self.server_base  # inline _server_attrs(): the common case
                    attrs = base[1] if base[0] is policy._server_attrs else self._server_attrs()
                    span = self.factory.start_child(self.name, SpanKind.SERVER, parent, attrs, True)
                    if _RETRY_HEADER in headers:
                        return self._recording(span, call, None)
                    token = attach(context_with(span))

                    def exit_(error: BaseException | None) -> None:
                        detach(token)
                        if error is not None:
                            _ended(span, Side.SERVER, error)
                        span.end()

                    return exit_
        parent_context, remote = policy._extract(call)
        span = self.factory.start(
            self.name,
            SpanKind.SERVER,
            parent_context,
            self._server_attrs(),
            shared=True,
            remote_parent=remote,
        )
        if not span.is_recording():
            return self._unsampled(span, parent_context)
        return self._recording(span, call, parent_context)

    def _server_attrs(self) -> dict[str, Any]:
        """The SERVER span's attributes: shared by every call, never mutated (the span
        copies on write); rebuilt once when the server learns its address."""
        server_attrs = self.policy._server_attrs
        if self.server_base[0] is not server_attrs:
            self.server_base = (server_attrs, {**self.base, **server_attrs})
        return self.server_base[1]

    @staticmethod
    def _recording(span: trace_api.Span, call: Call, parent: Context | None) -> Exit:
        """Make a recording SERVER span current; its exit records the outcome and ends it."""
        previous = call.header(_RETRY_HEADER)
        if previous is not None:
            span.add_event("retry attempt", {"previous_attempts": str(previous)})
        token = attach(context_with(span, parent))

        def exit_(error: BaseException | None) -> None:
            detach(token)
            if error is not None:
                _ended(span, Side.SERVER, error)
            span.end()

        return exit_

    @staticmethod
    def _unsampled(span: trace_api.Span, parent: Context | None = None) -> Exit:
        """A call nobody records: only make its context current, for propagation and logs."""
        token = attach(context_with(span, parent))
        return lambda error: detach(token)

    def _client(self, call: Call) -> Exit | None:
        base = self.client_base.get(call.target)
        if base is None:
            base = {**self.base, **self.policy._target_attrs(call.target)}
            self.client_base[call.target] = base
        parent = current_context()
        span = self.factory.start(self.name, SpanKind.CLIENT, parent, base, shared=True)
        if self.policy._w3c:  # what the default propagator writes, inline
            context = span.get_span_context()
            if context.is_valid:
                call.add_metadata(
                    "traceparent",
                    f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}",
                )
                if context.trace_state:
                    call.add_metadata("tracestate", context.trace_state.to_header())
            if parent.get(_BAGGAGE_KEY):
                _BAGGAGE.inject(call, context=parent, setter=_SETTER)
        else:
            self.policy._propagator.inject(
                call, context=trace_api.set_span_in_context(span, parent), setter=_SETTER
            )
        if not span.is_recording():
            return None

        def exit_(error: BaseException | None) -> None:
            if error is not None:
                _ended(span, Side.CLIENT, error)
            span.end()

        return exit_


# ------------------------------------------------------------------ events


def inject_trace_context(
    metadata: MutableMapping[str, str], *, propagator: TextMapPropagator | None = None
) -> MutableMapping[str, str]:
    """Write the current trace context (traceparent, tracestate, baggage) into an
    event's envelope metadata; call it where the event is recorded. Returns `metadata`."""
    (propagator or propagate.get_global_textmap()).inject(metadata)
    return metadata


def trace_fields(*, propagator: TextMapPropagator | None = None) -> dict[str, Any]:
    """Keyword arguments for `framework.events.store.EventMetadata(...)`: the current
    `traceparent` and `tracestate`, and baggage (if any) under `extra["baggage"]`."""
    carrier = inject_trace_context({}, propagator=propagator)
    fields: dict[str, Any] = {
        "traceparent": carrier.get("traceparent", ""),
        "tracestate": carrier.get("tracestate", ""),
    }
    if carrier.get("baggage"):
        fields["extra"] = {"baggage": carrier["baggage"]}
    return fields


def _carrier(metadata: Any) -> Mapping[str, str]:
    """A plain mapping, an `EventMetadata` or an `events.v1.EventMetadata` proto."""
    if isinstance(metadata, Mapping):
        return metadata
    carrier = {
        "traceparent": getattr(metadata, "traceparent", ""),
        "tracestate": getattr(metadata, "tracestate", ""),
    }
    baggage = (getattr(metadata, "extra", None) or {}).get("baggage")
    if baggage:
        carrier["baggage"] = baggage
    return {k: v for k, v in carrier.items() if v}


@contextmanager
def continue_trace(
    metadata: Mapping[str, str] | Any,
    name: str,
    *,
    tracer_provider: trace_api.TracerProvider | None = None,
    link_only: bool = False,
    attributes: Mapping[str, Any] | None = None,
    propagator: TextMapPropagator | None = None,
) -> Iterator[trace_api.Span]:
    """A CONSUMER span for handling one event, made current for the block.

    `metadata` is what `inject_trace_context` / `trace_fields` wrote: a mapping,
    or an event's `EventMetadata` (dataclass or proto).

    By default the span is a *child* of the context the producer injected, and
    also *links* to it: an event handler, projection or saga step that reacts to
    the event right away is part of the same business request, so it belongs in
    the same trace (one trace shows the RPC and everything it caused), while the
    link keeps the producer span reachable if the handler is later re-parented.
    With `link_only=True` the span starts a new trace and only links to the
    producer: use it for replays and catch-up projections that run long after
    the request, where joining the old trace would stretch it over hours and
    attach thousands of spans to one request.
    Exceptions are recorded on the span (status ERROR) and re-raised.
    """
    provider = tracer_provider or trace_api.get_tracer_provider()
    tracer = provider.get_tracer("framework.events")
    extracted = (propagator or propagate.get_global_textmap()).extract(_carrier(metadata))
    producer = trace_api.get_current_span(extracted).get_span_context()
    links = [Link(producer)] if producer.is_valid else []
    parent = Context() if link_only else extracted
    with tracer.start_as_current_span(
        name,
        context=parent,
        kind=SpanKind.CONSUMER,
        links=links,
        attributes=dict(attributes or {}),
    ) as span:
        yield span


def current_trace_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) in hex of the current span, or None outside any span."""
    span_context = trace_api.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return f"{span_context.trace_id:032x}", f"{span_context.span_id:016x}"
