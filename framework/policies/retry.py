"""Retries, compiled to gRPC service config so the C core runs them.

`RetryPolicy` is a client policy with no per-call Python work: `channel_options()`
returns a `grpc.service_config` JSON with a `retryPolicy` for every method whose
contract marks it `idempotent` (in the services named in `RetryConfig.services`)
and a `retryThrottling` block as the retry budget.  `framework.client.connect`
collects it.  The C core then

- retries only the codes in `retryable_codes` (UNAVAILABLE by default;
  RESOURCE_EXHAUSTED only when `retry_resource_exhausted` is set),
- waits a random time in [0, min(initial * multiplier^(n-1), max)] between
  attempts (exponential backoff with full jitter, per the gRPC retry design),
- never starts an attempt after the call's deadline (the deadline covers every
  attempt, so retries cannot outlive the caller),
- stops retrying once the throttling tokens fall to half of `budget_tokens`:
  each failed attempt costs 1 token and each success gives back
  `budget_token_ratio`, so retries are capped at a share of recent calls and
  cannot multiply an outage,
- tells the server which attempt it is in the `grpc-previous-rpc-attempts`
  metadata entry.

Non-idempotent methods get no retry policy: they run once.  The C core caps
`maxAttempts` at 5; larger values are refused here rather than silently cut.
Interceptors sit above the retry layer, so the policy chain (breaker, logging)
sees one call and its final outcome.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable
from dataclasses import dataclass

import grpc
from google.protobuf import descriptor_pool

from framework.config import expect
from framework.policy import Method, Side
from gen.framework.v1 import options_pb2

MAX_ATTEMPTS_CAP = 5  # grpc C core clamps maxAttempts to 5


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """How idempotent methods of `services` (full names, e.g. "echo.v1.EchoService") retry."""

    services: Collection[str] = ()
    max_attempts: int = 3
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    backoff_multiplier: float = 2.0
    retry_resource_exhausted: bool = False
    budget_tokens: int = 10
    budget_token_ratio: float = 0.1

    def __post_init__(self) -> None:
        if not 2 <= self.max_attempts <= MAX_ATTEMPTS_CAP:
            raise ValueError(
                f"max_attempts must be between 2 and {MAX_ATTEMPTS_CAP} (the gRPC core's cap), "
                f"got {self.max_attempts!r}"
            )
        if not self.initial_backoff_s > 0:
            raise ValueError(f"initial_backoff_s must be > 0, got {self.initial_backoff_s!r}")
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(
                f"max_backoff_s must be >= initial_backoff_s ({self.initial_backoff_s}), "
                f"got {self.max_backoff_s!r}"
            )
        if not self.backoff_multiplier > 0:
            raise ValueError(f"backoff_multiplier must be > 0, got {self.backoff_multiplier!r}")
        if not 1 <= self.budget_tokens <= 1000:
            raise ValueError(
                f"budget_tokens must be between 1 and 1000, got {self.budget_tokens!r}"
            )
        if not 0 < self.budget_token_ratio <= 1:
            raise ValueError(
                f"budget_token_ratio must be in (0, 1], got {self.budget_token_ratio!r}"
            )
        if isinstance(self.services, str):
            raise TypeError("services must be a collection of names, not one string")
        object.__setattr__(self, "services", tuple(self.services))

    @property
    def retryable_codes(self) -> tuple[grpc.StatusCode, ...]:
        codes = [grpc.StatusCode.UNAVAILABLE]
        if self.retry_resource_exhausted:
            codes.append(grpc.StatusCode.RESOURCE_EXHAUSTED)
        return tuple(codes)


def idempotent_methods(services: Iterable[str]) -> list[tuple[str, str]]:
    """(service, method) pairs marked idempotent in the contracts of `services`."""
    pool = descriptor_pool.Default()
    found: list[tuple[str, str]] = []
    for service in services:
        try:
            desc = pool.FindServiceByName(service)
        except KeyError:
            raise ValueError(
                f"service {service!r} is not in the descriptor pool: import its generated "
                "_pb2 module before building the retry policy"
            ) from None
        for method in desc.methods:
            opts = method.GetOptions()
            if (
                opts.HasExtension(options_pb2.method_policy)
                and opts.Extensions[options_pb2.method_policy].idempotent
            ):
                found.append((service, method.name))
    return found


def _seconds(value: float) -> str:
    return f"{value:.9f}".rstrip("0").rstrip(".") + "s"


def service_config(config: RetryConfig) -> dict[str, object]:
    """The service config dict: one retryPolicy per idempotent method, plus throttling."""
    names = [{"service": s, "method": m} for s, m in idempotent_methods(config.services)]
    out: dict[str, object] = {
        "retryThrottling": {
            "maxTokens": config.budget_tokens,
            "tokenRatio": round(config.budget_token_ratio, 3),
        }
    }
    if names:
        out["methodConfig"] = [
            {
                "name": names,
                "retryPolicy": {
                    "maxAttempts": config.max_attempts,
                    "initialBackoff": _seconds(config.initial_backoff_s),
                    "maxBackoff": _seconds(config.max_backoff_s),
                    "backoffMultiplier": config.backoff_multiplier,
                    "retryableStatusCodes": [c.name for c in config.retryable_codes],
                },
            }
        ]
    return out


class RetryPolicy:
    """Client policy: contributes the retry service config; no per-call work."""

    sides = frozenset({Side.CLIENT})

    def __init__(self, config: RetryConfig) -> None:
        expect(config, RetryConfig, "RetryPolicy(config)", "RetryConfig(services=[...])")
        self.config = config
        self._options = [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", json.dumps(service_config(config), sort_keys=True)),
        ]

    def __repr__(self) -> str:
        return f"RetryPolicy({self.config!r})"

    def channel_options(self) -> list[tuple[str, object]]:
        """Channel options for `connect()`: enable retries and set the service config."""
        return list(self._options)

    def bind(self, method: Method) -> None:
        return None  # the C core does the work; nothing to run per call
