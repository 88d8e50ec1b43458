"""The server's error mapping, as a policy the server pins outermost.

Its exit decides what status an outcome becomes and records it on the call;
the server adapter then sends it.  Typed framework errors keep their code,
reason and message; anything unexpected becomes INTERNAL with a generic message
while the traceback goes to the log with the method and trace id.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from google.protobuf.message import DecodeError

from framework.errors import (
    DeadlineExceededError,
    FrameworkError,
    InternalError,
    InvalidArgumentError,
    UnimplementedError,
    internal_status,
    to_status,
)
from framework.policy import BasePolicy, Call, Exit, Side

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
DEPENDENCY_MESSAGE = "a dependency of this service failed; the server logged the details"


def current_trace_id() -> str:
    """Hex trace id of the active OpenTelemetry span, or "" when none."""
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


class ErrorMappingPolicy(BasePolicy):
    """Maps what a handler raised to a status; never lets internals reach the caller."""

    sides = frozenset({Side.SERVER})

    def enter(self, call: Call) -> Exit:
        def exit_(error: BaseException | None) -> None:
            if error is None or isinstance(error, asyncio.CancelledError | GeneratorExit):
                return
            if _is_abort(error):
                return  # the handler called context.abort(): its status stands
            if isinstance(error, FrameworkError) and error.remote and error.code() in _NOT_OURS:
                # a dependency refused *this service's* call: the caller's request is not
                # at fault and must not learn the dependency's auth or internals
                logger.error(
                    "%s: a dependency answered %s (%s): %s",
                    call.method.full_name,
                    error.code().name,
                    error.reason,
                    error.message,
                    extra={"method": call.method.full_name, "code": "INTERNAL"},
                )
                call.status = to_status(InternalError(DEPENDENCY_MESSAGE))
            elif isinstance(error, FrameworkError):
                call.status = to_status(error)
            elif isinstance(error, DecodeError):
                # a streamed request message grpc could not parse (found by chaos fuzzing):
                # the caller's bytes are at fault, not the server
                call.status = to_status(
                    InvalidArgumentError(
                        f"a request message of {call.method.full_name} could not be parsed "
                        "as its protobuf type; send a valid serialized message"
                    )
                )
            elif isinstance(error, NotImplementedError):
                call.status = to_status(
                    UnimplementedError(f"{call.method.full_name} is not implemented by this server")
                )
            elif isinstance(error, TimeoutError):
                call.status = to_status(
                    DeadlineExceededError(
                        f"{call.method.full_name} timed out waiting on a dependency; retry later"
                    )
                )
            else:
                logger.error(
                    "unexpected error in %s (trace_id=%s)",
                    call.method.full_name,
                    current_trace_id() or "-",
                    exc_info=error,
                    extra={"method": call.method.full_name, "code": "INTERNAL"},
                )
                call.status = internal_status()

        return exit_


def _is_abort(error: BaseException) -> bool:
    import grpc.aio

    return isinstance(error, grpc.aio.AbortError)
