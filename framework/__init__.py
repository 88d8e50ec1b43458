"""Microservice patterns on gRPC for asyncio Python.

The public API, importable from here (loaded on first use, so `import framework`
has no side effects and `python -m framework protos` works before gen/ exists):

    from framework import Server, ServerConfig, connect, ClientConfig, serve
    from framework import Policy, BasePolicy, Call, Method, only, skip
    from framework import ConflictError, NotFoundError, ...   (framework.errors)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # builders
    "Server": "framework.server",
    "ServerConfig": "framework.config",
    "ClientConfig": "framework.config",
    "connect": "framework.client",
    "Channel": "framework.client",
    "serve": "framework.testing",
    # the policy chain
    "Policy": "framework.policy",
    "BasePolicy": "framework.policy",
    "Call": "framework.policy",
    "Method": "framework.policy",
    "Chain": "framework.policy",
    "Side": "framework.policy",
    "only": "framework.policy",
    "skip": "framework.policy",
    "current_call": "framework.policy",
    "AccessLogPolicy": "framework.policies.accesslog",
    "AccessLogWriter": "framework.policies.accesslog",
    "ErrorMappingPolicy": "framework.policies.error_mapping",
    "DeadlinePolicy": "framework.policies.deadline",
    # security
    "AuthPolicy": "framework.auth.policy",
    "current_principal": "framework.auth.policy",
    "Principal": "framework.auth.verifier",
    "JwtVerifier": "framework.auth.verifier",
    "JwtConfig": "framework.auth.verifier",
    "BearerToken": "framework.auth.bearer",
    "ServerTls": "framework.auth.tls",
    "ClientTls": "framework.auth.tls",
    "server_credentials": "framework.auth.tls",
    "channel_credentials": "framework.auth.tls",
    "ValidationPolicy": "framework.policies.validation",
    "IdempotencyKeyPolicy": "framework.policies.idempotency",
    # resilience (ratelimit_redis is not exported: it imports redis)
    "RateLimitPolicy": "framework.policies.ratelimit",
    "RateLimitConfig": "framework.policies.ratelimit",
    "Limit": "framework.policies.ratelimit",
    "CircuitBreakerPolicy": "framework.policies.breaker",
    "BreakerConfig": "framework.policies.breaker",
    "BulkheadPolicy": "framework.policies.bulkhead",
    "BulkheadConfig": "framework.policies.bulkhead",
    "RetryPolicy": "framework.policies.retry",
    "RetryConfig": "framework.policies.retry",
    "FaultInjectionPolicy": "framework.policies.faults",
    "FaultRule": "framework.policies.faults",
    "FaultInjectionServicer": "framework.policies.faults",
    "LoadSheddingPolicy": "framework.policies.shedding",
    "SheddingConfig": "framework.policies.shedding",
    "AdaptiveThrottlePolicy": "framework.policies.throttle",
    "ThrottleConfig": "framework.policies.throttle",
    # observability
    "Telemetry": "framework.telemetry.sdk",
    "TelemetryConfig": "framework.telemetry.sdk",
    "TracingPolicy": "framework.telemetry.tracing",
    "MetricsPolicy": "framework.telemetry.metrics",
    "configure_logging": "framework.telemetry.logs",
    # health
    "Check": "framework.health",
    "HealthMonitor": "framework.health",
    # time
    "Clock": "framework.clock",
    "SystemClock": "framework.clock",
    "ManualClock": "framework.clock",
    # errors
    "FrameworkError": "framework.errors",
    "FieldViolation": "framework.errors",
    "InvalidArgumentError": "framework.errors",
    "NotFoundError": "framework.errors",
    "AlreadyExistsError": "framework.errors",
    "ConflictError": "framework.errors",
    "FailedPreconditionError": "framework.errors",
    "UnauthenticatedError": "framework.errors",
    "PermissionDeniedError": "framework.errors",
    "ResourceExhaustedError": "framework.errors",
    "RateLimitedError": "framework.errors",
    "BulkheadFullError": "framework.errors",
    "OverloadedError": "framework.errors",
    "ThrottledError": "framework.errors",
    "UnavailableError": "framework.errors",
    "CircuitOpenError": "framework.errors",
    "DeadlineExceededError": "framework.errors",
    "InternalError": "framework.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'framework' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
