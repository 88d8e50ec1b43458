"""The multicallables of a `BalancedChannel`: pick an instance per call, retry elsewhere.

A call to an idempotent method (the contract's `idempotent` option) that fails
before any response is tried on another instance, up to `max_attempts`, within
the call's deadline and while the channel's retry budget (budget.py) allows.
The deadline is the caller's timeout, else the method's `timeout_s` option,
lowered to the remaining time of the inbound call being handled; waiting for
the registry's first view counts against it too.  Request-streaming calls are
never retried (their request iterator cannot be replayed).  Unary calls return
an awaitable and streaming calls an async iterator, which is what generated
stubs' callers use; grpc.aio's call-object extras (`initial_metadata()`,
`cancel()`) are not offered.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import grpc
import grpc.aio

from framework.errors import FrameworkError, UnavailableError, code_of, from_dependency
from framework.policy import Method, current_call
from framework.registry.balancer import Endpoint, Pool
from framework.registry.budget import RetryTokens


class EndpointSource(Protocol):
    """What the multicallables need of their channel (a `BalancedChannel`): the pool
    that records outcomes, the attempt limit, the retry budget, and a pick per call."""

    @property
    def pool(self) -> Pool: ...

    @property
    def max_attempts(self) -> int: ...

    @property
    def retry_tokens(self) -> RetryTokens | None: ...

    async def pick(
        self, exclude: Sequence[Endpoint] = (), deadline: float | None = None
    ) -> Endpoint: ...


# Outcomes after which an idempotent call is tried on another instance: the instance
# is unreachable or refusing, or it stopped and cancelled the call (our own task being
# cancelled raises asyncio.CancelledError instead and is never retried).
_RETRY_ON = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


class Multicallable:
    __slots__ = ("_attempts", "_deserializer", "_method", "_owner", "_serializer", "_timeout_s")
    kind = ""

    def __init__(
        self, owner: EndpointSource, method: str, serializer: Any, deserializer: Any
    ) -> None:
        self._owner = owner
        self._method = method
        self._serializer = serializer
        self._deserializer = deserializer
        policy = Method.resolve(method).policy
        self._attempts = owner.max_attempts if policy.idempotent else 1
        self._timeout_s: float | None = policy.timeout_s or None

    def _target(self, endpoint: Endpoint) -> Any:
        return endpoint.callable(self.kind, self._method, self._serializer, self._deserializer)

    def _deadline(self, timeout: float | None) -> float | None:
        """Monotonic deadline of the whole call (every attempt and the wait for a view)."""
        if timeout is None:
            timeout = self._timeout_s
        inbound = current_call()
        if inbound is not None and not inbound.finished:
            remaining = inbound.time_remaining()
            if remaining is not None:
                timeout = remaining if timeout is None else min(timeout, remaining)
        return None if timeout is None else time.monotonic() + timeout

    async def _next(
        self, tried: list[Endpoint], deadline: float | None, last: BaseException | None
    ) -> Endpoint:
        """The instance for the next attempt.  When every instance was tried, the caller
        gets the last attempt's own failure (its code, reason and details: what went
        wrong), not the balancer's NO_INSTANCE."""
        try:
            return await self._owner.pick(tried, deadline)
        except UnavailableError:
            if last is None:
                raise
            raise last from None

    def _succeeded(self, endpoint: Endpoint) -> None:
        owner = self._owner
        owner.pool.observe(endpoint, grpc.StatusCode.OK)
        tokens = owner.retry_tokens
        if tokens is not None:
            tokens.succeeded()

    def _failed(
        self,
        error: BaseException,
        endpoint: Endpoint,
        tried: list[Endpoint],
        deadline: float | None,
    ) -> bool:
        """Record the failure; whether to retry elsewhere (code, attempts, time, budget)."""
        code = code_of(error)
        owner = self._owner
        # a failure the instance passed on from its own dependency: the instance answered
        owner.pool.observe(endpoint, grpc.StatusCode.OK if from_dependency(error) else code)
        tried.append(endpoint)
        if code not in _RETRY_ON:
            return False
        tokens = owner.retry_tokens
        if tokens is not None:
            tokens.failed()
        return (
            len(tried) < self._attempts
            and (deadline is None or time.monotonic() < deadline)
            and (tokens is None or tokens.allow_retry())
        )


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.001, deadline - time.monotonic())


class UnaryUnary(Multicallable):
    __slots__ = ()
    kind = "unary_unary"

    def __call__(self, request: Any, *, timeout: float | None = None, **kwargs: Any) -> Any:
        return self._invoke(request, timeout, kwargs)

    async def _invoke(self, request: Any, timeout: float | None, kwargs: dict[str, Any]) -> Any:
        deadline = self._deadline(timeout)
        tried: list[Endpoint] = []
        last: BaseException | None = None
        while True:
            endpoint = await self._next(tried, deadline, last)
            endpoint.outstanding += 1
            try:
                response = await self._target(endpoint)(
                    request, timeout=_remaining(deadline), **kwargs
                )
            except (grpc.aio.AioRpcError, FrameworkError) as error:
                if self._failed(error, endpoint, tried, deadline):
                    last = error
                    continue
                raise
            finally:
                endpoint.outstanding -= 1
            self._succeeded(endpoint)
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
        deadline = self._deadline(timeout)
        tried: list[Endpoint] = []
        last: BaseException | None = None
        while True:
            endpoint = await self._next(tried, deadline, last)
            received = False
            endpoint.outstanding += 1
            try:
                call = self._target(endpoint)(request, timeout=_remaining(deadline), **kwargs)
                async for response in call:
                    received = True
                    yield response
            except (grpc.aio.AioRpcError, FrameworkError) as error:
                # record the failure always; retry only if nothing was streamed yet
                if self._failed(error, endpoint, tried, deadline) and not received:
                    last = error
                    continue
                raise
            finally:
                endpoint.outstanding -= 1
            self._succeeded(endpoint)
            return


class StreamUnary(Multicallable):
    """Request streams cannot be replayed: one attempt, on one picked instance."""

    __slots__ = ()
    kind = "stream_unary"

    def __call__(self, request_iterator: Any = None, **kwargs: Any) -> Any:
        return self._invoke(request_iterator, kwargs)

    async def _invoke(self, request_iterator: Any, kwargs: dict[str, Any]) -> Any:
        deadline = self._deadline(kwargs.pop("timeout", None))
        endpoint = await self._owner.pick((), deadline)
        endpoint.outstanding += 1
        try:
            response = await self._target(endpoint)(
                request_iterator, timeout=_remaining(deadline), **kwargs
            )
        except (grpc.aio.AioRpcError, FrameworkError) as error:
            self._failed(error, endpoint, [], deadline)
            raise
        finally:
            endpoint.outstanding -= 1
        self._succeeded(endpoint)
        return response


class StreamStream(Multicallable):
    __slots__ = ()
    kind = "stream_stream"

    def __call__(self, request_iterator: Any = None, **kwargs: Any) -> AsyncIterator[Any]:
        return self._invoke(request_iterator, kwargs)

    async def _invoke(self, request_iterator: Any, kwargs: dict[str, Any]) -> AsyncIterator[Any]:
        deadline = self._deadline(kwargs.pop("timeout", None))
        endpoint = await self._owner.pick((), deadline)
        endpoint.outstanding += 1
        try:
            call = self._target(endpoint)(request_iterator, timeout=_remaining(deadline), **kwargs)
            async for response in call:
                yield response
        except (grpc.aio.AioRpcError, FrameworkError) as error:
            self._failed(error, endpoint, [], deadline)
            raise
        finally:
            endpoint.outstanding -= 1
        self._succeeded(endpoint)
