"""One exception tree, and the single mapping to and from gRPC status.

Domain and application code raise these (they never import grpc's status
handling).  The server edge turns them into a status code, a message a person
can act on, and `google.rpc` details (`ErrorInfo` always; `RetryInfo` and
`BadRequest` where they apply) carried in `grpc-status-details-bin`.  The client
edge rebuilds the same typed error from those details, so `except ConflictError`
works across a hop.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc
import grpc.aio
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

DETAILS_KEY = "grpc-status-details-bin"
RETRY_AFTER_KEY = "retry-after"
# gRPC's server pushback (gRFC A6): the client's C-core retry waits this long.
PUSHBACK_KEY = "grpc-retry-pushback-ms"
DEFAULT_DOMAIN = "framework"
# ErrorInfo metadata a server adds to a dependency's UNAVAILABLE, DEADLINE_EXCEEDED or
# RESOURCE_EXHAUSTED that it passes on to its caller: the server itself answered, so a
# balancing client does not count the failure against that instance (registry.outlier)
FROM_DEPENDENCY_KEY = "from_dependency"

Metadata = Sequence[tuple[str, str | bytes]]
_NO_METADATA = grpc.aio.Metadata()


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One rejected field of a request: `field` is a dotted path."""

    field: str
    description: str
    rule: str = ""


# The error classes by reason and by code, built on first use; defining a new subclass
# (a service's own error) clears them, so a lookup never walks the class tree again.
@functools.cache
def _classes_by_reason() -> Mapping[str, type[FrameworkError]]:
    table: dict[str, type[FrameworkError]] = {}
    pending: list[type[FrameworkError]] = [FrameworkError]
    while pending:
        cls = pending.pop()
        table.setdefault(cls.default_reason, cls)
        pending.extend(cls.__subclasses__())
    return table


@functools.cache
def _classes_by_code() -> Mapping[grpc.StatusCode, type[FrameworkError]]:
    table: dict[grpc.StatusCode, type[FrameworkError]] = {}
    pending: list[type[FrameworkError]] = [FrameworkError]
    while pending:
        cls = pending.pop(0)  # breadth first: the most general class per code wins
        table.setdefault(cls.status_code, cls)
        pending.extend(cls.__subclasses__())
    return table


class FrameworkError(grpc.aio.AioRpcError):
    """Base of every error the framework maps to a gRPC status.

    `reason` is stable and UPPER_SNAKE (it crosses the wire in `ErrorInfo`);
    `message` is for a person and must say what to do; `metadata` holds
    string facts that help (never secrets).
    """

    status_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    default_reason: ClassVar[str] = "UNKNOWN"
    _code: grpc.StatusCode
    _initial_metadata: grpc.aio.Metadata
    _trailing_metadata: grpc.aio.Metadata | None
    _debug_error_string: str | None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        legacy = cls.__dict__.get("code")
        if isinstance(legacy, grpc.StatusCode):  # `code = grpc.StatusCode.X` in a subclass
            cls.status_code = legacy
            delattr(cls, "code")  # keep grpc's code() method
        _classes_by_reason.cache_clear()
        _classes_by_code.cache_clear()

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        domain: str = DEFAULT_DOMAIN,
    ) -> None:
        # grpc.aio.AioRpcError's state; metadata is filled when rebuilt from a peer's answer
        super().__init__(type(self).status_code, _NO_METADATA, None, message, None)
        self.args = (message,)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.domain = domain
        # True when rebuilt by a client from another service's answer
        self.remote = False

    # ---- grpc.aio.AioRpcError's interface (grpc-style handlers read the outcome with it)
    def details(self) -> str:
        return self.message

    def trailing_metadata(self) -> grpc.aio.Metadata:
        """What the peer sent; for an error raised here, what the server edge would send."""
        if self._trailing_metadata is None:
            self._trailing_metadata = grpc.aio.Metadata(*to_status(self).trailing_metadata)
        return self._trailing_metadata

    def debug_error_string(self) -> str:
        if self._debug_error_string is None:
            return f"{type(self).__name__}: {self.reason} ({self.domain}): {self.message}"
        return str(self._debug_error_string)

    def override_code(self, code: grpc.StatusCode) -> None:
        """Report `code` instead of the class's (a status with no class of its own)."""
        self._code = code

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, reason={self.reason!r})"

    def __reduce__(self) -> str | tuple[Any, ...]:
        return BaseException.__reduce__(self)  # rebuilt from (message,) and __dict__


class InvalidArgumentError(FrameworkError):
    """The request is malformed; `violations` lists each bad field."""

    status_code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str,
        *,
        violations: Iterable[FieldViolation] = (),
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        domain: str = DEFAULT_DOMAIN,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata, domain=domain)
        self.violations: tuple[FieldViolation, ...] = tuple(violations)


class NotFoundError(FrameworkError):
    status_code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExistsError(FrameworkError):
    status_code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class ConflictError(FrameworkError):
    """A concurrent change won (optimistic concurrency); retry from a fresh read."""

    status_code = grpc.StatusCode.ABORTED
    default_reason = "CONFLICT"


class FailedPreconditionError(FrameworkError):
    """The system is not in a state that allows this operation."""

    status_code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class OutOfRangeError(FrameworkError):
    status_code = grpc.StatusCode.OUT_OF_RANGE
    default_reason = "OUT_OF_RANGE"


class UnauthenticatedError(FrameworkError):
    status_code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDeniedError(FrameworkError):
    status_code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class ResourceExhaustedError(FrameworkError):
    """A capacity limit was hit; `retry_after_s` says when trying again makes sense."""

    status_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        domain: str = DEFAULT_DOMAIN,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata, domain=domain)
        self.retry_after_s = retry_after_s


class RateLimitedError(ResourceExhaustedError):
    default_reason = "RATE_LIMITED"


class BulkheadFullError(ResourceExhaustedError):
    default_reason = "BULKHEAD_FULL"


class OverloadedError(ResourceExhaustedError):
    """The server shed the call: it is at the concurrency it can serve at its best latency."""

    default_reason = "OVERLOADED"


class ThrottledError(ResourceExhaustedError):
    """The client refused the call itself: its target has been refusing most calls lately."""

    default_reason = "THROTTLED"


class UnavailableError(FrameworkError):
    status_code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class CircuitOpenError(UnavailableError):
    default_reason = "CIRCUIT_OPEN"


class DeadlineExceededError(FrameworkError):
    status_code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class CallCancelledError(FrameworkError):
    status_code = grpc.StatusCode.CANCELLED
    default_reason = "CANCELLED"


class UnimplementedError(FrameworkError):
    status_code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "UNIMPLEMENTED"


class InternalError(FrameworkError):
    status_code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"


class DataLossError(FrameworkError):
    status_code = grpc.StatusCode.DATA_LOSS
    default_reason = "DATA_LOSS"


class UnknownError(FrameworkError):
    """A peer answered with a status that carried no framework details."""


# ---------------------------------------------------------------- mapping


@dataclass(frozen=True, slots=True)
class RpcStatus:
    """What the server edge sends: code, message and trailing metadata."""

    code: grpc.StatusCode
    message: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


INTERNAL_MESSAGE = "internal error; the server logged the details"


def code_of(error: BaseException | None) -> grpc.StatusCode:
    """The status code an outcome maps to (OK for success); cheap, no allocation."""
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, FrameworkError):
        return error._code
    if isinstance(error, grpc.aio.AioRpcError | grpc.RpcError) and hasattr(error, "code"):
        code = error.code()
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
    if isinstance(error, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(error, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED
    return grpc.StatusCode.INTERNAL


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_status(error: FrameworkError) -> RpcStatus:
    """Map a framework error to what the server edge sends."""
    status = status_pb2.Status(code=error.code().value[0], message=error.message)
    info = error_details_pb2.ErrorInfo(
        reason=error.reason, domain=error.domain, metadata=error.metadata
    )
    status.details.append(_pack(info))
    trailing: list[tuple[str, str | bytes]] = []
    if isinstance(error, ResourceExhaustedError) and error.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        status.details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        trailing.append((RETRY_AFTER_KEY, f"{error.retry_after_s:.3f}"))
        trailing.append((PUSHBACK_KEY, str(max(0, round(error.retry_after_s * 1000)))))
    if isinstance(error, InvalidArgumentError) and error.violations:
        bad = error_details_pb2.BadRequest()
        for v in error.violations:
            bad.field_violations.add(field=v.field, description=v.description, reason=v.rule)
        status.details.append(_pack(bad))
    trailing.append((DETAILS_KEY, status.SerializeToString()))
    return RpcStatus(error.code(), error.message, tuple(trailing))


def internal_status() -> RpcStatus:
    """What an unexpected exception becomes: INTERNAL, no internals leaked."""
    return to_status(InternalError(INTERNAL_MESSAGE))


def error_class(reason: str, code: grpc.StatusCode) -> type[FrameworkError]:
    """The class a (reason, code) pair stands for; falls back on the code alone.

    Error classes defined after the first lookup (a service's own) are found too: defining
    one clears the cached tables.  An unknown reason costs one dictionary lookup.
    """
    cls = _classes_by_reason().get(reason)
    if cls is not None and cls.status_code == code:
        return cls
    return _classes_by_code().get(code, UnknownError)


def from_status(
    code: grpc.StatusCode, message: str, trailing_metadata: Metadata | None
) -> FrameworkError:
    """Rebuild a typed error from what a client received."""
    details: bytes | None = None
    retry_after: float | None = None
    for key, value in trailing_metadata or ():
        if key == DETAILS_KEY and isinstance(value, bytes):
            details = value
        elif key == RETRY_AFTER_KEY and isinstance(value, str):
            try:
                retry_after = float(value)
            except ValueError:
                retry_after = None
    reason, domain, meta = code.name, DEFAULT_DOMAIN, {}
    violations: list[FieldViolation] = []
    status = status_pb2.Status()
    if details:
        try:
            status.ParseFromString(details)
        except DecodeError:
            status.Clear()  # corrupt details from a peer: map by the status code alone
        for item in status.details:
            if item.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                item.Unpack(info)
                reason, domain, meta = info.reason, info.domain, dict(info.metadata)
            elif item.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                item.Unpack(retry)
                retry_after = retry.retry_delay.ToNanoseconds() / 1e9
            elif item.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                item.Unpack(bad)
                violations.extend(
                    FieldViolation(v.field, v.description, v.reason) for v in bad.field_violations
                )
    cls = error_class(reason, code)
    error: FrameworkError
    if issubclass(cls, InvalidArgumentError):
        error = cls(message, violations=violations, reason=reason, metadata=meta, domain=domain)
    elif issubclass(cls, ResourceExhaustedError):
        error = cls(message, retry_after_s=retry_after, reason=reason, metadata=meta, domain=domain)
    else:
        error = cls(message, reason=reason, metadata=meta, domain=domain)
    if cls is UnknownError:
        error.override_code(code)  # keep the code a foreign peer sent
    return error


def from_dependency(error: BaseException | None) -> bool:
    """True for a failure the answering server passed on from one of its dependencies
    (marked by its error mapping with `FROM_DEPENDENCY_KEY`): that server is reachable."""
    if isinstance(error, grpc.aio.AioRpcError) and not isinstance(error, FrameworkError):
        error = from_rpc_error(error)
    return (
        isinstance(error, FrameworkError)
        and error.remote
        and error.metadata.get(FROM_DEPENDENCY_KEY) == "true"
    )


def from_rpc_error(error: grpc.aio.AioRpcError) -> FrameworkError:
    """Rebuild the typed error a server raised, from a grpc.aio failure (marked `remote`).

    The typed error is also the `grpc.aio.AioRpcError` grpc would have raised: same
    code, details, initial and trailing metadata and debug string.  A framework error
    (already typed) is returned as it is.
    """
    if isinstance(error, FrameworkError):
        return error
    trailing = error.trailing_metadata()
    typed = from_status(error.code(), error.details() or "", trailing)
    typed.remote = True
    typed._initial_metadata = error.initial_metadata()
    typed._trailing_metadata = trailing
    typed._debug_error_string = error.debug_error_string()
    return typed
