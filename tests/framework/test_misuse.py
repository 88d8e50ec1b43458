"""Public constructors refuse arguments of the wrong kind at once, saying what to pass."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import pytest

import framework
from framework.auth.keyset import KeySet, StaticKeys, VerificationKey

SECRET = "k" * 32


def _static() -> StaticKeys:
    return StaticKeys([VerificationKey.hmac("k1", SECRET)])


def _verifier() -> Any:
    return framework.JwtVerifier(KeySet(_static()), framework.JwtConfig(None, None))


# (what a newcomer writes, words the error must contain)
MISUSES: list[tuple[str, Callable[[], object], str]] = [
    (
        "JwtVerifier(StaticKeys(...))",
        lambda: framework.JwtVerifier(_static(), framework.JwtConfig(None, None)),  # type: ignore[arg-type]
        "KeySet(StaticKeys(",
    ),
    (
        "JwtVerifier(keys, 'issuer')",
        lambda: framework.JwtVerifier(KeySet(_static()), "https://id.example"),  # type: ignore[arg-type]
        "JwtConfig(issuer=",
    ),
    ("KeySet([key])", lambda: KeySet([VerificationKey.hmac("k1", SECRET)]), "StaticKeys("),  # type: ignore[arg-type]
    ("StaticKeys(secret)", lambda: StaticKeys(SECRET), "VerificationKey.hmac("),  # type: ignore[arg-type]
    ("AuthPolicy(KeySet)", lambda: framework.AuthPolicy(KeySet(_static())), "JwtVerifier("),  # type: ignore[arg-type]
    ("BearerToken(b'...')", lambda: framework.BearerToken(b"token"), "str"),  # type: ignore[arg-type]
    ("Server('inventory')", lambda: framework.Server("inventory"), "ServerConfig"),  # type: ignore[arg-type]
    (
        "Server(policies=AccessLogPolicy())",
        lambda: framework.Server(policies=framework.ValidationPolicy()),  # type: ignore[arg-type]
        "a list of policies",
    ),
    ("connect(('127.0.0.1', 1))", lambda: framework.connect(("127.0.0.1", 1)), "host:port"),  # type: ignore[arg-type]
    (
        "connect(target, config=ServerConfig)",
        lambda: framework.connect("127.0.0.1:1", config=framework.ServerConfig()),  # type: ignore[arg-type]
        "ClientConfig",
    ),
    (
        "RateLimitPolicy(Limit)",
        lambda: framework.RateLimitPolicy(framework.Limit(1, 1)),
        "RateLimitConfig",
    ),  # type: ignore[arg-type]
    ("CircuitBreakerPolicy(5)", lambda: framework.CircuitBreakerPolicy(5), "BreakerConfig"),  # type: ignore[arg-type]
    ("BulkheadPolicy(64)", lambda: framework.BulkheadPolicy(64), "BulkheadConfig"),  # type: ignore[arg-type]
    ("RetryPolicy(3)", lambda: framework.RetryPolicy(3), "RetryConfig"),  # type: ignore[arg-type]
    ("FaultInjectionPolicy(rule)", lambda: framework.FaultInjectionPolicy("abort"), "FaultRule"),  # type: ignore[arg-type]
    ("IdempotencyKeyPolicy('client')", lambda: framework.IdempotencyKeyPolicy("client"), "Side."),  # type: ignore[arg-type]
    ("ValidationPolicy(True)", lambda: framework.ValidationPolicy(True), "Validators"),  # type: ignore[arg-type]
    (
        "TracingPolicy(telemetry)",
        lambda: framework.TracingPolicy(framework.TelemetryConfig()),  # type: ignore[arg-type]
        "telemetry.tracer_provider",
    ),
    (
        "MetricsPolicy(telemetry)",
        lambda: framework.MetricsPolicy(framework.TelemetryConfig()),  # type: ignore[arg-type]
        "telemetry.rpc_metrics",
    ),
    (
        "AccessLogPolicy(sys.stderr)",
        lambda: framework.AccessLogPolicy(sys.stderr),  # type: ignore[arg-type]
        "AccessLogWriter(stream)",
    ),
    ("Check('db', None)", lambda: framework.Check("db", None), "callable"),  # type: ignore[arg-type]
    (
        "Server(health_checks=[callable])",
        lambda: framework.Server(health_checks=[lambda: None]),  # type: ignore[list-item]
        "Check(",
    ),
]


@pytest.mark.parametrize(("case", "build", "words"), MISUSES, ids=[m[0] for m in MISUSES])
async def test_a_wrong_argument_fails_at_construction_saying_what_to_pass(
    case: str, build: Callable[[], object], words: str
) -> None:
    """TypeError (or ValueError) at construction, naming what to pass instead."""
    with pytest.raises((TypeError, ValueError)) as caught:
        build()
    assert words in str(caught.value), f"{case}: {caught.value}"


async def test_the_right_arguments_still_build() -> None:
    """The checks accept what the docs show."""
    verifier = _verifier()
    assert framework.AuthPolicy(verifier).verifier is verifier
    assert framework.BearerToken("token") is not None
    assert framework.Server(framework.ServerConfig(), policies=[framework.ValidationPolicy()])
