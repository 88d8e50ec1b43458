"""In-process wake-up for readers waiting on new appends (`wait_for_events`).

Free when nobody waits: an append only resolves the futures of current
waiters, so the hot path allocates nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


class AppendSignal:
    """Appends call `notify()`; readers `await wait_past(...)` with a bounded wait."""

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: set[asyncio.Future[None]] = set()

    def notify(self) -> None:
        if self._waiters:
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._waiters.clear()

    async def wait_past(
        self, after_position: int, timeout_s: float, head: Callable[[], Awaitable[int]]
    ) -> bool:
        """True once `head()` passes `after_position`, waiting at most about `timeout_s`."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)  # registered before the check: no lost wake-up
        try:
            if await head() > after_position:
                return True
            try:
                await asyncio.wait_for(waiter, timeout_s)
            except TimeoutError:
                pass
            return await head() > after_position
        finally:
            self._waiters.discard(waiter)
