"""Structured logs: one JSON object per line, with the trace and span of the current RPC.

    configure_logging(service="orders")          # once, in the composition root
    logger.info("reserved %s items", n, extra={"method": "ReserveStock", "code": "OK"})

Every record made while a span is current (inside an RPC handler, an event
handler under `continue_trace`, or any span of your own) gets `trace_id` and
`span_id`, so a log line can be found from a trace and the other way round.
The ids are taken when the record is made (`TraceContextFilter`, installed on
the handler), so a handler that formats later or in another thread still gets
them.  A worker process's lines (`python -m framework serve --workers N`) carry
`process` (`worker-1`).  Fields passed through `extra` (service, method, code, duration_ms, peer,
or any other) become top-level keys; values JSON cannot hold are written with
`str()`.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any

from opentelemetry import trace as trace_api

# Attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


class TraceContextFilter(logging.Filter):
    """Stamps `trace_id` / `span_id` of the current span on each record (never filters out)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "trace_id", None) is None:
            span_context = trace_api.get_current_span().get_span_context()
            if span_context.is_valid:
                record.trace_id = f"{span_context.trace_id:032x}"
                record.span_id = f"{span_context.span_id:016x}"
        return True


class JsonFormatter(logging.Formatter):
    """JSON lines: ts (UTC, ISO 8601), level, logger, message, trace ids, extras, exception."""

    def __init__(self, *, service: str = "", static: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.static: dict[str, Any] = dict(static or {})
        if service:
            self.static.setdefault("service", service)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="microseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **self.static,
        }
        if record.processName not in (None, "MainProcess"):
            entry["process"] = record.processName  # a worker process: "worker-1"
        if getattr(record, "trace_id", None) is None:
            TraceContextFilter().filter(record)  # formatted where it was made: same context
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class PlainFormatter(logging.Formatter):
    """The CLI's plain lines; in a named process (a worker: `worker-1`) they start with
    `[worker-1] `, so the lines of several workers on one stderr can be told apart."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        name = record.processName
        return line if name in (None, "MainProcess") else f"[{name}] {line}"


def configure_logging(
    *,
    level: int | str = logging.INFO,
    service: str = "",
    stream: IO[str] | None = None,
    logger: logging.Logger | None = None,
) -> logging.Handler:
    """Send `logger`'s records (default: the root logger) as JSON lines to `stream` (stderr).

    Replaces the handlers this function installed before; returns the new handler.
    """
    target = logger or logging.getLogger()
    for old in list(target.handlers):
        if getattr(old, "_framework_json", False):
            target.removeHandler(old)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(service=service))
    handler.addFilter(TraceContextFilter())
    handler._framework_json = True  # type: ignore[attr-defined]
    target.addHandler(handler)
    target.setLevel(level)
    return handler
