"""Client-side adaptive throttling: stop sending most calls to a backend that refuses them.

From the Google SRE book ("Handling Overload"): each client remembers, per
target, how many calls it attempted (`requests`) and how many the backend
accepted (`accepts`) over a sliding window, and refuses a new call locally with
probability

    max(0, (requests - K * accepts) / (requests + 1))

While the backend accepts everything the probability is 0.  Once it refuses
(load shedding, rate limits: RESOURCE_EXHAUSTED; UNAVAILABLE), the client sends
only about K times what the backend accepts and refuses the rest itself, at no
cost to the backend; refused calls count as requests, so the more the backend
refuses the more the client keeps to itself.  As the backend recovers, accepts
catch up and the probability falls back to 0 within one window.  K = 2 (the
book's value) lets twice the accepted rate through, enough to notice recovery
quickly; a lower K throttles harder.

`AdaptiveThrottlePolicy` keeps one `AdaptiveThrottle` per channel target.  A
call refused locally raises `ThrottledError` (RESOURCE_EXHAUSTED, reason
THROTTLED) before anything is sent.  Outcomes that say nothing about the
backend (the caller cancelled; an error raised in this process before the call
left, e.g. by an inner policy) are not counted.  The window is a ring of
`buckets` counters over `window_s` of the injected clock, so counting is O(1).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Collection
from dataclasses import dataclass

import grpc

from framework.clock import Clock, SystemClock
from framework.errors import ThrottledError, code_of
from framework.policy import Call, Enter, Exit, Method, Side

DEFAULT_REJECTION_CODES = frozenset(
    {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}
)


@dataclass(frozen=True, slots=True)
class ThrottleConfig:
    """`k`: how many times the accepted rate may still be sent; the window and its buckets."""

    k: float = 2.0
    window_s: float = 10.0
    buckets: int = 10
    # Answers that mean "the backend refused the call".
    rejection_codes: Collection[grpc.StatusCode] = DEFAULT_REJECTION_CODES

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1 (below 1 no call is ever sent), got {self.k!r}")
        if self.window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {self.window_s!r}")
        if self.buckets < 1:
            raise ValueError(f"buckets must be >= 1, got {self.buckets!r}")
        if grpc.StatusCode.OK in self.rejection_codes:
            raise ValueError("rejection_codes must not contain OK")
        object.__setattr__(self, "rejection_codes", frozenset(self.rejection_codes))


class AdaptiveThrottle:
    """Requests and accepts of one target over the sliding window, and the decision."""

    __slots__ = (
        "_accepts",
        "_epoch",
        "_requests",
        "_width",
        "accepts",
        "clock",
        "config",
        "random",
        "requests",
        "target",
        "throttled",
    )

    def __init__(
        self,
        config: ThrottleConfig,
        *,
        target: str = "",
        clock: Clock | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.target = target
        self.clock = clock or SystemClock()
        self.random = rng
        self._width = config.window_s / config.buckets
        self._requests = [0] * config.buckets
        self._accepts = [0] * config.buckets
        self._epoch = int(self.clock.monotonic() // self._width)
        self.requests = 0  # totals over the window
        self.accepts = 0
        self.throttled = 0  # calls refused locally, ever

    def _roll(self) -> int:
        """The bucket for now, after emptying the buckets that left the window."""
        epoch = int(self.clock.monotonic() // self._width)
        n = self.config.buckets
        if epoch != self._epoch:
            for e in range(self._epoch + 1, min(epoch, self._epoch + n) + 1):
                slot = e % n
                self.requests -= self._requests[slot]
                self.accepts -= self._accepts[slot]
                self._requests[slot] = self._accepts[slot] = 0
            self._epoch = epoch
        return epoch % n

    @property
    def probability(self) -> float:
        """The chance that the next call is refused locally."""
        self._roll()
        return max(0.0, (self.requests - self.config.k * self.accepts) / (self.requests + 1))

    def before(self) -> None:
        """Let the call go, or count it as a request and raise `ThrottledError`."""
        slot = self._roll()
        excess = self.requests - self.config.k * self.accepts
        if excess > 0 and self.random() < excess / (self.requests + 1):
            self._requests[slot] += 1
            self.requests += 1
            self.throttled += 1
            raise ThrottledError(
                f"{self.target} refused {self.requests - self.accepts} of the last "
                f"{self.requests} calls within {self.config.window_s:.0f}s; this client now "
                "sends only part of its calls until the target accepts them again",
                metadata={"target": self.target},
            )

    def after(self, accepted: bool) -> None:
        """Record the outcome of a call that was sent."""
        slot = self._roll()
        self._requests[slot] += 1
        self.requests += 1
        if accepted:
            self._accepts[slot] += 1
            self.accepts += 1


class AdaptiveThrottlePolicy:
    """Client policy: one `AdaptiveThrottle` per channel target, created on first use."""

    sides = frozenset({Side.CLIENT})

    def __init__(
        self,
        config: ThrottleConfig | None = None,
        *,
        clock: Clock | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.config = config or ThrottleConfig()
        self.clock = clock or SystemClock()
        self.rng = rng
        self._throttles: dict[str, AdaptiveThrottle] = {}

    def __repr__(self) -> str:
        return f"AdaptiveThrottlePolicy({self.config!r})"

    def throttle(self, target: str) -> AdaptiveThrottle:
        """The throttle of one target (created on first use)."""
        found = self._throttles.get(target)
        if found is None:
            found = self._throttles[target] = AdaptiveThrottle(
                self.config, target=target, clock=self.clock, rng=self.rng
            )
        return found

    def throttles(self) -> list[AdaptiveThrottle]:
        return list(self._throttles.values())

    def bind(self, method: Method) -> Enter | None:
        rejection_codes = self.config.rejection_codes
        by_target = self._throttles

        def enter(call: Call) -> Exit | None:
            throttle = by_target.get(call.target) or self.throttle(call.target)
            throttle.before()

            def exit_(error: BaseException | None) -> None:
                if error is None:
                    throttle.after(True)
                    return
                if isinstance(error, asyncio.CancelledError):
                    return  # the caller gave up: nothing learnt about the target
                if not getattr(error, "remote", True):
                    return  # refused in this process before it left
                code = code_of(error)
                if code is grpc.StatusCode.CANCELLED:
                    return
                throttle.after(code not in rejection_codes)

            return exit_

        return enter
