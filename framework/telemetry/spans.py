"""A lean span path onto the OpenTelemetry SDK pipeline, for the per-RPC spans.

`SpanFactory.start()` makes the spans the tracing policy needs.  On an SDK
`TracerProvider` it builds `LeanSpan`s: a real, recording `opentelemetry.trace.Span`
(handlers can `set_attribute`, `add_event`, `record_exception` on the current span)
that is also the SDK `ReadableSpan` handed to the provider's span processors, so
every exporter (OTLP, console, in-memory) receives it unchanged.

What it skips, and why that is safe here:
- per-attribute validation and `BoundedAttributes` copies: the RPC attributes are
  strings and ints built by the framework; attributes set by user code are checked
  with the SDK's own cleaner (`set_attribute`), only when called;
- the second `ReadableSpan` copy `_Span.end()` makes for the processors;
- the sampler call when the sampler is the default `parentbased_always_on` or
  `always_on` (decided from its public description once): the decision is then
  "follow the parent's sampled flag, sample roots", computed inline.
- for `parentbased_traceidratio`, the root decision is the ratio test on the trace
  id (what `TraceIdRatioBased` does), inline;
- the multi-processor loop and `on_start` when the provider's only processor is a
  `framework.telemetry.batcher.SpanBatcher`: an ended span goes straight to its queue;
- `SpanContext.__new__`'s validation for ids the factory made or checked itself (a
  tuple of the same layout, verified once at import).
Other samplers are called as the SDK calls them.  Any other provider (the API's
no-op one, a vendor SDK) gets the ordinary `tracer.start_span()` path.

A server call whose caller did not sample the trace gets no span from here: the
tracing policy makes a `framework.telemetry.tracecontext.RemoteSpan` current instead.
"""

from __future__ import annotations

import random
import re
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

from opentelemetry import trace as trace_api
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.context import Context
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import (
    Link,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.util import types

from framework.telemetry.batcher import direct_batcher
from framework.telemetry.tracecontext import FLAGS, span_context

SCOPE_NAME = "framework"
_UNSET = Status(StatusCode.UNSET)
_SAMPLED = FLAGS[TraceFlags.SAMPLED]
_NOT_SAMPLED = FLAGS[TraceFlags.DEFAULT]
_RANDOM = int(getattr(TraceFlags, "RANDOM_TRACE_ID", 0))
_TRACE_ID_LIMIT = (1 << 64) - 1
# ParentBased samplers whose decision for a parent is "follow its sampled flag"
_FOLLOWS_PARENT = re.compile(
    r"ParentBased\{root:(?P<root>.*),remoteParentSampled:AlwaysOnSampler,"
    r"remoteParentNotSampled:AlwaysOffSampler,localParentSampled:AlwaysOnSampler,"
    r"localParentNotSampled:AlwaysOffSampler\}"
)
_RATIO = re.compile(r"TraceIdRatioBased\{(?P<rate>[0-9.eE+-]+)\}")


class LeanSpan(trace_api.Span, ReadableSpan):
    """A recording span that is its own `ReadableSpan`; ended once, exported once.

    What is the same for every span of a factory (resource, scope, where ended spans
    go) and the initial state lives on a per-factory subclass, so starting a span
    sets only what differs per span."""

    _factory: SpanFactory
    _events: Sequence[Event] = ()
    _links: Sequence[Link] = ()
    _status = _UNSET
    _end_time: int | None = None
    _instrumentation_info = None

    def __init__(
        self,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, Any],
        start_ns: int,
        shared: bool = False,
    ) -> None:
        # ReadableSpan.__init__ is skipped on purpose: it would build a Resource per span.
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        self._attributes = attributes
        self._attrs = attributes  # the same dict, typed for updates
        self._shared = shared  # copy before the first change (copy-on-write)
        self._start_time = start_ns

    # ----- opentelemetry.trace.Span
    def get_span_context(self) -> SpanContext:
        return self._context  # type: ignore[return-value]  # set in __init__, never None

    def is_recording(self) -> bool:
        return self._end_time is None

    def _own(self) -> dict[str, Any]:
        if self._shared:
            self._attrs = self._attributes = dict(self._attrs)
            self._shared = False
        return self._attrs

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        if self._end_time is None:
            cleaned = BoundedAttributes(attributes={key: value}, immutable=False)
            self._own().update(cleaned)

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        if self._end_time is None:
            self._own().update(BoundedAttributes(attributes=attributes, immutable=False))

    def add_event(
        self,
        name: str,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
    ) -> None:
        if self._end_time is not None:
            return
        event = Event(name, attributes, timestamp or time.time_ns())
        if isinstance(self._events, list):
            self._events.append(event)
        else:
            self._events = [event]

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        if self._end_time is None and context.is_valid:
            self._links = [*self._links, Link(context, attributes)]

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._end_time is not None or self._status.status_code is StatusCode.OK:
            return  # OK is final, as in the SDK
        if isinstance(status, StatusCode):
            status = Status(status, description)
        self._status = status

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        stacktrace = "".join(
            traceback.format_exception(type(exception), exception, exception.__traceback__)
        )
        fields: dict[str, Any] = {
            "exception.type": type(exception).__qualname__,
            "exception.message": str(exception),
            "exception.stacktrace": stacktrace,
            "exception.escaped": str(escaped),
        }
        if attributes:
            fields.update(attributes)
        self.add_event("exception", fields, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            return
        self._end_time = end_time or time.time_ns()
        self._factory.ended(self)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        if exc_val is not None and self.is_recording():
            self.record_exception(exc_val, escaped=True)
            self.set_status(Status(StatusCode.ERROR, f"{type(exc_val).__name__}: {exc_val}"))
        self.end()


class SpanFactory:
    """Starts spans for one tracer provider: lean on the SDK, ordinary elsewhere."""

    def __init__(self, tracer_provider: trace_api.TracerProvider, version: str = "") -> None:
        self.tracer = tracer_provider.get_tracer(SCOPE_NAME, version or None)
        self.lean = isinstance(self.tracer, sdk_trace.Tracer)
        self.default_sampling = False
        self.follows_parent = False  # the decision for a parent is its sampled flag
        self.root_bound: int | None = None  # inline ratio test for roots, when known
        if isinstance(self.tracer, sdk_trace.Tracer):
            tracer = self.tracer
            self.resource = tracer.resource
            self.scope = tracer._instrumentation_scope
            self.processor = tracer.span_processor
            self.ids = tracer.id_generator
            self.sampler = tracer.sampler
            self.random_ids = self.ids.is_trace_id_random()
            self.fast_ids = type(self.ids) is RandomIdGenerator
            self._read_sampler(self.sampler.get_description())
            self.span_class: type[LeanSpan] = type(
                "LeanSpan",
                (LeanSpan,),
                {
                    "_factory": self,
                    "_resource": self.resource,
                    "_instrumentation_scope": self.scope,
                    "__module__": __name__,
                },
            )
            self._direct_key: object = None
            self._direct: Callable[[ReadableSpan], None] | None = None

    def _read_sampler(self, description: str) -> None:
        """Decide once, from the sampler's public description, what can be inlined."""
        if description == "AlwaysOnSampler":
            self.default_sampling = True
            return
        match = _FOLLOWS_PARENT.fullmatch(description)
        if match is None:
            return
        self.follows_parent = True
        root = match.group("root")
        if root == "AlwaysOnSampler":
            self.default_sampling = True
        elif root == "AlwaysOffSampler":
            self.root_bound = 0
        else:
            ratio = _RATIO.fullmatch(root)
            if ratio is not None:  # TraceIdRatioBased.get_bound_for_rate
                self.root_bound = round(float(ratio.group("rate")) * (_TRACE_ID_LIMIT + 1))

    # ----- ids
    def trace_id(self) -> int:
        if self.fast_ids:
            trace_id = random.getrandbits(128)
            if trace_id:
                return trace_id
        return self.ids.generate_trace_id()

    def span_id(self) -> int:
        if self.fast_ids:
            span_id = random.getrandbits(64)
            if span_id:
                return span_id
        return self.ids.generate_span_id()

    # ----- ending
    def ended(self, span: LeanSpan) -> None:
        """Hand an ended span to the processors (straight to a lone `SpanBatcher`'s queue)."""
        processor = self.processor
        key = getattr(processor, "_span_processors", processor)
        if key is not self._direct_key:  # processors were added: look again
            self._direct = direct_batcher(processor)
            self._direct_key = key
        direct = self._direct
        if direct is not None:
            direct(span)
        else:
            processor.on_end(span)

    # ----- starting
    def start_child(
        self,
        name: str,
        kind: SpanKind,
        parent: SpanContext,
        attributes: dict[str, Any],
        shared: bool = False,
    ) -> trace_api.Span:
        """A span under a valid `parent`, when `follows_parent` (the sampler's decision is
        the parent's sampled flag): no sampler call, no Context, nothing copied."""
        flags = parent.trace_flags
        span_id = random.getrandbits(64) if self.fast_ids else 0
        context = span_context(
            parent.trace_id,
            span_id or self.ids.generate_span_id(),
            False,
            FLAGS[flags & (1 | _RANDOM)],
            parent.trace_state,
        )
        if not flags & 1:
            return trace_api.NonRecordingSpan(context)
        span = self.span_class(name, context, parent, kind, attributes, time.time_ns(), shared)
        if self._direct is None or self._direct_key is not getattr(
            self.processor, "_span_processors", self.processor
        ):
            self.processor.on_start(span, None)  # type: ignore[arg-type]
        return span

    def start(
        self,
        name: str,
        kind: SpanKind,
        parent_context: Context | None,
        attributes: dict[str, Any],
        links: Sequence[Link] = (),
        *,
        shared: bool = False,
        remote_parent: SpanContext | None = None,
    ) -> trace_api.Span:
        """A started span; `attributes` is owned by the span from now on, or, with
        `shared=True`, copied by the span before its first change (pass a dict that
        is never mutated, e.g. one computed per method).  `remote_parent`, when given,
        is the parent instead of the span in `parent_context` (saves building a
        Context just to carry it)."""
        inline = self.default_sampling or (self.follows_parent and self.root_bound is not None)
        if remote_parent is not None and (not self.lean or not inline):
            parent_context = trace_api.set_span_in_context(
                trace_api.NonRecordingSpan(remote_parent), parent_context
            )
            remote_parent = None
        if not self.lean:
            return self.tracer.start_span(  # the SDK copies the attributes itself
                name, parent_context, kind=kind, attributes=attributes, links=links
            )
        parent: SpanContext | None = (
            remote_parent or trace_api.get_current_span(parent_context).get_span_context()
        )
        if self.follows_parent and parent is not None and parent.is_valid and not links:
            return self.start_child(name, kind, parent, attributes, shared)
        trace_state: TraceState | None
        if parent is not None and parent.is_valid:
            trace_id = parent.trace_id
            flag_random = parent.trace_flags & _RANDOM
        else:
            parent = None
            trace_id = self.trace_id()
            flag_random = _RANDOM if self.random_ids else 0
        if inline and not links:
            if parent is None:
                bound = self.root_bound
                sampled = bound is None or (trace_id & _TRACE_ID_LIMIT) < bound
                trace_state = None
            else:
                sampled, trace_state = parent.trace_flags.sampled, parent.trace_state
        else:
            result = self.sampler.should_sample(
                parent_context, trace_id, name, kind, attributes, links
            )
            sampled, trace_state = result.decision.is_sampled(), result.trace_state  # type: ignore[no-untyped-call]
            if result.attributes:
                attributes, shared = dict(result.attributes), False
        flags = FLAGS[(1 if sampled else 0) | flag_random]
        span_context_ = span_context(trace_id, self.span_id(), False, flags, trace_state)
        if not sampled:
            return trace_api.NonRecordingSpan(span_context_)
        span = self.span_class(
            name, span_context_, parent, kind, attributes, time.time_ns(), shared
        )
        if links:
            span._links = list(links)
        if self._direct is None or self._direct_key is not getattr(
            self.processor, "_span_processors", self.processor
        ):
            self.processor.on_start(span, parent_context)  # type: ignore[arg-type]
        return span
