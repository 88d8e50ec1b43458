"""A retry budget for the balanced client: retries stay a bounded share of traffic.

The token bucket of gRPC's retry throttling (gRFC A6): the bucket starts full
with `max_tokens`; every attempt that fails with a retryable code takes one
token, every successful call gives back `token_ratio`; a retry is allowed only
while more than half the tokens remain.  When every instance fails, a few
retries spend the budget and then each call makes one attempt, so a failing
fleet is not hit `max_attempts` times as hard; as calls succeed again the
bucket refills (1 / token_ratio successes per token).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """Token bucket limits; `token_ratio` tokens come back per successful call."""

    max_tokens: float = 20.0
    token_ratio: float = 0.1

    def __post_init__(self) -> None:
        if not 1 <= self.max_tokens <= 1000:
            raise ValueError(f"max_tokens must be in [1, 1000], got {self.max_tokens}")
        if not 0 < self.token_ratio <= 1:
            raise ValueError(f"token_ratio must be in (0, 1], got {self.token_ratio}")


class RetryTokens:
    """The bucket's state (one per balanced channel, i.e. per service)."""

    __slots__ = ("_max", "_ratio", "_threshold", "retries", "throttled", "tokens")

    def __init__(self, budget: RetryBudget) -> None:
        self._max = budget.max_tokens
        self._ratio = budget.token_ratio
        self._threshold = budget.max_tokens / 2
        self.tokens = budget.max_tokens
        self.retries = 0  # retries allowed so far
        self.throttled = 0  # retries refused for want of tokens

    def succeeded(self) -> None:
        tokens = self.tokens + self._ratio
        self.tokens = tokens if tokens < self._max else self._max

    def failed(self) -> None:
        tokens = self.tokens - 1
        self.tokens = tokens if tokens > 0 else 0.0

    def allow_retry(self) -> bool:
        """Whether a failed attempt may be retried now (counted either way)."""
        if self.tokens > self._threshold:
            self.retries += 1
            return True
        self.throttled += 1
        return False
