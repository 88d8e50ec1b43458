"""One thread that runs blocking calls in order for coroutines (cheaper than an executor).

`loop.run_in_executor` wraps every call in a `concurrent.futures.Future`
chained to an asyncio future; for a store that hops to its thread on every
call, that costs about as much as a small SQLite commit.  This thread takes
plain (function, future, loop) items from a `SimpleQueue` and hands results
back with one `call_soon_threadsafe`, halving the cost of a hop.  Calls run
strictly one after another, in submission order.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from functools import partial
from queue import SimpleQueue
from typing import Any, TypeVar

T = TypeVar("T")


class _Callback:
    __slots__ = ("done",)

    def __init__(self, done: Callable[[Any, BaseException | None], None]) -> None:
        self.done = done


_Item = tuple[Callable[[], Any], "asyncio.Future[Any] | _Callback", asyncio.AbstractEventLoop]


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class DedicatedThread:
    """A daemon thread running submitted functions in order; `await run(fn)`."""

    def __init__(self, name: str) -> None:
        self._queue: SimpleQueue[_Item | None] = SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._closed = False

    def _main(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, target, loop = item
            deliver = target.done if isinstance(target, _Callback) else partial(_resolve, target)
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                loop.call_soon_threadsafe(deliver, None, exc)
            else:
                loop.call_soon_threadsafe(deliver, result, None)

    def submit(
        self, fn: Callable[[], T], done: Callable[[T | None, BaseException | None], None]
    ) -> None:
        """Run `fn()` on the thread; then `done(result, error)` runs on the caller's loop."""
        if self._closed:
            raise RuntimeError("the thread is stopped; no more calls are accepted")
        loop = asyncio.get_running_loop()
        self._queue.put((fn, _Callback(done), loop))

    async def run(self, fn: Callable[[], T]) -> T:
        """Run `fn()` on the thread after everything submitted before it; return its result."""
        return await self.schedule(fn)

    def schedule(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Queue `fn()` now (before this returns) and give the future of its result.

        For clean-up that must be ordered before anything queued later, even
        when the caller is being cancelled and cannot wait for it.
        """
        if self._closed:
            raise RuntimeError("the thread is stopped; no more calls are accepted")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((fn, future, loop))
        return future

    async def stop(self) -> None:
        """Finish the calls already submitted, then end the thread."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            await asyncio.to_thread(self._thread.join)
