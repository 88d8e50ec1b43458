"""The server's error mapping, as a policy the server pins outermost.

`outcome()` decides what status an outcome becomes and records it on the call,
before any exit runs (every exit sees what the caller sees); the server adapter
then sends it.  Typed framework errors keep their code,
reason and message; anything unexpected becomes INTERNAL with a generic message
while the traceback goes to the log with the method and trace id.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from framework.errors import (
    DETAILS_KEY,
    FROM_DEPENDENCY_KEY,
    INTERNAL_MESSAGE,
    CallCancelledError,
    DeadlineExceededError,
    FrameworkError,
    InternalError,
    InvalidArgumentError,
    UnimplementedError,
    error_class,
    to_status,
)
from framework.policy import BasePolicy, Call, Method, Side

logger = logging.getLogger(__name__)

# Codes from a downstream call that describe this service's own call, not the caller's
# request: passed on as INTERNAL. Others (NOT_FOUND, ABORTED, UNAVAILABLE, ...) pass through.
_NOT_OURS = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DATA_LOSS,
    }
)
# A dependency's failures that say "unreachable, slow or overloaded": passed on with
# FROM_DEPENDENCY_KEY set, so balancing callers do not eject this (answering) instance.
_DEPENDENCY_FAILURES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
# What the caller reads instead of grpc's own text (which names addresses) for those.
DEPENDENCY_FAILED: Mapping[grpc.StatusCode, str] = MappingProxyType(
    {
        grpc.StatusCode.UNAVAILABLE: "a dependency of this service is unreachable; retry later",
        grpc.StatusCode.DEADLINE_EXCEEDED: "a dependency of this service did not answer in time",
        grpc.StatusCode.RESOURCE_EXHAUSTED: (
            "a dependency of this service is overloaded; retry later"
        ),
    }
)
DEPENDENCY_MESSAGE = "a dependency of this service failed; the server logged the details"


def current_trace_id() -> str:
    """Hex trace id of the active OpenTelemetry span, or "" when none."""
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


class ErrorMappingPolicy(BasePolicy):
    """Maps what a handler raised to a status; never lets internals reach the caller.

    Pinned outermost by the server.  It has no enter: the server adapter calls
    `outcome(call, error)` first, hands every exit the mapped outcome, then sends
    the status recorded on `call.status`.
    """

    sides = frozenset({Side.SERVER})

    def bind(self, method: Method) -> None:
        return None

    def outcome(self, call: Call, error: BaseException | None) -> BaseException | None:
        """What the caller sees for `error` (None: a normal return).

        Sets `call.status` when the adapter must send that status; cancellations,
        `context.abort()` and `context.set_code()` have their status on the wire already.
        """
        context = call.context
        if error is None:  # returned normally: a code the handler set with set_code()
            code = status_code(context.code()) if context is not None else grpc.StatusCode.OK
            if code is grpc.StatusCode.OK:
                return None
            return status_error(code, context.details() if context is not None else "")
        if isinstance(error, asyncio.CancelledError | GeneratorExit):
            return cancelled(context)
        if isinstance(error, grpc.aio.AbortError):  # the handler called context.abort()
            if context is None:
                return status_error(grpc.StatusCode.UNKNOWN, "")
            return status_error(status_code(context.code()), context.details())
        mapped = self._map(call, error)
        call.status = to_status(mapped)
        return mapped

    def _map(self, call: Call, error: BaseException) -> FrameworkError:
        name = call.method.full_name
        if isinstance(error, FrameworkError):
            if not error.remote:
                return error
            code = error.code()
            if code in _DEPENDENCY_FAILURES:
                if not any(key == DETAILS_KEY for key, _ in error.trailing_metadata() or ()):
                    # made by grpc on this side (no server sent it): its text names the
                    # dependency's addresses, which the caller must not learn
                    logger.warning(
                        "%s: a dependency call failed %s: %s",
                        name,
                        code.name,
                        error.message,
                        extra={"method": name, "code": code.name},
                    )
                    passed = error_class(code.name, code)(DEPENDENCY_FAILED.get(code, ""))
                    passed.override_code(code)
                    passed.__cause__ = error
                    error = passed
                error.metadata[FROM_DEPENDENCY_KEY] = "true"
                return error
            if code not in _NOT_OURS:
                return error
            # a dependency refused *this service's* call: the caller's request is not
            # at fault and must not learn the dependency's auth or internals
            logger.error(
                "%s: a dependency answered %s (%s): %s",
                name,
                error.code().name,
                error.reason,
                error.message,
                extra={"method": name, "code": "INTERNAL"},
            )
            mapped: FrameworkError = InternalError(DEPENDENCY_MESSAGE)
        elif isinstance(error, DecodeError):
            # request bytes grpc or the adapter could not parse: the caller's bytes are
            # at fault, not the server; the parser's text is not passed on
            mapped = InvalidArgumentError(
                f"a request message of {name} could not be parsed as its protobuf type; "
                "send a valid serialized message"
            )
        elif isinstance(error, NotImplementedError):
            mapped = UnimplementedError(f"{name} is not implemented by this server")
        elif isinstance(error, TimeoutError):
            mapped = DeadlineExceededError(f"{name} timed out waiting on a dependency; retry later")
        else:
            logger.error(
                "unexpected error in %s (trace_id=%s)",
                name,
                current_trace_id() or "-",
                exc_info=error,
                extra={"method": name, "code": "INTERNAL"},
            )
            mapped = InternalError(INTERNAL_MESSAGE)
        mapped.__cause__ = error  # observers (spans) may record what really happened
        return mapped


# A client's cancellation and a passed deadline both reach the server as a cancelled
# call; the server's deadline is a little later than the client's (it starts when the
# request arrives), so a call cancelled this close to its deadline ran out of time.
DEADLINE_SLACK_S = 0.05


def cancelled(context: Any) -> FrameworkError:
    """A cancelled call as its caller saw it: DEADLINE_EXCEEDED or CANCELLED."""
    remaining = context.time_remaining() if context is not None else None
    if remaining is not None and remaining <= DEADLINE_SLACK_S:
        return DeadlineExceededError("the caller's deadline passed before the call finished")
    return CallCancelledError("the caller cancelled the call before it finished")


def status_code(code: object) -> grpc.StatusCode:
    """A code in any form grpc accepts (StatusCode, its int value, None for OK)."""
    if isinstance(code, grpc.StatusCode):
        return code
    if code is None:
        return grpc.StatusCode.OK
    if isinstance(code, int):
        return _CODES_BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)
    return grpc.StatusCode.UNKNOWN


_CODES_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def status_error(code: grpc.StatusCode, details: str | None) -> FrameworkError:
    """The typed error for a status the handler set itself (abort, set_code)."""
    return error_class(code.name, code)(details or code.name)
