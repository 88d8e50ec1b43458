"""Access log: one record per RPC (side, method, code, duration, peer, trace ids), cheaply.

    AccessLogPolicy()                                  # JSON lines to stderr, batched
    AccessLogPolicy(AccessLogWriter(open("access.log", "a")), sample_ratio=0.1)
    AccessLogPolicy(logging.getLogger("access"))       # through stdlib logging instead

Two sinks:

- `AccessLogWriter` (the default, on stderr): the record's JSON line is built
  directly in the call's exit (no `LogRecord`, no formatter, no handler lock) and
  appended to a queue; a background thread writes the queued lines in batches,
  every `flush_interval_s` or as soon as `max_batch` lines wait.  A record for a
  failed call wakes the writer at once.  The server flushes it when it drains
  (`on_draining`) and when it stops (`close`); interpreter exit flushes it too.
  A writer that cannot keep up drops lines beyond `max_pending` and says how many
  in a WARNING line once it catches up, so memory stays bounded and no loss is
  silent.
- a `logging.Logger`: one `LogRecord` per call with the same fields as
  attributes (`extra`-style), for deployments that route everything through
  logging handlers.  Costs several times more per call.

Every other log line of the framework and of user code goes through `logging` as
before; only the per-call access record takes the short path.

Both sinks write the same fields: `ts` (UTC, ISO 8601), `level`, `logger`,
`side`, `rpc`, `service`, `method`, `code`, `duration_ms`, `peer`, `reason` (the
typed error's reason, on failures), `trace_id` / `span_id` (when a span is
current: put the tracing policy before this one) and `message`; in a worker process
(`--workers N`) also `process` ("worker-1").

`sample_ratio` < 1 keeps that fraction of the successful calls; errors and calls
slower than `slow_ms` are always written, and kept OK records then carry
`sample_ratio` so counts can be scaled back.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import random
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import IO, Any

import grpc

from framework.errors import code_of
from framework.policy import Call, Exit, Method, Side
from framework.telemetry.tracecontext import SPAN_KEY, current_context

logger = logging.getLogger(__name__)

_SERVER_FAULTS = frozenset({"INTERNAL", "UNKNOWN", "DATA_LOSS", "UNIMPLEMENTED"})
DEFAULT_QUIET = ("grpc.health.v1.*", "grpc.reflection.*")
LOGGER_NAME = "framework.access"
_SIDES = (Side.SERVER, Side.CLIENT)


class AccessLogWriter:
    """Writes lines to a text stream from a background thread, in batches.

    `stream=None` writes to whatever `sys.stderr` is at write time.  `write()` is
    safe from any thread and never blocks on I/O.
    """

    def __init__(
        self,
        stream: IO[str] | None = None,
        *,
        flush_interval_s: float = 0.2,
        max_batch: int = 512,
        max_pending: int = 65_536,
    ) -> None:
        if flush_interval_s <= 0:
            raise ValueError(f"flush_interval_s must be > 0, got {flush_interval_s}")
        if max_batch < 1 or max_pending < max_batch:
            raise ValueError(
                f"need 1 <= max_batch <= max_pending, got max_batch={max_batch}, "
                f"max_pending={max_pending}"
            )
        self.stream = stream
        self.flush_interval_s = flush_interval_s
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.dropped = 0  # lines refused since the last report
        self.written = 0
        # lines, or (render, args) whose line the writer thread builds (see `write_later`)
        self._pending: deque[str | tuple[Callable[..., str], tuple[Any, ...]]] = deque()
        self._wake = threading.Event()
        self._io = threading.Lock()  # one batch written at a time
        self._start = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._exit_hook: Any = None

    # ----- producers (any thread)
    def write(self, line: str, urgent: bool = False) -> None:
        """Queue one line (ending in a newline); `urgent` wakes the writer now."""
        pending = self._pending
        if len(pending) >= self.max_pending:
            self.dropped += 1
            return
        pending.append(line)
        if self._thread is None:
            self._start_thread()
        if (urgent or len(pending) >= self.max_batch) and not self._wake.is_set():
            self._wake.set()

    def write_later(
        self, render: Callable[..., str], args: tuple[Any, ...], urgent: bool = False
    ) -> None:
        """Queue the line `render(*args)`, built when the batch is written, off the
        caller's path (a batch of lines is formatted in one go, with a warm cache);
        `render` must be cheap, pure and safe to run in the writer thread."""
        pending = self._pending
        if len(pending) >= self.max_pending:
            self.dropped += 1
            return
        pending.append((render, args))
        if self._thread is None:
            self._start_thread()
        if (urgent or len(pending) >= self.max_batch) and not self._wake.is_set():
            self._wake.set()

    def flush(self) -> None:
        """Write everything queued so far, in the calling thread."""
        self._drain()

    def close(self) -> None:
        """Flush and stop the background thread (a later `write` starts it again)."""
        with self._start:
            thread, self._thread = self._thread, None
            if thread is not None:
                self._stopping = True
                self._wake.set()
                thread.join(timeout=5)
                self._stopping = False
            if self._exit_hook is not None:
                atexit.unregister(self._exit_hook)
                self._exit_hook = None
        self._drain()

    # ----- the writer thread
    def _start_thread(self) -> None:
        with self._start:
            if self._thread is not None:
                return
            thread = threading.Thread(target=self._run, name="access-log-writer", daemon=True)
            self._thread = thread
            if self._exit_hook is None:  # flush at interpreter exit; weak: no leak
                ref = weakref.ref(self)

                def at_exit() -> None:
                    writer = ref()
                    if writer is not None:
                        writer.close()

                self._exit_hook = at_exit
                atexit.register(at_exit)
            thread.start()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            self._drain()

    def _drain(self) -> None:
        with self._io:
            pending = self._pending
            while pending:
                lines = []
                for _ in range(min(len(pending), 4 * self.max_batch)):
                    item = pending.popleft()
                    lines.append(item if isinstance(item, str) else item[0](*item[1]))
                self._emit("".join(lines), len(lines))
            dropped = self.dropped
            if dropped and self._emit(_dropped_line(dropped), 0):
                self.dropped -= dropped  # reported; producers may have added more meanwhile

    def _emit(self, text: str, count: int) -> bool:
        stream = self.stream or sys.stderr
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError) as error:  # closed or full: count it, keep the thread alive
            self.dropped += count
            logger.warning("access log: writing %d lines failed: %s", count, error)
            return False
        self.written += count
        return True


def _dropped_line(count: int) -> str:
    return (
        json.dumps(
            {
                "ts": datetime.now(UTC).isoformat(timespec="microseconds"),
                "level": "WARNING",
                "logger": LOGGER_NAME,
                "message": f"{count} access records dropped: the writer could not keep up",
                "dropped": count,
            }
        )
        + "\n"
    )


class _Timestamps:
    """ISO 8601 UTC timestamps; the date and time up to the second are formatted once
    per second (the common case costs a few string operations)."""

    __slots__ = ("prefix", "second")

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""

    def format(self, now: float) -> str:
        second = int(now)
        if second != self.second:
            self.prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self.second = second
        return f"{self.prefix}.{int((now - second) * 1e6):06d}+00:00"


class AccessLogPolicy:
    """One record per call once it ends, on either side.

    Successful calls and client errors are written at `level` (INFO), server faults
    (INTERNAL, UNKNOWN, DATA_LOSS, UNIMPLEMENTED) at WARNING.  Health checks and
    reflection are skipped unless `quiet` says otherwise.  `sink` is an
    `AccessLogWriter` (default: a new one on stderr) or a `logging.Logger`.
    """

    def __init__(
        self,
        sink: AccessLogWriter | logging.Logger | None = None,
        *,
        level: int = logging.INFO,
        quiet: Sequence[str] = DEFAULT_QUIET,
        sample_ratio: float = 1.0,
        slow_ms: float = 1000.0,
    ) -> None:
        if not 0.0 <= sample_ratio <= 1.0:
            raise ValueError(f"sample_ratio must be within [0, 1], got {sample_ratio}")
        if slow_ms < 0:
            raise ValueError(f"slow_ms must be >= 0, got {slow_ms}")
        if sink is not None and not isinstance(sink, AccessLogWriter | logging.Logger):
            raise TypeError(
                "AccessLogPolicy(sink) must be an AccessLogWriter(stream) or a logging.Logger, "
                f"got {type(sink).__name__}"
            )
        self.sink: AccessLogWriter | logging.Logger = (
            sink if sink is not None else AccessLogWriter()
        )
        self.level = level
        self.quiet = tuple(quiet)
        self.sample_ratio = sample_ratio
        self.slow_ms = slow_ms
        self._stamps = _Timestamps()
        self._peers: dict[str, str] = {}

    @property
    def logger(self) -> logging.Logger | None:
        return self.sink if isinstance(self.sink, logging.Logger) else None

    def bind(self, method: Method) -> Any:
        if any(method.matches(p) for p in self.quiet):
            return None
        if isinstance(self.sink, logging.Logger):
            return _LoggingEnter(self, self.sink, method)
        return _LineEnter(self, self.sink, method)

    # ----- server hooks: flush when draining and when stopped
    async def on_draining(self, server: object) -> None:
        if isinstance(self.sink, AccessLogWriter):
            await asyncio.to_thread(self.sink.flush)

    async def close(self) -> None:
        if isinstance(self.sink, AccessLogWriter):
            await asyncio.to_thread(self.sink.close)

    # ----- shared per-call pieces
    def _keep(self, error: BaseException | None, duration_ms: float) -> bool:
        """Sampling: only successful calls faster than `slow_ms` may be left out."""
        return (
            error is not None
            or self.sample_ratio >= 1.0
            or duration_ms >= self.slow_ms
            or random.random() < self.sample_ratio
        )

    def _peer_json(self, peer: str) -> str:
        quoted = self._peers.get(peer)
        if quoted is None:
            if len(self._peers) >= 4096:  # peers change with connections: stay bounded
                self._peers.clear()
            quoted = self._peers[peer] = json.dumps(peer, ensure_ascii=False)
        return quoted


def _process_name() -> str | None:
    """This process's name when it has one (a worker: "worker-1"), as logging reads it."""
    multiprocessing = sys.modules.get("multiprocessing")
    name = multiprocessing.current_process().name if multiprocessing is not None else None
    return None if name in (None, "MainProcess") else str(name)


def _outcome(error: BaseException | None) -> tuple[str, str | None]:
    """(status code name, typed reason or None) of a call's outcome."""
    if error is None:
        return "OK", None
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED.name, None
    return code_of(error).name, getattr(error, "reason", None)


class _LineEnter:
    """Bound for one method: the constant part of the JSON line is built here, once."""

    __slots__ = ("level", "middle", "names", "policy", "writer")

    def __init__(self, policy: AccessLogPolicy, writer: AccessLogWriter, method: Method) -> None:
        self.policy = policy
        self.writer = writer
        self.level = logging.getLevelName(policy.level)
        # per side, not in dicts keyed by Side: an Enum's hash is a Python-level call
        self.names = tuple(f"{side.value} {method.full_name}" for side in _SIDES)
        fields = {"logger": LOGGER_NAME}
        process = _process_name()
        if process is not None:
            fields["process"] = process
        fields |= {
            "rpc": method.full_name,
            "service": method.service,
            "method": method.name,
        }
        constant = json.dumps(fields, ensure_ascii=False)[1:-1]
        self.middle = tuple(f'{constant},"side":"{side.value}"' for side in _SIDES)

    def __call__(self, call: Call) -> Exit:
        policy, started, later = self.policy, call.started, self.writer.write_later
        index = 0 if call.side is Side.SERVER else 1
        middle, name = self.middle[index], self.names[index]

        def exit_(error: BaseException | None) -> None:
            # only what must be read now is read here; the writer thread builds the line
            duration_ms = (time.perf_counter() - started) * 1000.0
            sampled = policy.sample_ratio < 1.0
            if sampled and not policy._keep(error, duration_ms):
                return
            if error is None:
                code, level, extra = "OK", self.level, ""
                if sampled:
                    extra = f',"sample_ratio":{policy.sample_ratio}'
            else:
                code, reason = _outcome(error)
                level = "WARNING" if code in _SERVER_FAULTS else self.level
                extra = f',"reason":{json.dumps(reason)}' if reason not in (None, code) else ""
            trace_id = span_id = 0
            span = current_context().get(SPAN_KEY)  # the call's span: tracing is outer
            if span is not None:
                context = span.get_span_context()  # type: ignore[attr-defined]
                if context.is_valid:
                    trace_id, span_id = context.trace_id, context.span_id
            later(
                _line,
                (policy, time.time(), level, middle, code, duration_ms, call.peer, extra,
                 trace_id, span_id, name),
                error is not None,
            )  # fmt: skip

        return exit_


def _line(
    policy: AccessLogPolicy,
    now: float,
    level: str,
    middle: str,
    code: str,
    duration_ms: float,
    peer: str,
    extra: str,
    trace_id: int,
    span_id: int,
    name: str,
) -> str:
    """One record's JSON line (run by the writer thread, which alone uses the caches)."""
    if trace_id:
        extra += f',"trace_id":"{trace_id:032x}","span_id":"{span_id:016x}"'
    return (
        f'{{"ts":"{policy._stamps.format(now)}","level":"{level}",{middle},'
        f'"code":"{code}","duration_ms":{duration_ms:.3f},'
        f'"peer":{policy._peer_json(peer)}{extra},'
        f'"message":"{name} {code} {duration_ms:.2f}ms"}}\n'
    )


class _LoggingEnter:
    """Bound for one method, writing through a `logging.Logger`."""

    __slots__ = ("base", "logger", "policy", "templates")

    def __init__(self, policy: AccessLogPolicy, logger: logging.Logger, method: Method) -> None:
        self.policy = policy
        self.logger = logger
        self.base = {"service": method.service, "method": method.name, "rpc": method.full_name}
        self.templates = {
            side: f"{side.value} {method.full_name} %s %.2fms peer=%s" for side in Side
        }

    def __call__(self, call: Call) -> Exit | None:
        policy, logger = self.policy, self.logger
        if not logger.isEnabledFor(policy.level):
            return None
        template, base = self.templates[call.side], self.base

        def exit_(error: BaseException | None) -> None:
            duration_ms = (time.perf_counter() - call.started) * 1000
            if policy.sample_ratio < 1.0 and not policy._keep(error, duration_ms):
                return
            code, reason = _outcome(error)
            peer = call.peer
            level = logging.WARNING if code in _SERVER_FAULTS else policy.level
            # makeRecord + handle: no caller lookup (a stack walk) for a record whose
            # origin is always this line; the structured fields go straight on it
            record = logger.makeRecord(
                logger.name, level, __file__, 0, template, (code, duration_ms, peer), None
            )
            fields = record.__dict__
            fields.update(base)
            fields["side"] = call.side.value
            fields["code"] = code
            fields["duration_ms"] = round(duration_ms, 3)
            fields["peer"] = peer
            if reason is not None and reason != code:
                fields["reason"] = reason
            logger.handle(record)

        return exit_


__all__ = ["DEFAULT_QUIET", "AccessLogPolicy", "AccessLogWriter", "Side"]
