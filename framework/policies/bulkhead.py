"""Bulkhead: a cap on concurrent calls, so one slow dependency cannot take every slot.

On the server the cap is per method (a slow method cannot starve the others);
on the client it is per channel target (a slow downstream cannot hold every
task of the caller).  A call above the cap is rejected at once with
`BulkheadFullError` (RESOURCE_EXHAUSTED), or, when `max_wait_s > 0`, waits in a
bounded FIFO queue for a slot (never past its own deadline) and is rejected if
none frees in time.  A waiting bulkhead needs an `async` enter; without a wait
the enter is synchronous and costs two integer updates per call.

A freed slot is handed directly to the oldest waiter, so a newcomer cannot
overtake the queue.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass

from framework.config import expect
from framework.errors import BulkheadFullError
from framework.policy import AsyncEnter, Call, Enter, Exit, Method, Side


@dataclass(frozen=True, slots=True)
class BulkheadConfig:
    """`max_concurrency` calls at once; others wait up to `max_wait_s` (0: reject at once)."""

    max_concurrency: int = 64
    max_wait_s: float = 0.0
    max_waiting: int = 1_000
    retry_after_s: float = 0.05

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency!r}")
        if self.max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {self.max_wait_s!r}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting!r}")
        if self.retry_after_s < 0:
            raise ValueError(f"retry_after_s must be >= 0, got {self.retry_after_s!r}")


class Bulkhead:
    """Counts calls in flight for one compartment; `acquire`/`wait` then `release`."""

    __slots__ = ("_waiters", "config", "in_flight", "name", "rejected")

    def __init__(self, config: BulkheadConfig, name: str = "") -> None:
        self.config = config
        self.name = name
        self.in_flight = 0
        self.rejected = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        if self.in_flight < self.config.max_concurrency and not self._waiters:
            self.in_flight += 1
            return True
        return False

    def acquire(self) -> None:
        """Take a slot now or raise `BulkheadFullError`."""
        if not self.try_acquire():
            raise self._full()

    async def wait(self, timeout_s: float | None) -> None:
        """Take a slot, waiting up to `max_wait_s` (and `timeout_s`) in FIFO order."""
        if self.try_acquire():
            return
        limit = self.config.max_wait_s
        if timeout_s is not None:
            limit = min(limit, timeout_s)
        if limit <= 0 or len(self._waiters) >= self.config.max_waiting:
            raise self._full()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), limit)
        except TimeoutError:
            if waiter.done():  # the slot arrived as the wait ran out: keep it
                return
            waiter.cancel()
            raise self._full() from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot we will never use: pass it on
            else:
                waiter.cancel()
            raise

    def release(self, error: BaseException | None = None) -> None:
        """Free a slot: hand it to the oldest live waiter, or give it back (an `Exit`)."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # in_flight is unchanged: the slot moves on
                return
        self.in_flight -= 1

    def _full(self) -> BulkheadFullError:
        self.rejected += 1
        return BulkheadFullError(
            f"too many concurrent calls to {self.name}: the cap is "
            f"{self.config.max_concurrency}; retry shortly or raise max_concurrency",
            retry_after_s=self.config.retry_after_s,
            metadata={"bulkhead": self.name},
        )


class BulkheadPolicy:
    """Server: one bulkhead per method. Client: one per channel target (all its methods)."""

    def __init__(self, config: BulkheadConfig | None = None) -> None:
        if config is not None:
            expect(
                config,
                BulkheadConfig,
                "BulkheadPolicy(config)",
                "BulkheadConfig(max_concurrency=...)",
            )
        self.config = config or BulkheadConfig()
        self._by_target: dict[str, Bulkhead] = {}
        self._by_method: dict[str, Bulkhead] = {}
        self.sides = frozenset(Side)

    def __repr__(self) -> str:
        return f"BulkheadPolicy({self.config!r})"

    def bulkhead(self, call: Call) -> Bulkhead:
        """The compartment a call belongs to."""
        if call.side is Side.SERVER:
            key, table = call.method.full_name, self._by_method
        else:
            key, table = call.target, self._by_target
        found = table.get(key)
        if found is None:
            found = table[key] = Bulkhead(self.config, key)
        return found

    def bind(self, method: Method) -> Enter | AsyncEnter | None:
        server_bulkhead = self._by_method.get(method.full_name)
        if server_bulkhead is None:
            server_bulkhead = self._by_method[method.full_name] = Bulkhead(
                self.config, method.full_name
            )
        by_target = self._by_target
        config = self.config

        def pick(call: Call) -> Bulkhead:
            if call.side is Side.SERVER:
                return server_bulkhead
            found = by_target.get(call.target)
            if found is None:
                found = by_target[call.target] = Bulkhead(config, call.target)
            return found

        if config.max_wait_s > 0:

            async def aenter(call: Call) -> Exit | None:
                bulkhead = pick(call)
                await bulkhead.wait(call.time_remaining())
                return bulkhead.release

            return aenter

        def enter(call: Call) -> Exit | None:
            bulkhead = pick(call)
            bulkhead.acquire()
            return bulkhead.release

        return enter
