"""`SpanBatcher`: a lean batching span processor (what `BatchSpanProcessor` does, cheaper).

Ending a span costs one `deque.append` and a length check: no per-span `getpid()`
(fork safety comes from `os.register_at_fork` instead), no per-span `on_start`
(it does nothing, and the framework's span factory skips it), no lock.  A daemon
thread exports batches of up to `max_export_batch` spans every `schedule_delay_s`,
or as soon as a batch is full; `force_flush()` exports everything queued, in the
calling thread; `shutdown()` flushes, stops the thread and shuts the exporter down.
A full queue (`max_queue` spans: the exporter cannot keep up) drops new spans and
says how many in one WARNING per export cycle.

Defaults and the `OTEL_BSP_*` variables read by `framework.telemetry.sdk` are the
SDK's: 5 s delay, 2048 queued, batches of 512, 30 s export timeout.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable

from opentelemetry import context as context_api
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter

logger = logging.getLogger(__name__)

# Export calls must not be traced themselves (an instrumented gRPC/HTTP client would
# make spans about exporting spans); the SDK's processors set the same key.
_SUPPRESS = getattr(context_api, "_SUPPRESS_INSTRUMENTATION_KEY", "suppress_instrumentation")


class SpanBatcher(SpanProcessor):
    """Queues ended, sampled spans and exports them in batches from a daemon thread."""

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        schedule_delay_s: float = 5.0,
        max_queue: int = 2048,
        max_export_batch: int = 512,
        export_timeout_s: float = 30.0,
    ) -> None:
        if schedule_delay_s <= 0:
            raise ValueError(f"schedule_delay_s must be > 0, got {schedule_delay_s}")
        if not 1 <= max_export_batch <= max_queue:
            raise ValueError(
                f"need 1 <= max_export_batch <= max_queue, got {max_export_batch}, {max_queue}"
            )
        self.exporter = exporter
        self.schedule_delay_s = schedule_delay_s
        self.max_queue = max_queue
        self.max_export_batch = max_export_batch
        self.export_timeout_s = export_timeout_s
        self.dropped = 0
        self._queue: deque[ReadableSpan] = deque()
        self._shutdown = False
        self._init_thread()
        ref = weakref.ref(self)

        def after_fork() -> None:  # the thread does not survive a fork: start a new one
            batcher = ref()
            if batcher is not None and not batcher._shutdown:
                batcher._queue.clear()
                batcher._init_thread()

        os.register_at_fork(after_in_child=after_fork)

    def _init_thread(self) -> None:
        self._wake = threading.Event()
        self._export_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="span-batcher", daemon=True)
        self._thread.start()

    # ----- SpanProcessor
    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        context = span.context
        if context is None or not context.trace_flags.sampled:
            return
        self.add(span)

    def add(self, span: ReadableSpan) -> None:
        """Queue an ended, sampled span (what `on_end` does after its checks)."""
        queue = self._queue
        if len(queue) >= self.max_queue or self._shutdown:
            self.dropped += 1
            return
        queue.append(span)
        if len(queue) >= self.max_export_batch and not self._wake.is_set():
            self._wake.set()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        if self._shutdown:
            return False
        self._export_all()
        return True

    def shutdown(self) -> None:
        if self._shutdown:
            return
        self._export_all()
        self._shutdown = True
        self._wake.set()
        self._thread.join(timeout=self.export_timeout_s)
        self.exporter.shutdown()

    # ----- the export thread
    def _run(self) -> None:
        while not self._shutdown:
            self._wake.wait(self.schedule_delay_s)
            self._wake.clear()
            if not self._shutdown:
                self._export_all()

    def _export_all(self) -> None:
        with self._export_lock:
            queue = self._queue
            while queue:
                count = min(len(queue), self.max_export_batch)
                batch = [queue.popleft() for _ in range(count)]
                self._export(batch)
            if self.dropped:
                dropped, self.dropped = self.dropped, 0
                logger.warning(
                    "%d spans dropped: the span queue (%d) was full; the exporter cannot "
                    "keep up (raise OTEL_BSP_MAX_QUEUE_SIZE or sample fewer traces)",
                    dropped,
                    self.max_queue,
                )

    def _export(self, batch: list[ReadableSpan]) -> None:
        token = context_api.attach(context_api.set_value(_SUPPRESS, True))
        try:
            self.exporter.export(batch)
        except Exception:  # an exporter bug must not kill the thread; the batch is lost
            logger.exception("exporting %d spans failed", len(batch))
        finally:
            context_api.detach(token)


def direct_batcher(processor: object) -> Callable[[ReadableSpan], None] | None:
    """`SpanBatcher.add` when `processor` (a tracer's span processor) is exactly one
    `SpanBatcher`, so a span factory can queue ended spans without the multi-processor
    loop; None otherwise (other processors must see every span)."""
    if isinstance(processor, SpanBatcher):
        return processor.add
    inner = getattr(processor, "_span_processors", None)
    if isinstance(inner, tuple) and len(inner) == 1 and isinstance(inner[0], SpanBatcher):
        return inner[0].add
    return None
