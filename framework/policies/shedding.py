"""Adaptive load shedding: admit only the concurrency the server serves at its best latency.

`LoadSheddingPolicy` (server side) keeps one `GradientLimit` for the calls it
guards.  The limit is re-estimated once per sampling window (`window_s`) from
the calls that finished in it, as Netflix's concurrency-limits "gradient" limit
does: the window's average latency is compared with the recent best (the
lowest window average over the last `baseline_windows` windows);

    gradient  = clamp(tolerance * best / latency, 0.5, 1.0)
    new limit = limit * gradient + queue_size         (then smoothed, clamped)

so while calls take no longer than `tolerance` times the best latency the limit
grows by up to `queue_size` per window, and once they queue it shrinks towards
the concurrency that keeps latency near the best.  A window in which fewer than
half the limit was ever in flight says nothing about capacity (the load, not
the server, was the bottleneck) and leaves the limit alone, so a server below
capacity admits everything.

Per call, `enter` is a comparison of two numbers:

* a call over the limit is refused at once with `OverloadedError`
  (RESOURCE_EXHAUSTED, reason OVERLOADED, `google.rpc.RetryInfo`), before the
  handler does any work;
* criticality: the `x-criticality` metadata entry (`critical`, `default`,
  `sheddable`; anything else is `default`) says which share of the limit a
  call may fill: critical calls the whole limit, default ones `default_share`,
  sheddable ones `sheddable_share`.  As load grows, sheddable calls are refused
  first, then default ones, critical ones last.  The value is the caller's
  claim: a server that must not let any caller claim `critical` passes its own
  `criticality` hook (e.g. from the verified principal, with the policy placed
  after authentication);
* a call whose remaining deadline is shorter than the best latency cannot be
  answered in time: it is refused with DEADLINE_EXCEEDED (reason
  DEADLINE_TOO_SHORT) before any work, instead of working for an answer nobody
  will read.

What it sees: calls from their `enter` to their `exit`.  Handlers that wait
(on a database, another service, the executor running a sync handler) show
their queue as calls in flight, which is what the limit acts on.  A handler
that burns CPU on the event loop does not: the loop runs one such call at a
time and the backlog waits inside grpc's core, invisible to every policy; run
such servers with several worker processes (`framework.workers`) and rely on the
deadline check there.  Streaming methods and `grpc.*` services (health,
reflection: a shed health check would take a busy server out of rotation) are
not guarded; `exempt` lists more patterns.

Latency samples come from calls that succeeded or ran out of time; other errors
(a NOT_FOUND answered at once, a caller refused by authentication further in)
say nothing about the server's speed.  Time comes from the injected `Clock`.
"""

from __future__ import annotations

import collections
import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from framework.clock import Clock, SystemClock
from framework.errors import DeadlineExceededError, OverloadedError, code_of
from framework.policy import Call, Enter, Exit, Method, Side

CRITICALITY_KEY = "x-criticality"


class Criticality(enum.IntEnum):
    """How much a call matters when the server must refuse some (higher = kept longer)."""

    SHEDDABLE = 0
    DEFAULT = 1
    CRITICAL = 2


_BY_NAME = {c.name.lower(): c for c in Criticality}


def criticality_of(call: Call) -> Criticality:
    """The criticality a call claims in its `x-criticality` metadata (default: DEFAULT)."""
    value = call.header(CRITICALITY_KEY)
    if value is None:
        return Criticality.DEFAULT
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return _BY_NAME.get(value.strip().lower(), Criticality.DEFAULT)


@dataclass(frozen=True, slots=True)
class SheddingConfig:
    """How the limit moves (see the module docstring) and who may fill how much of it."""

    initial_limit: int = 20
    min_limit: int = 2
    max_limit: int = 1000
    # Latency up to `tolerance` times the best does not shrink the limit.
    tolerance: float = 1.5
    # Weight of each window's new estimate (the rest is the previous limit).
    smoothing: float = 0.2
    # Added to the limit per window: the room to grow and to find more capacity.
    queue_size: float = 4.0
    window_s: float = 0.1
    min_window_samples: int = 10
    # The best latency is the lowest window average over this many windows.
    baseline_windows: int = 300
    default_share: float = 0.9
    sheddable_share: float = 0.5
    retry_after_s: float = 0.05
    # While refusing calls, measure the best latency again at most this often, with
    # the limit at min_limit until `probe_samples` calls finished (see GradientLimit).
    probe_interval_s: float = 30.0
    probe_samples: int = 10
    # Refuse calls whose remaining deadline is shorter than the best latency.
    deadline_check: bool = True
    # Method patterns (as `Method.matches`) never shed, besides grpc.* services.
    exempt: Sequence[str] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.min_limit <= self.initial_limit <= self.max_limit:
            raise ValueError(
                "need 1 <= min_limit <= initial_limit <= max_limit, got "
                f"{self.min_limit}, {self.initial_limit}, {self.max_limit}"
            )
        if self.tolerance < 1:
            raise ValueError(f"tolerance must be >= 1, got {self.tolerance!r}")
        if not 0 < self.smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {self.smoothing!r}")
        if self.queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {self.queue_size!r}")
        if self.window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {self.window_s!r}")
        if self.min_window_samples < 1:
            raise ValueError(f"min_window_samples must be >= 1, got {self.min_window_samples!r}")
        if self.baseline_windows < 1:
            raise ValueError(f"baseline_windows must be >= 1, got {self.baseline_windows!r}")
        if not 0 < self.sheddable_share <= self.default_share <= 1:
            raise ValueError(
                "need 0 < sheddable_share <= default_share <= 1, got "
                f"{self.sheddable_share!r} and {self.default_share!r}"
            )
        if self.probe_interval_s <= 0:
            raise ValueError(f"probe_interval_s must be > 0, got {self.probe_interval_s!r}")
        if self.probe_samples < 1:
            raise ValueError(f"probe_samples must be >= 1, got {self.probe_samples!r}")
        if self.retry_after_s < 0:
            raise ValueError(f"retry_after_s must be >= 0, got {self.retry_after_s!r}")
        object.__setattr__(self, "exempt", tuple(self.exempt))


class GradientLimit:
    """Calls in flight, the current limit, and its re-estimation from latency samples."""

    __slots__ = (
        "_averages",
        "_count",
        "_last_probe",
        "_peak",
        "_probe_samples",
        "_saved_limit",
        "_sum",
        "_window_end",
        "baseline_s",
        "caps",
        "config",
        "in_flight",
        "limit",
        "probe",
        "probes",
        "windows",
    )

    def __init__(self, config: SheddingConfig) -> None:
        self.config = config
        self.limit = float(config.initial_limit)
        self.in_flight = 0
        # the recent best latency (None until the first window closed)
        self.baseline_s: float | None = None
        self.windows = 0  # windows closed so far
        self.probes = 0  # best-latency probes finished so far
        # the probe in progress (its number), or 0; calls admitted during it carry it
        self.probe = 0
        # in flight at which each criticality is refused, indexed by Criticality
        self.caps: tuple[float, float, float] = (0.0, 0.0, 0.0)
        self._averages: collections.deque[float] = collections.deque(maxlen=config.baseline_windows)
        self._window_end: float | None = None
        self._sum = 0.0
        self._count = 0
        self._peak = 0  # most calls in flight at once in this window
        self._last_probe: float | None = None
        self._probe_samples: list[float] = []
        self._saved_limit = self.limit
        self._set_caps()

    def _set_caps(self) -> None:
        limit, c = self.limit, self.config
        self.caps = (limit * c.sheddable_share, limit * c.default_share, limit)

    def admit(self, criticality: Criticality) -> bool:
        """Count the call in if `criticality` may still fill the limit."""
        if self.in_flight >= self.caps[criticality]:
            return False
        self.in_flight += 1
        if self.in_flight > self._peak:
            self._peak = self.in_flight
        return True

    def release(self) -> None:
        self.in_flight -= 1

    def refused(self, now: float) -> None:
        """A call was refused: measure the best latency again if it is due (see `_probe`)."""
        if self.probe or self.baseline_s is None:  # nothing measured yet: nothing to correct
            return
        last = self._last_probe
        if last is None or now - last >= self.config.probe_interval_s:
            self._start_probe(now)

    def sample(self, latency_s: float, now: float, probe: int = 0) -> None:
        """Record one finished call's latency (`probe`: the probe it was admitted in)."""
        if self.probe:
            if probe == self.probe:
                self._probe_samples.append(latency_s)
                if len(self._probe_samples) >= self.config.probe_samples:
                    self._end_probe(now)
            return
        if self._window_end is None:
            self._window_end = now + self.config.window_s
        self._sum += latency_s
        self._count += 1
        if now >= self._window_end and self._count >= self.config.min_window_samples:
            self._close_window(now)

    def _close_window(self, now: float) -> None:
        config = self.config
        average = self._sum / self._count
        peak = self._peak
        self._sum, self._count, self._peak = 0.0, 0, self.in_flight
        self._window_end = now + config.window_s
        self.windows += 1
        self._averages.append(average)
        best = min(self._averages)
        self.baseline_s = best
        if peak < self.limit / 2:
            return  # the load, not the server, limited this window: nothing learnt
        ratio = config.tolerance * best / average if average > 0 else 1.0
        gradient = max(0.5, min(1.0, ratio))
        estimate = self.limit * gradient + config.queue_size
        smoothed = self.limit * (1 - config.smoothing) + estimate * config.smoothing
        self.limit = max(float(config.min_limit), min(float(config.max_limit), smoothed))
        self._set_caps()

    # A server that has been overloaded since it started (or for long) has only ever
    # seen queued calls: its "best" latency is a queued one, and the limit would keep
    # that queue.  So when it refuses calls and has not measured for `probe_interval_s`,
    # it probes, as Envoy's adaptive concurrency filter does: the limit drops to
    # `min_limit` until the calls already in flight have drained and `probe_samples`
    # calls admitted after them have finished; their median latency is the best
    # latency from then on, and the limit returns to where it was.
    def _start_probe(self, now: float) -> None:
        self.probe = self.probes + 1
        self._last_probe = now
        self._probe_samples = []
        self._saved_limit = self.limit
        floor = float(self.config.min_limit)
        self.caps = (floor, floor, floor)

    def _end_probe(self, now: float) -> None:
        ordered = sorted(self._probe_samples)
        best = ordered[len(ordered) // 2]
        self._averages.clear()
        self._averages.append(best)
        self.baseline_s = best
        self.probes += 1
        self.probe = 0
        self._last_probe = now
        self.limit = self._saved_limit
        self._sum, self._count, self._peak = 0.0, 0, self.in_flight
        self._window_end = now + self.config.window_s
        self._set_caps()


class LoadSheddingPolicy:
    """Server policy: refuse at once what the server cannot serve at its best latency."""

    sides = frozenset({Side.SERVER})

    def __init__(
        self,
        config: SheddingConfig | None = None,
        *,
        clock: Clock | None = None,
        criticality: Callable[[Call], Criticality] = criticality_of,
    ) -> None:
        self.config = config or SheddingConfig()
        self.clock = clock or SystemClock()
        self.criticality = criticality
        self.limiter = GradientLimit(self.config)
        # calls refused, by criticality, and for a deadline too short to meet
        self.shed = {c: 0 for c in Criticality}
        self.too_late = 0

    def __repr__(self) -> str:
        return f"LoadSheddingPolicy({self.config!r})"

    @property
    def limit(self) -> int:
        """The concurrency currently admitted (critical calls may fill all of it)."""
        return math.floor(self.limiter.limit)

    @property
    def in_flight(self) -> int:
        return self.limiter.in_flight

    def applies(self, method: Method) -> bool:
        if method.arity.request_streaming or method.arity.response_streaming:
            return False
        if method.service.startswith("grpc."):
            return False
        return not any(method.matches(p) for p in self.config.exempt)

    def bind(self, method: Method) -> Enter | None:
        if not self.applies(method):
            return None
        limiter = self.limiter
        monotonic = self.clock.monotonic
        deadline_check = self.config.deadline_check
        name = method.full_name

        def enter(call: Call) -> Exit | None:
            criticality = Criticality.CRITICAL
            if limiter.in_flight >= limiter.caps[0]:  # some criticality may be refused: read it
                criticality = self.criticality(call)
            best = limiter.baseline_s
            if deadline_check and best is not None:
                remaining = call.time_remaining()
                if remaining is not None and remaining < best:
                    self.too_late += 1
                    raise DeadlineExceededError(
                        f"{name} has {remaining * 1000:.1f} ms left of its deadline but "
                        f"takes at least {best * 1000:.1f} ms here now; refused before any "
                        "work. Give the call a longer deadline",
                        reason="DEADLINE_TOO_SHORT",
                    )
            if not limiter.admit(criticality):
                limiter.refused(monotonic())
                self.shed[criticality] += 1
                raise OverloadedError(
                    f"the server is at its concurrency limit ({limiter.in_flight} calls in "
                    f"flight, limit {limiter.limit:.0f}); {criticality.name.lower()} calls "
                    "are refused until load drops. Retry after the delay given, with backoff",
                    retry_after_s=self.config.retry_after_s,
                    metadata={"criticality": criticality.name.lower()},
                )
            started = monotonic()
            probe = limiter.probe

            def exit_(error: BaseException | None) -> None:
                limiter.release()
                if error is None or code_of(error) is grpc.StatusCode.DEADLINE_EXCEEDED:
                    now = monotonic()
                    limiter.sample(now - started, now, probe)

            return exit_

        return enter
