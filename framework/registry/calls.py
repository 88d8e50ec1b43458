"""The multicallables of a `BalancedChannel`: pick an instance per call, retry elsewhere.

A call to an idempotent method (the contract's `idempotent` option) that fails
before any response is tried on another instance, up to `max_attempts` and
within the caller's timeout.  Request-streaming calls are never retried (their
request iterator cannot be replayed).  Unary calls return an awaitable and
streaming calls an async iterator, which is what generated stubs' callers use;
grpc.aio's call-object extras (`initial_metadata()`, `cancel()`) are not offered.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import grpc
import grpc.aio

from framework.errors import FrameworkError, code_of
from framework.policy import Method
from framework.registry.balancer import Endpoint, Pool


class EndpointSource(Protocol):
    """What the multicallables need of their channel (a `BalancedChannel`): the pool
    that records outcomes, the attempt limit, and a pick per call."""

    @property
    def pool(self) -> Pool: ...

    @property
    def max_attempts(self) -> int: ...

    async def pick(self, exclude: Sequence[Endpoint] = ()) -> Endpoint: ...


# Outcomes after which an idempotent call is tried on another instance: the instance
# is unreachable or refusing, or it stopped and cancelled the call (our own task being
# cancelled raises asyncio.CancelledError instead and is never retried).
_RETRY_ON = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


class Multicallable:
    __slots__ = ("_attempts", "_deserializer", "_method", "_owner", "_serializer")
    kind = ""

    def __init__(
        self, owner: EndpointSource, method: str, serializer: Any, deserializer: Any
    ) -> None:
        self._owner = owner
        self._method = method
        self._serializer = serializer
        self._deserializer = deserializer
        idempotent = Method.resolve(method).policy.idempotent
        self._attempts = owner.max_attempts if idempotent else 1

    def _target(self, endpoint: Endpoint) -> Any:
        return endpoint.callable(self.kind, self._method, self._serializer, self._deserializer)


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.001, deadline - time.monotonic())


def _retry_allowed(
    multicallable: Multicallable,
    error: BaseException,
    endpoint: Endpoint,
    tried: list[Endpoint],
    deadline: float | None,
) -> bool:
    """Record the failure on the instance; retry elsewhere if the code, attempts and time allow."""
    code = code_of(error)
    multicallable._owner.pool.observe(endpoint, code)
    tried.append(endpoint)
    return (
        code in _RETRY_ON
        and len(tried) < multicallable._attempts
        and (deadline is None or time.monotonic() < deadline)
    )


class UnaryUnary(Multicallable):
    __slots__ = ()
    kind = "unary_unary"

    def __call__(self, request: Any, *, timeout: float | None = None, **kwargs: Any) -> Any:
        return self._invoke(request, timeout, kwargs)

    async def _invoke(self, request: Any, timeout: float | None, kwargs: dict[str, Any]) -> Any:
        owner = self._owner
        deadline = None if timeout is None else time.monotonic() + timeout
        tried: list[Endpoint] = []
        while True:
            endpoint = await owner.pick(tried)
            endpoint.outstanding += 1
            try:
                response = await self._target(endpoint)(
                    request, timeout=_remaining(deadline), **kwargs
                )
            except (grpc.aio.AioRpcError, FrameworkError) as error:
                if _retry_allowed(self, error, endpoint, tried, deadline):
                    continue
                raise
            finally:
                endpoint.outstanding -= 1
            owner.pool.observe(endpoint, grpc.StatusCode.OK)
            return response


class UnaryStream(Multicallable):
    __slots__ = ()
    kind = "unary_stream"

    def __call__(
        self, request: Any, *, timeout: float | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        return self._invoke(request, timeout, kwargs)

    async def _invoke(
        self, request: Any, timeout: float | None, kwargs: dict[str, Any]
    ) -> AsyncIterator[Any]:
        owner = self._owner
        deadline = None if timeout is None else time.monotonic() + timeout
        tried: list[Endpoint] = []
        while True:
            endpoint = await owner.pick(tried)
            received = False
            endpoint.outstanding += 1
            try:
                call = self._target(endpoint)(request, timeout=_remaining(deadline), **kwargs)
                async for response in call:
                    received = True
                    yield response
            except (grpc.aio.AioRpcError, FrameworkError) as error:
                # record the failure always; retry only if nothing was streamed yet
                if _retry_allowed(self, error, endpoint, tried, deadline) and not received:
                    continue
                raise
            finally:
                endpoint.outstanding -= 1
            owner.pool.observe(endpoint, grpc.StatusCode.OK)
            return


class StreamUnary(Multicallable):
    """Request streams cannot be replayed: one attempt, on one picked instance."""

    __slots__ = ()
    kind = "stream_unary"

    def __call__(self, request_iterator: Any = None, **kwargs: Any) -> Any:
        return self._invoke(request_iterator, kwargs)

    async def _invoke(self, request_iterator: Any, kwargs: dict[str, Any]) -> Any:
        owner = self._owner
        endpoint = await owner.pick()
        endpoint.outstanding += 1
        try:
            response = await self._target(endpoint)(request_iterator, **kwargs)
        except (grpc.aio.AioRpcError, FrameworkError) as error:
            owner.pool.observe(endpoint, code_of(error))
            raise
        finally:
            endpoint.outstanding -= 1
        owner.pool.observe(endpoint, grpc.StatusCode.OK)
        return response


class StreamStream(Multicallable):
    __slots__ = ()
    kind = "stream_stream"

    def __call__(self, request_iterator: Any = None, **kwargs: Any) -> AsyncIterator[Any]:
        return self._invoke(request_iterator, kwargs)

    async def _invoke(self, request_iterator: Any, kwargs: dict[str, Any]) -> AsyncIterator[Any]:
        owner = self._owner
        endpoint = await owner.pick()
        endpoint.outstanding += 1
        try:
            async for response in self._target(endpoint)(request_iterator, **kwargs):
                yield response
        except (grpc.aio.AioRpcError, FrameworkError) as error:
            owner.pool.observe(endpoint, code_of(error))
            raise
        finally:
            endpoint.outstanding -= 1
        owner.pool.observe(endpoint, grpc.StatusCode.OK)
