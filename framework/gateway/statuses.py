"""gRPC status -> HTTP answer: the standard code mapping and `google.rpc.Status` bodies.

The body of every error is the JSON form of `google.rpc.Status`: `code` (the
gRPC code number), `message`, and `details` (`ErrorInfo`, `BadRequest` field
violations, `RetryInfo`... each with its `@type`).  A backend's own details are
passed on as the backend sent them; errors raised at the gateway get the same
details the framework's server edge would add.  RESOURCE_EXHAUSTED with a
`RetryInfo` adds `Retry-After` (whole seconds, rounded up); UNAUTHENTICATED
adds `WWW-Authenticate: Bearer`.
"""

from __future__ import annotations

import base64
import logging
import math
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from framework.errors import (
    DETAILS_KEY,
    FrameworkError,
    InternalError,
    ResourceExhaustedError,
    internal_status,
    to_status,
)

__all__ = ["HTTP_STATUS", "BodyTooLargeError", "ErrorAnswer", "answer_for", "grpc_web_trailers"]

logger = logging.getLogger(__name__)

# The mapping of google/rpc/code.proto (and grpc-gateway, Envoy).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}


class BodyTooLargeError(ResourceExhaustedError):
    """The request body is over the gateway's limit: RESOURCE_EXHAUSTED, HTTP 413."""

    default_reason = "BODY_TOO_LARGE"
    http_status = 413


class ErrorAnswer:
    """What an error becomes: the status proto, HTTP status and extra headers."""

    __slots__ = ("code", "headers", "http_status", "status")

    def __init__(self, status: status_pb2.Status, code: grpc.StatusCode) -> None:
        self.status = status
        self.code = code
        self.http_status = HTTP_STATUS.get(code, 500)
        self.headers: dict[str, str] = {}
        retry_after = _retry_after_s(status)
        if retry_after is not None:
            self.headers["retry-after"] = str(max(0, math.ceil(retry_after)))
        if code is grpc.StatusCode.UNAUTHENTICATED:
            self.headers["www-authenticate"] = "Bearer"

    def json(self) -> dict[str, Any]:
        return json_format.MessageToDict(self.status, always_print_fields_with_no_presence=True)


def _retry_after_s(status: status_pb2.Status) -> float | None:
    for item in status.details:
        if item.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            item.Unpack(info)
            return float(info.retry_delay.ToNanoseconds()) / 1e9
    return None


def _sent_details(error: FrameworkError) -> status_pb2.Status | None:
    """The `google.rpc.Status` the backend sent, when the error came from one."""
    cause = error.__cause__
    if not isinstance(cause, grpc.aio.AioRpcError):
        return None
    for key, value in cause.trailing_metadata() or ():
        if key == DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except DecodeError:
                return None
    return None


def _status_of(error: FrameworkError) -> status_pb2.Status:
    sent = _sent_details(error)
    if sent is not None and sent.code == error.code().value[0]:
        return sent
    for key, value in to_status(error).trailing_metadata:
        if key == DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    raise AssertionError("to_status always adds the details")  # pragma: no cover


def answer_for(error: BaseException) -> ErrorAnswer:
    """The answer for anything a request ended with; unexpected errors become INTERNAL."""
    if isinstance(error, FrameworkError):
        answer = ErrorAnswer(_status_of(error), error.code())
        answer.http_status = getattr(error, "http_status", answer.http_status)
        return answer
    logger.error("gateway: unexpected error", exc_info=error)
    status = status_pb2.Status()
    for key, value in internal_status().trailing_metadata:
        if key == DETAILS_KEY and isinstance(value, bytes):
            status.ParseFromString(value)
    return ErrorAnswer(status, InternalError.status_code)


def grpc_web_trailers(answer: ErrorAnswer | None) -> list[tuple[str, str]]:
    """The trailer fields of a gRPC-Web response (OK when `answer` is None)."""
    if answer is None:
        return [("grpc-status", "0"), ("grpc-message", "")]
    encoded = base64.b64encode(answer.status.SerializeToString()).decode()
    return [
        ("grpc-status", str(answer.code.value[0])),
        ("grpc-message", _percent_encode(answer.status.message)),
        (DETAILS_KEY, encoded),
    ]


def _percent_encode(text: str) -> str:
    """grpc-message encoding: printable ASCII except '%' as is, the rest as %XX of UTF-8."""
    out = []
    for byte in text.encode():
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(chr(byte))
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)
