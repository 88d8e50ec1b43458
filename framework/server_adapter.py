"""The server-side adapter of the policy chain: handlers wrapped at registration.

Generated `add_..._to_server` functions register a servicer's method handlers on a
`Registrar` standing in for the grpc server; each handler is wrapped with the chain
bound once for its method.  Both of grpc's lookup paths (registered and generic
handlers) get the wrapped handlers, so no call bypasses the chain.  Per call the
wrapper builds a `Call`, marks it current, runs the enters, the servicer code and
the exits, and sends the status the error mapping chose.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
import grpc.aio

from framework.errors import CallCancelledError, DeadlineExceededError, error_class
from framework.policy import (
    Arity,
    BoundChain,
    Call,
    Chain,
    Method,
    Side,
    reset_current_call,
    run_exits,
    set_current_call,
)

_Handler = Callable[..., Any]


class Registrar:
    """Stands in for the grpc server while generated code registers a servicer."""

    def __init__(self, chain: Chain) -> None:
        self.chain = chain
        self.registered: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
        self.generic: list[grpc.GenericRpcHandler] = []
        self._raw_generic: list[grpc.GenericRpcHandler] = []

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.registered[service] = {
            name: wrap_handler(handler, self.chain, f"/{service}/{name}")
            for name, handler in handlers.items()
        }
        # generated code also passes a generic handler for the same methods: drop it
        self.generic = [g for g in self.generic if _generic_service(g) != service]

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        for handler in handlers:
            if _generic_service(handler) in self.registered:
                continue
            self.generic.append(_WrappedGeneric(handler, self.chain))


def _generic_service(handler: grpc.GenericRpcHandler) -> str | None:
    name = getattr(handler, "service_name", None)
    return name() if callable(name) else None


class _WrappedGeneric(grpc.GenericRpcHandler):
    """A generic handler from older generated code: wrap each method on first lookup."""

    def __init__(self, inner: grpc.GenericRpcHandler, chain: Chain) -> None:
        self._inner = inner
        self._chain = chain
        self._cache: dict[str, grpc.RpcMethodHandler] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        wrapped = self._cache.get(method)
        if wrapped is None:
            handler = self._inner.service(handler_call_details)
            if handler is None:
                return None  # unknown names are not cached: a client cannot grow the cache
            wrapped = self._cache[method] = wrap_handler(handler, self._chain, method)
        return wrapped


def wrap_handler(handler: grpc.RpcMethodHandler, chain: Chain, full_name: str) -> Any:
    """Return `handler` with the chain bound for its method around the servicer code."""
    arity = Arity.of(handler.request_streaming, handler.response_streaming)
    bound = chain.bind(Method.resolve(full_name, arity))
    if arity is Arity.UNARY_UNARY:
        return handler._replace(unary_unary=_unary_response(bound, handler.unary_unary, True))
    if arity is Arity.STREAM_UNARY:
        return handler._replace(stream_unary=_unary_response(bound, handler.stream_unary, False))
    if arity is Arity.UNARY_STREAM:
        return handler._replace(unary_stream=_stream_response(bound, handler.unary_stream, True))
    return handler._replace(stream_stream=_stream_response(bound, handler.stream_stream, False))


def _observed(error: BaseException, context: Any) -> BaseException:
    """What the exits see: the outcome as the caller will see it."""
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return DeadlineExceededError("the caller's deadline passed before the call finished")
        return CallCancelledError("the caller cancelled the call before it finished")
    if isinstance(error, grpc.aio.AbortError):  # the handler called context.abort(code, ...)
        code = context.code() or grpc.StatusCode.UNKNOWN
        return error_class(code.name, code)(str(context.details() or ""))
    return error


async def _fail(
    context: grpc.aio.ServicerContext[Any, Any], call: Call, error: BaseException | None = None
) -> None:
    """Send the status the error mapping chose; a cancelled call has no one to tell."""
    status = call.status
    if status is not None and not isinstance(error, asyncio.CancelledError | GeneratorExit):
        await context.abort(status.code, status.message, status.trailing_metadata)


async def _enter(bound: BoundChain, call: Call, context: Any) -> list[Any]:
    """Run the enters; a rejection has already been seen by the exits, so send its status."""
    try:
        return await bound.aenter(call) if bound.is_async else bound.enter(call)
    except BaseException as error:
        await _fail(context, call, error)
        raise


def _begin(method: Method, context: Any, request: Any) -> tuple[Call, object]:
    call = Call(method, Side.SERVER, context=context, request=request)
    return call, set_current_call(call)


def _done(call: Call, token: object) -> None:
    """The inbound call is over: tasks it spawned stop inheriting its deadline."""
    call.finished = True
    with contextlib.suppress(ValueError):  # an async generator closed from another context
        reset_current_call(token)


async def _checked(requests: AsyncIterator[Any], checks: tuple[Any, ...]) -> AsyncIterator[Any]:
    """A streamed request with the chain's per-message checks applied to each message."""
    async for message in requests:
        for check in checks:
            check(message)
        yield message


def _with_checks(inner: _Handler, bound: BoundChain, unary_request: bool) -> _Handler:
    checks = bound.message_checks
    if unary_request or not checks:
        return inner

    def checked(requests: Any, context: Any) -> Any:
        return inner(_checked(requests, checks), context)

    return checked


def _unary_response(bound: BoundChain, inner: _Handler, unary_request: bool) -> _Handler:
    method = bound.method
    inner = _with_checks(inner, bound, unary_request)

    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        call, token = _begin(method, context, request if unary_request else None)
        try:
            exits = await _enter(bound, call, context)
            try:
                response = inner(request, context)
                if inspect.isawaitable(response):
                    response = await response
            except BaseException as error:
                run_exits(exits, _observed(error, context))
                await _fail(context, call, error)
                raise
            run_exits(exits, None)
            return response
        finally:
            _done(call, token)

    return handle


async def _as_async(items: Any) -> AsyncIterator[Any]:
    """Responses from a sync iterable or an async iterable, as one async iterator."""
    if hasattr(items, "__aiter__"):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


def _stream_response(bound: BoundChain, inner: _Handler, unary_request: bool) -> _Handler:
    """Streamed responses: async generators, sync generators, returned iterables, or
    handlers that write with `context.write()` all work; exits run when the stream ends."""
    method = bound.method
    inner = _with_checks(inner, bound, unary_request)

    async def stream(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        call, token = _begin(method, context, request if unary_request else None)
        try:
            exits = await _enter(bound, call, context)
            try:
                result = inner(request, context)
                if inspect.isawaitable(result):
                    result = await result  # write-based handler (returns None) or a coroutine
                if result is not None:
                    async for item in _as_async(result):
                        yield item
            except BaseException as error:
                run_exits(exits, _observed(error, context))
                await _fail(context, call, error)
                raise
            run_exits(exits, None)
        finally:
            _done(call, token)

    return stream
