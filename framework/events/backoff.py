"""How long a background loop waits before trying again: exponential, capped, jittered.

Every long-running loop of the event store (outbox relay, consumer-group
feeder and checkpoint writer, projection runner, `consume`) treats a failing
database or broker as temporary: it logs, waits `Backoff.next_delay()` and
tries again until it is stopped, and `reset()`s after the first success.  The
jitter (each delay drawn from the upper half of its step) keeps a fleet of
processes from retrying in lock-step after a shared outage.
"""

from __future__ import annotations

import random


class Backoff:
    """Delays `initial_s`, doubling up to `max_s` (each one jittered down by up to half)."""

    __slots__ = ("_attempt", "_random", "initial_s", "max_s")

    def __init__(self, initial_s: float, max_s: float, *, rng: random.Random | None = None) -> None:
        if initial_s <= 0:
            raise ValueError(f"initial_s must be > 0, got {initial_s}")
        if max_s < initial_s:
            raise ValueError(f"max_s must be >= initial_s ({initial_s}), got {max_s}")
        self.initial_s = initial_s
        self.max_s = max_s
        self._attempt = 0
        self._random = rng or random.Random()

    @property
    def attempt(self) -> int:
        """Failures since the last `reset()`."""
        return self._attempt

    def next_delay(self) -> float:
        """The wait before the next try (and count one more failure)."""
        ceiling = min(self.max_s, self.initial_s * 2 ** min(self._attempt, 32))
        self._attempt += 1
        return self._random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        """The loop worked again: the next failure starts from `initial_s`."""
        self._attempt = 0
