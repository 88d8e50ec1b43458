"""Metric names and labels: OpenTelemetry's RPC conventions, or the classic grpc-prometheus ones.

Two namings, chosen once per process (`TelemetryConfig.metrics_naming`,
`FRAMEWORK_METRICS_NAMING`):

- `otel` (default), the current OpenTelemetry RPC semantic conventions: durations in
  seconds as `rpc.server.call.duration` / `rpc.client.call.duration` (Prometheus:
  `rpc_server_call_duration_seconds`), attributes `rpc.system.name` (`grpc`),
  `rpc.method` (`pkg.Service/Method`), `rpc.response.status_code` (`OK`,
  `UNAVAILABLE`, ...) and `error.type` on failures (the typed error's reason).
- `grpc_prometheus`, the families of go-grpc-prometheus and py-grpc-prometheus, so
  dashboards and alerts written for them work unchanged: `grpc_server_started_total`,
  `grpc_server_handled_total`, `grpc_server_handling_seconds` and the `grpc_client_*`
  twins, labelled `grpc_type` (`unary`, `client_stream`, `server_stream`,
  `bidi_stream`), `grpc_service`, `grpc_method` and, on `handled`, `grpc_code` spelled
  as Go spells it (`OK`, `Canceled`, `DeadlineExceeded`, ...).

The framework's own families (in-flight calls, errors by reason, breaker state,
policy rejections, retries) keep their names in both; their method labels follow
the naming, so they join with the RPC families in PromQL.
"""

from __future__ import annotations

from typing import Any

import grpc

from framework.policy import Arity, Method, Side

OTEL = "otel"
GRPC_PROMETHEUS = "grpc_prometheus"
NAMINGS = frozenset({OTEL, GRPC_PROMETHEUS})

# grpc-go's codes.Code.String(): what grpc_code holds in existing dashboards and alerts.
GO_CODE_NAMES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}
CODES_BY_VALUE: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}
GRPC_TYPES: dict[Arity, str] = {
    Arity.UNARY_UNARY: "unary",
    Arity.STREAM_UNARY: "client_stream",
    Arity.UNARY_STREAM: "server_stream",
    Arity.STREAM_STREAM: "bidi_stream",
}


class MetricNames:
    """Names and label sets of one naming."""

    def __init__(self, naming: str = OTEL) -> None:
        if naming not in NAMINGS:
            raise ValueError(
                f"metrics naming must be one of {sorted(NAMINGS)}, got {naming!r} "
                "(FRAMEWORK_METRICS_NAMING)"
            )
        self.naming = naming
        self.classic = naming == GRPC_PROMETHEUS

    # ----- labels
    def method_labels(self, method: Method) -> dict[str, Any]:
        """The labels naming a method (every per-method family carries them)."""
        if self.classic:
            return {
                "grpc_type": GRPC_TYPES[method.arity],
                "grpc_service": method.service,
                "grpc_method": method.name,
            }
        return {"rpc.system.name": "grpc", "rpc.method": f"{method.service}/{method.name}"}

    def status_labels(self, code: int) -> dict[str, Any]:
        """The label of a status code (its numeric value)."""
        status = CODES_BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)
        if self.classic:
            return {"grpc_code": GO_CODE_NAMES[status]}
        return {"rpc.response.status_code": status.name}

    @property
    def error_type_key(self) -> str:
        return "error_type" if self.classic else "error.type"

    # ----- the RPC families
    def duration(self, side: Side) -> tuple[str, str]:
        """(name, description) of the duration histogram, unit seconds."""
        if self.classic:
            return (
                f"grpc_{side.value}_handling_seconds",
                f"Histogram of response latency (seconds) of gRPC calls handled by the "
                f"{side.value}",
            )
        return (
            f"rpc.{side.value}.call.duration",
            "Measures the duration of an "
            + ("incoming" if side is Side.SERVER else "outgoing")
            + " Remote Procedure Call (RPC)",
        )

    @staticmethod
    def started(side: Side) -> tuple[str, str]:
        """Classic only: calls started (a counter)."""
        where = "on the server" if side is Side.SERVER else "on the client"
        return f"grpc_{side.value}_started", f"Total number of RPCs started {where}"

    @staticmethod
    def handled(side: Side) -> tuple[str, str]:
        """Classic only: calls finished by code (a counter)."""
        where = "on the server" if side is Side.SERVER else "by the client"
        return (
            f"grpc_{side.value}_handled",
            f"Total number of RPCs completed {where}, regardless of success or failure",
        )
