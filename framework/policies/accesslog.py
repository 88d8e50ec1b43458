"""Structured request logging: one record per RPC with service, method, code, duration, peer."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from framework.errors import code_of
from framework.policy import BasePolicy, Call, Enter, Exit, Method, Side

_SERVER_FAULTS = frozenset({"INTERNAL", "UNKNOWN", "DATA_LOSS", "UNIMPLEMENTED"})
DEFAULT_QUIET = ("grpc.health.v1.*", "grpc.reflection.*")


class AccessLogPolicy(BasePolicy):
    """Logs every call once it ends, on either side.

    Successful calls log at `level` (INFO), client errors at the same level,
    server faults (INTERNAL, UNKNOWN, DATA_LOSS, UNIMPLEMENTED) at WARNING. Health
    checks and reflection are skipped unless `quiet` says otherwise.
    """

    def __init__(
        self,
        logger: logging.Logger | None = None,
        *,
        level: int = logging.INFO,
        quiet: Sequence[str] = DEFAULT_QUIET,
    ) -> None:
        self.logger = logger or logging.getLogger("framework.access")
        self.level = level
        self.quiet = tuple(quiet)

    def bind(self, method: Method) -> Enter | None:
        if any(method.matches(p) for p in self.quiet):
            return None
        logger, level = self.logger, self.level
        base = {"service": method.service, "method": method.name, "rpc": method.full_name}
        templates = {
            side.value: f"{side.value} {method.full_name} %s %.2fms peer=%s" for side in Side
        }

        def enter(call: Call) -> Exit | None:
            if not logger.isEnabledFor(level):
                return None
            side = call.side.value
            template = templates[side]

            def exit_(error: BaseException | None) -> None:
                code = code_of(error).name
                duration_ms = (time.perf_counter() - call.started) * 1000
                peer = call.peer
                lvl = logging.WARNING if code in _SERVER_FAULTS else level
                # makeRecord + handle: no caller lookup (a stack walk) for a record whose
                # origin is always this line; the structured fields go straight on it
                record = logger.makeRecord(
                    logger.name, lvl, __file__, 0, template, (code, duration_ms, peer), None
                )
                fields = record.__dict__
                fields.update(base)
                fields["side"] = side
                fields["code"] = code
                fields["duration_ms"] = round(duration_ms, 3)
                fields["peer"] = peer
                logger.handle(record)

            return exit_

        return enter


__all__ = ["AccessLogPolicy", "Side"]
