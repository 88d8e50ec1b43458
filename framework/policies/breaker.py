"""Circuit breaker: stop calling a target that keeps failing, and probe it back.

One `CircuitBreaker` per (target, method).  CLOSED, it records each outcome in a
count-based sliding window (a ring of the last `window_size` calls with a running
failure count, O(1) per call); once the window holds at least `min_calls` and
the failure rate reaches `failure_rate_threshold`, it OPENs.  A failure is a
status in `failure_codes`, or a call slower than `slow_call_s` when set.  OPEN,
`enter` raises `CircuitOpenError` (UNAVAILABLE) at once, before any network
I/O.  After `open_wait_s` the next call moves it to HALF_OPEN, which lets
`half_open_probes` calls through: if they all succeed it CLOSEs (with a fresh
window), the first failure re-OPENs it.  Outcomes that say nothing about the
target's health (the caller cancelled, or a local policy rejected the call
before it left the process) are not failures.

State changes are logged and passed to `on_state_change(target, method, old,
new)` (metrics hook there).  Time comes from the injected `Clock`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass

import grpc

from framework.clock import Clock, SystemClock
from framework.config import expect
from framework.errors import CircuitOpenError, code_of
from framework.policy import Call, Enter, Exit, Method, Side

logger = logging.getLogger(__name__)

DEFAULT_FAILURE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
# The caller's own mistakes say nothing about the target's health.
NEVER_FAILURES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND})


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


StateListener = Callable[[str, str, BreakerState, BreakerState], None]


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """When to open, how long to stay open, how many probes to let through."""

    window_size: int = 20
    min_calls: int = 10
    failure_rate_threshold: float = 0.5
    slow_call_s: float | None = None
    open_wait_s: float = 5.0
    half_open_probes: int = 3
    failure_codes: Collection[grpc.StatusCode] = DEFAULT_FAILURE_CODES

    def __post_init__(self) -> None:
        if self.window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {self.window_size!r}")
        if not 1 <= self.min_calls <= self.window_size:
            raise ValueError(
                f"min_calls must be between 1 and window_size ({self.window_size}), "
                f"got {self.min_calls!r}"
            )
        if not 0.0 < self.failure_rate_threshold <= 1.0:
            raise ValueError(
                f"failure_rate_threshold must be in (0, 1], got {self.failure_rate_threshold!r}"
            )
        if self.slow_call_s is not None and self.slow_call_s <= 0:
            raise ValueError(f"slow_call_s must be > 0 or None, got {self.slow_call_s!r}")
        if self.open_wait_s < 0:
            raise ValueError(f"open_wait_s must be >= 0, got {self.open_wait_s!r}")
        if self.half_open_probes < 1:
            raise ValueError(f"half_open_probes must be >= 1, got {self.half_open_probes!r}")
        bad = NEVER_FAILURES.intersection(self.failure_codes)
        if bad:
            names = ", ".join(sorted(c.name for c in bad))
            raise ValueError(
                f"failure_codes must not contain {names}: the caller's own errors "
                "do not mean the target is unhealthy"
            )
        object.__setattr__(self, "failure_codes", frozenset(self.failure_codes))


class CircuitBreaker:
    """The state machine for one (target, method); `before()` then `after(error, started)`."""

    __slots__ = (
        "_clock",
        "_failures",
        "_index",
        "_listener",
        "_opened_at",
        "_probes_left",
        "_probes_ok",
        "_recorded",
        "_ring",
        "config",
        "method",
        "state",
        "target",
    )

    def __init__(
        self,
        config: BreakerConfig,
        *,
        target: str = "",
        method: str = "",
        clock: Clock | None = None,
        on_state_change: StateListener | None = None,
    ) -> None:
        self.config = config
        self.target = target
        self.method = method
        self.state = BreakerState.CLOSED
        self._clock = clock or SystemClock()
        self._listener = on_state_change
        self._ring = [False] * config.window_size  # True = failure
        self._index = 0
        self._recorded = 0
        self._failures = 0
        self._opened_at = 0.0
        self._probes_left = 0  # HALF_OPEN: probes that may still start
        self._probes_ok = 0  # HALF_OPEN: probes that succeeded

    @property
    def failure_rate(self) -> float:
        return self._failures / self._recorded if self._recorded else 0.0

    @property
    def recorded(self) -> int:
        """Outcomes currently in the window."""
        return self._recorded

    def before(self) -> bool:
        """Admit a call or raise `CircuitOpenError`; True when the call is a probe."""
        state = self.state
        if state is BreakerState.CLOSED:
            return False
        if state is BreakerState.OPEN:
            waited = self._clock.monotonic() - self._opened_at
            if waited < self.config.open_wait_s:
                raise self._open_error(self.config.open_wait_s - waited)
            self._move(BreakerState.HALF_OPEN)
            self._probes_left = self.config.half_open_probes
            self._probes_ok = 0
        if self._probes_left <= 0:
            raise self._open_error(None)
        self._probes_left -= 1
        return True

    def after(self, error: BaseException | None, started: float, probe: bool) -> None:
        """Record one outcome. `started` is the clock's monotonic time at `before`."""
        if error is None:
            failed = False
        elif isinstance(error, asyncio.CancelledError):
            if probe and self.state is BreakerState.HALF_OPEN:
                self._probes_left += 1  # the probe told us nothing; let another one try
            return
        else:
            # An error raised in this process before the call left it (a policy
            # further in, e.g. an expired inbound deadline) says nothing about the
            # target: only answers rebuilt from the wire (`remote`) count.
            remote = bool(getattr(error, "remote", True))
            failed = remote and code_of(error) in self.config.failure_codes
        slow = self.config.slow_call_s
        if not failed and slow is not None and self._clock.monotonic() - started > slow:
            failed = True
        state = self.state
        if state is BreakerState.CLOSED:
            self._record(failed)
            if (
                self._failures
                and self._recorded >= self.config.min_calls
                and self._failures >= self.config.failure_rate_threshold * self._recorded
            ):
                self._open()
        elif state is BreakerState.HALF_OPEN and probe:  # not a probe: stale evidence
            if failed:
                self._open()
            else:
                self._probes_ok += 1
                if self._probes_ok >= self.config.half_open_probes:
                    self._reset_window()
                    self._move(BreakerState.CLOSED)

    # ----------------------------------------------------------- internals
    def _record(self, failed: bool) -> None:
        ring, i = self._ring, self._index
        if self._recorded == len(ring):
            self._failures -= ring[i]
        else:
            self._recorded += 1
        ring[i] = failed
        self._failures += failed
        self._index = (i + 1) % len(ring)

    def _reset_window(self) -> None:
        self._ring = [False] * self.config.window_size
        self._index = self._recorded = self._failures = 0

    def _open(self) -> None:
        self._opened_at = self._clock.monotonic()
        self._probes_left = 0
        self._move(BreakerState.OPEN)

    def _move(self, new: BreakerState) -> None:
        old, self.state = self.state, new
        logger.warning(
            "circuit %s -> %s for %s on %s (failure rate %.2f over %s calls)",
            old.value,
            new.value,
            self.method,
            self.target,
            self.failure_rate,
            self._recorded,
        )
        if self._listener is not None:
            try:
                self._listener(self.target, self.method, old, new)
            except Exception:  # an observer's bug must not fail the call it observes
                logger.exception("circuit state listener %r failed", self._listener)

    def _open_error(self, wait_s: float | None) -> CircuitOpenError:
        when = f"retry in {wait_s:.1f}s" if wait_s is not None else "probes are in flight"
        return CircuitOpenError(
            f"circuit open for {self.method} on {self.target}: recent calls failed; {when}",
            metadata={"target": self.target, "method": self.method},
        )


class CircuitBreakerPolicy:
    """Client policy: one breaker per (channel target, method), created on first use."""

    sides = frozenset({Side.CLIENT})

    def __init__(
        self,
        config: BreakerConfig | None = None,
        *,
        clock: Clock | None = None,
        on_state_change: StateListener | None = None,
    ) -> None:
        if config is not None:
            expect(config, BreakerConfig, "CircuitBreakerPolicy(config)", "BreakerConfig(...)")
        self.config = config or BreakerConfig()
        self.clock = clock or SystemClock()
        self.on_state_change = on_state_change
        self._breakers: dict[tuple[str, str], CircuitBreaker] = {}

    def __repr__(self) -> str:
        return f"CircuitBreakerPolicy({self.config!r})"

    def breakers(self) -> list[CircuitBreaker]:
        """Every breaker created so far (for operators: `python -m framework breakers`)."""
        return list(self._breakers.values())

    def breaker(self, target: str, method: str) -> CircuitBreaker:
        """The breaker for one (target, method) pair (created CLOSED on first use)."""
        key = (target, method)
        found = self._breakers.get(key)
        if found is None:
            found = self._breakers[key] = CircuitBreaker(
                self.config,
                target=target,
                method=method,
                clock=self.clock,
                on_state_change=self.on_state_change,
            )
        return found

    def bind(self, method: Method) -> Enter | None:
        name = method.full_name
        per_target: dict[str, CircuitBreaker] = {}
        monotonic = self.clock.monotonic
        slow = self.config.slow_call_s is not None

        def enter(call: Call) -> Exit | None:
            breaker = per_target.get(call.target)
            if breaker is None:
                breaker = per_target[call.target] = self.breaker(call.target, name)
            probe = breaker.before()
            started = monotonic() if slow else 0.0

            def exit_(error: BaseException | None) -> None:
                breaker.after(error, started, probe)

            return exit_

        return enter
