"""The server-side adapter of the policy chain: one method table behind one generic handler.

Generated `add_..._to_server` functions register a servicer's method handlers on a
`Registrar` standing in for the grpc server; the server puts them in its
`MethodTable`, each wrapped with the chain bound once for its method.  grpc sees
one generic handler whose lookup is one dictionary read, so the cost of a call
does not grow with the number of methods served (grpc's registered-method path
does).  Generic handlers a user adds are asked for names the table does not know;
what they answer is wrapped too, so no call bypasses the chain.

Per call the wrapper builds a `Call`, marks it current, runs the enters, the
servicer code and the exits.  The outcome is mapped first (the server's
`ErrorMappingPolicy.outcome`), then every exit sees the mapped outcome, then the
status is sent: access log, metrics and spans record what the caller sees.
Requests of unary-request methods are parsed here, not by grpc, so malformed bytes
go through the chain and the error mapping (INVALID_ARGUMENT) like any error.

Sync servicer methods and sync generators run in the server's executor with the
call's context variables, as grpc.aio runs them; a blocking handler does not stall
the event loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import Executor
from typing import Any

import grpc
import grpc.aio

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
# What the caller sees for an outcome (None: OK); sets `call.status` when the adapter
# must send that status itself (not for cancellations, aborts or context.set_code()).
Outcome = Callable[[Call, BaseException | None], BaseException | None]
_END = object()
_GENERIC_CACHE_LIMIT = 10_000  # names answered by user generic handlers, wrapped and kept


class Serving:
    """What every wrapped handler of one server shares.

    `outcome` maps outcomes, `executor` runs sync handlers (set when the server
    starts), `draining` is set when the server starts draining (handlers of
    long-lived streams can end themselves; see `framework.server.drain_signal`),
    `in_flight` counts calls whose exits have not run yet, and `started` every call
    ever started (a drain hook sees from it whether clients still send calls).
    """

    __slots__ = ("_idle", "draining", "executor", "in_flight", "outcome", "started")

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.executor: Executor | None = None
        self.draining = asyncio.Event()
        self.in_flight = 0
        self.started = 0
        self._idle: asyncio.Event | None = None

    def _finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no call is in flight (every exit has run); False on timeout."""
        if self.in_flight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return self.in_flight == 0
        finally:
            self._idle = None
        return True


class Registrar:
    """Stands in for the grpc server while generated code registers a servicer.

    Collects the raw handlers: `registered` by service, and the generic handlers
    that are not grpc's own dictionary handlers (those are read into `registered`).
    """

    def __init__(self) -> None:
        self.registered: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
        self.generic: list[grpc.GenericRpcHandler] = []

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.registered.setdefault(service, {}).update(handlers)

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        for handler in handlers:
            methods = _dictionary_methods(handler)
            if methods is None:
                self.generic.append(handler)
                continue
            # grpc.method_handlers_generic_handler(...): generated code passes one for the
            # same methods it registers, and users add methods to a service with one;
            # explicitly registered handlers win over these
            for full_name, method_handler in methods.items():
                service, _, name = full_name.lstrip("/").partition("/")
                self.registered.setdefault(service, {}).setdefault(name, method_handler)


def _dictionary_methods(handler: object) -> dict[str, grpc.RpcMethodHandler] | None:
    """The {"/pkg.Service/Method": handler} of grpc's dictionary generic handler."""
    methods = getattr(handler, "_method_handlers", None)
    if isinstance(methods, dict) and all(
        isinstance(k, str) and k.startswith("/") and k.count("/") == 2 for k in methods
    ):
        return methods
    return None


class MethodTable(grpc.GenericRpcHandler):
    """Every method of a server, wrapped with its bound chain, behind one lookup."""

    def __init__(self, chain: Chain, serving: Serving) -> None:
        self.chain = chain
        self.serving = serving
        self._methods: dict[str, grpc.RpcMethodHandler] = {}
        self._generic: list[grpc.GenericRpcHandler] = []
        self._from_generic = 0

    def add(self, registrar: Registrar) -> None:
        for service, handlers in registrar.registered.items():
            for name, handler in handlers.items():
                full_name = f"/{service}/{name}"
                self._methods[full_name] = wrap_handler(
                    handler, self.chain, full_name, self.serving
                )
        self._generic.extend(registrar.generic)

    def __contains__(self, full_name: str) -> bool:
        return full_name in self._methods

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = self._methods.get(handler_call_details.method)
        if handler is not None or not self._generic:
            return handler
        return self._ask_generic(handler_call_details)

    def _ask_generic(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        """A user's generic handler answers names the table does not know: wrapped too."""
        full_name = handler_call_details.method
        for generic in self._generic:
            handler = generic.service(handler_call_details)
            if handler is None:
                continue
            wrapped = wrap_handler(handler, self.chain, full_name, self.serving)
            if self._from_generic < _GENERIC_CACHE_LIMIT:  # unknown names are never kept
                self._from_generic += 1
                self._methods[full_name] = wrapped
            return wrapped
        return None


def wrap_handler(
    handler: grpc.RpcMethodHandler, chain: Chain, full_name: str, serving: Serving
) -> Any:
    """Return `handler` with the chain bound for its method around the servicer code."""
    arity = Arity.of(handler.request_streaming, handler.response_streaming)
    bound = chain.bind(Method.resolve(full_name, arity))
    inner = getattr(handler, arity.value)
    if not arity.request_streaming:
        # parsed in the wrapper, inside the chain: malformed bytes are the caller's error
        decode = handler.request_deserializer
        handler = handler._replace(request_deserializer=None)
    else:
        decode = None
    if arity.response_streaming:
        wrapped = _stream_response(bound, inner, serving, decode)
    else:
        wrapped = _unary_response(bound, inner, serving, decode)
    return handler._replace(**{arity.value: wrapped})


def _is_coroutine(function: _Handler) -> bool:
    """`async def` (or an object with an `async def __call__`): calling it makes a coroutine."""
    call = getattr(function, "__call__", None)  # noqa: B004 - objects with an async __call__
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(call)


def _is_async(function: _Handler) -> bool:
    call = getattr(function, "__call__", None)  # noqa: B004 - objects with an async __call__
    return any(
        check(f)
        for f in (function, call)
        for check in (inspect.iscoroutinefunction, inspect.isasyncgenfunction)
    )


async def _send(call: Call) -> None:
    """Send the status the error mapping chose (raises grpc's AbortError), if any."""
    status = call.status
    context = call.context
    if status is not None and context is not None and not context.done():
        await context.abort(status.code, status.message, status.trailing_metadata)


def _begin(
    serving: Serving, method: Method, context: Any, request: Any, decode: Any
) -> tuple[Call, object]:
    if decode is None:
        call = Call(method, Side.SERVER, context=context, request=request)
    else:
        call = Call(method, Side.SERVER, context=context, raw_request=request, decode=decode)
    call.drain = serving.draining
    serving.in_flight += 1
    serving.started += 1
    return call, set_current_call(call)


def _done(serving: Serving, call: Call, token: object) -> None:
    """The inbound call is over: tasks it spawned stop inheriting its deadline."""
    call.finished = True
    serving._finished()
    try:
        reset_current_call(token)
    except ValueError:  # an async generator closed from another context
        pass


async def _enter(bound: BoundChain, call: Call, outcome: Outcome) -> list[Any]:
    """Run the enters; a rejection is mapped, seen by the exits entered, then sent."""
    try:
        return await bound.aenter(call, outcome) if bound.is_async else bound.enter(call, outcome)
    except BaseException:
        await _send(call)
        raise


# ------------------------------------------------------------------ sync handlers


class SyncContext:
    """The servicer context a sync handler gets (it runs in a worker thread), as
    grpc.aio gives one: `abort()` and `send_initial_metadata()` block until done on
    the event loop; `add_callback()` callbacks run when the call ends."""

    __slots__ = ("_context", "_loop", "callbacks")

    def __init__(self, context: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._context = context
        self._loop = loop
        self.callbacks: list[Callable[[], None]] = []

    def abort(self, code: Any, details: str = "", trailing_metadata: Any = ()) -> None:
        coro = self._context.abort(code, details, tuple(trailing_metadata))
        asyncio.run_coroutine_threadsafe(coro, self._loop).result()  # raises AbortError

    def abort_with_status(self, status: Any) -> None:
        self.abort(status.code, status.details, status.trailing_metadata)

    def send_initial_metadata(self, metadata: Any) -> None:
        coro = self._context.send_initial_metadata(metadata)
        asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self.callbacks.append(callback)
        return True

    def is_active(self) -> bool:
        return not self._context.done()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _blocking(requests: AsyncIterator[Any], loop: asyncio.AbstractEventLoop) -> Iterator[Any]:
    """A streamed request as the blocking iterator a sync handler reads in its thread."""
    while True:
        future = asyncio.run_coroutine_threadsafe(_next(requests), loop)
        message = future.result()
        if message is _END:
            return
        yield message


async def _next(requests: AsyncIterator[Any]) -> Any:
    return await anext(requests, _END)


def _next_item(items: Iterator[Any]) -> Any:
    return next(items, _END)


class _SyncRun:
    """Runs one sync handler in the executor with a copy of the call's context."""

    __slots__ = ("context", "loop", "serving", "vars")

    def __init__(self, serving: Serving, context: Any) -> None:
        self.serving = serving
        self.loop = asyncio.get_running_loop()
        self.context = SyncContext(context, self.loop)
        self.vars = contextvars.copy_context()  # current_call(), spans, principal

    async def __call__(self, function: Callable[..., Any], *args: Any) -> Any:
        return await self.loop.run_in_executor(
            self.serving.executor, self.vars.run, function, *args
        )

    def callbacks(self) -> None:
        for callback in self.context.callbacks:
            callback()


# ------------------------------------------------------------------ request streams


async def _incoming(requests: Any, checks: tuple[Any, ...]) -> AsyncIterator[Any]:
    """A streamed request with the chain's per-message checks applied to each message."""
    async for message in requests:
        for check in checks:
            check(message)
        yield message
    # grpc.aio reports a client's cancellation as a normal end of the request stream;
    # the cancellation itself arrives with the same event: let it land first
    await asyncio.sleep(0)


class CheckedContext:
    """The servicer context of a streamed-request method: `await context.read()` goes
    through the same per-message checks as the request iterator."""

    __slots__ = ("_checks", "_context")

    def __init__(self, context: Any, checks: tuple[Any, ...]) -> None:
        self._context = context
        self._checks = checks

    async def read(self) -> Any:
        message = await self._context.read()
        if message is grpc.aio.EOF:
            await asyncio.sleep(0)  # as in _incoming: a cancellation reads as EOF
            return message
        for check in self._checks:
            check(message)
        return message

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


# ------------------------------------------------------------------ the wrappers


def _unary_response(bound: BoundChain, inner: _Handler, serving: Serving, decode: Any) -> _Handler:
    method = bound.method
    outcome = serving.outcome
    streamed = method.arity.request_streaming
    checks = bound.message_checks
    sync = not _is_async(inner)
    is_async = bound.is_async
    coroutine = _is_coroutine(inner)

    async def handle(request: Any, context: Any) -> Any:
        grpc_context = context
        call, token = _begin(serving, method, context, request, decode)
        try:
            try:  # _enter(), inline: one coroutine fewer per call
                if is_async:
                    exits = await bound.aenter(call, outcome)
                else:
                    exits = bound.enter(call, outcome)
            except BaseException:
                await _send(call)
                raise
            try:
                if streamed:
                    request = _incoming(request, checks)
                    context = CheckedContext(grpc_context, checks)
                else:
                    request = call.request
                if sync:
                    run = _SyncRun(serving, context)
                    if streamed:
                        request = _blocking(request, run.loop)
                    try:
                        response = await run(inner, request, run.context)
                    finally:
                        run.callbacks()
                elif coroutine:
                    response = await inner(request, context)
                else:
                    response = inner(request, context)
                    if inspect.isawaitable(response):
                        response = await response
            except BaseException as error:
                run_exits(exits, outcome(call, error))
                await _send(call)
                raise
            run_exits(exits, None if grpc_context.code() is None else outcome(call, None))
            return response
        finally:
            _done(serving, call, token)

    return handle


async def _as_async(items: Any, run: _SyncRun | None) -> AsyncIterator[Any]:
    """Responses from an async iterable, or a sync one read in the executor."""
    if hasattr(items, "__aiter__"):
        async for item in items:
            yield item
        return
    iterator = iter(items)
    while True:
        item = next(iterator, _END) if run is None else await run(_next_item, iterator)
        if item is _END:
            return
        yield item


def _stream_response(bound: BoundChain, inner: _Handler, serving: Serving, decode: Any) -> _Handler:
    """Streamed responses: async generators, sync generators, returned iterables, or
    handlers that write with `context.write()` all work; exits run when the stream ends."""
    method = bound.method
    outcome = serving.outcome
    streamed = method.arity.request_streaming
    checks = bound.message_checks
    sync = not _is_async(inner)

    async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
        grpc_context = context
        call, token = _begin(serving, method, context, request, decode)
        try:
            exits = await _enter(bound, call, outcome)
            try:
                if streamed:
                    request = _incoming(request, checks)
                    context = CheckedContext(grpc_context, checks)
                else:
                    request = call.request
                run: _SyncRun | None = None
                if sync:
                    run = _SyncRun(serving, context)
                    if streamed:
                        request = _blocking(request, run.loop)
                    try:
                        result = await run(inner, request, run.context)
                        if result is not None:
                            async for item in _as_async(result, run):
                                yield item
                    finally:
                        run.callbacks()
                else:
                    result = inner(request, context)
                    if inspect.isawaitable(result):
                        result = await result  # write-based handler (returns None)
                    if result is not None:
                        async for item in _as_async(result, None):
                            yield item
            except GeneratorExit:
                # Closed unfinished: grpc.aio stopped iterating (the call was cancelled or
                # the server stopped while this stream waited at a yield) and the generator
                # is finalized later, maybe after grpc freed the call: its context must not
                # be touched (peer() on a freed call crashed the process). The exits see a
                # cancellation; nothing can be sent.
                call.context = None
                run_exits(exits, outcome(call, asyncio.CancelledError()))
                raise
            except BaseException as error:
                run_exits(exits, outcome(call, error))
                await _send(call)
                raise
            run_exits(exits, None if grpc_context.code() is None else outcome(call, None))
        finally:
            _done(serving, call, token)

    return stream
