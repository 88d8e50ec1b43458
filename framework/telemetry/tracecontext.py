"""Trace context on the hot path: span contexts, the current context, the caller's span.

- `span_context()`: a `SpanContext` for ids known to be valid, built as the 6-tuple
  the API defines without re-validating (the layout is checked against the real
  constructor once, at import; otherwise the constructor is used);
- `current_context()`, `attach()`, `detach()`: OpenTelemetry's context API, going
  straight to the `ContextVar` behind its default runtime context when that is the
  one configured (two calls fewer each);
- `context_with(span)`: the current context with `span` as the current span;
- `RemoteSpan`: the caller's context from a checked `traceparent`, parsed only when
  something asks for it (the span of a call the caller did not sample).
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar, Token

from opentelemetry import context as context_api
from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.trace import SpanContext, TraceFlags, TraceState
from opentelemetry.trace.span import DEFAULT_TRACE_STATE

FLAGS = tuple(TraceFlags(i) for i in range(256))  # one instance per value, shared
_SAMPLED = FLAGS[TraceFlags.SAMPLED]


def _fast_contexts() -> bool:
    """True when SpanContext is the 6-tuple (trace_id, span_id, is_remote, flags, state,
    is_valid) this module builds directly (checked against the real constructor)."""
    state = TraceState([("k", "v")])
    try:
        fast = tuple.__new__(SpanContext, (3, 4, True, _SAMPLED, state, True))
    except TypeError:
        return False
    slow = SpanContext(3, 4, True, _SAMPLED, state)
    return bool(
        fast == slow
        and (fast.trace_id, fast.span_id, fast.is_remote, fast.is_valid) == (3, 4, True, True)
        and fast.trace_flags is _SAMPLED
        and fast.trace_state is state
    )


_FAST_CONTEXTS = _fast_contexts()


def span_context(
    trace_id: int, span_id: int, remote: bool, flags: TraceFlags, state: TraceState | None
) -> SpanContext:
    """A valid SpanContext for ids known to be in range and non-zero (no re-validation)."""
    if _FAST_CONTEXTS:
        return tuple.__new__(
            SpanContext, (trace_id, span_id, remote, flags, state or DEFAULT_TRACE_STATE, True)
        )
    return SpanContext(trace_id, span_id, remote, flags, state)


# The key the current span has in a Context (learnt from the API, not imported privately).
SPAN_KEY = next(iter(trace_api.set_span_in_context(trace_api.INVALID_SPAN, Context())))


def _runtime_var() -> ContextVar[Context] | None:
    """The ContextVar behind OpenTelemetry's default runtime context, when that is the one
    in use: attaching through it directly is what `context.attach` does, minus two calls."""
    runtime = getattr(context_api, "_RUNTIME_CONTEXT", None)
    var = getattr(runtime, "_current_context", None)
    if type(runtime) is ContextVarsRuntimeContext and isinstance(var, ContextVar):
        return var
    return None


_CURRENT = _runtime_var()
current_context: Callable[[], Context] = _CURRENT.get if _CURRENT else context_api.get_current
attach: Callable[[Context], Token[Context]] = _CURRENT.set if _CURRENT else context_api.attach


def detach(token: Token[Context]) -> None:
    """Restore the context `attach` replaced.  A token from another context (an async
    generator finalized elsewhere) has nothing left to restore there."""
    if _CURRENT is None:
        context_api.detach(token)
        return
    try:
        _CURRENT.reset(token)
    except ValueError:
        pass  # created in another Context: that context is gone, nothing to restore


def context_with(span: trace_api.Span, parent: Context | None = None) -> Context:
    """`set_span_in_context(span, parent)`, without copying an empty current context."""
    base = parent if parent is not None else current_context()
    if not base:
        return Context({SPAN_KEY: span})
    values = dict(base)
    values[SPAN_KEY] = span
    return Context(values)


class RemoteSpan(trace_api.NonRecordingSpan):
    """The caller's span context from a `traceparent` already checked to be well formed,
    parsed when first asked for: a call the caller did not sample never pays for it."""

    _parsed: SpanContext | None = None

    def __init__(self, traceparent: str, tracestate: str | None) -> None:
        self._traceparent = traceparent
        self._tracestate = tracestate

    def get_span_context(self) -> SpanContext:
        parsed = self._parsed
        if parsed is None:
            value = self._traceparent
            state = TraceState.from_header([self._tracestate]) if self._tracestate else None
            parsed = self._parsed = span_context(
                int(value[3:35], 16), int(value[36:52], 16), True, FLAGS[int(value[53:55], 16)],
                state,
            )  # fmt: skip
        return parsed

    def __repr__(self) -> str:
        return f"RemoteSpan({self.get_span_context()!r})"
