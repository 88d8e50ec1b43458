"""Client builder and the client-side adapter of the policy chain.

`connect(target, policies=...)` returns a `Channel`: it has the interface of a
`grpc.aio.Channel`, so generated stubs work on it unchanged, and every call made
through it runs the client chain.  The adapter is four small multicallable
classes, one per arity, sharing one chain (the same split grpc.aio needs for its
own client interceptors, grpc/grpc#31442), wrapped around a plain grpc.aio
channel.  It does not go through grpc.aio's interceptor machinery, which starts
an extra task per call and cost about a fifth of unary throughput when measured
here.

Failures come back as the typed framework errors the server raised
(`except ConflictError` works across a hop).  Every framework error is also a
`grpc.aio.AioRpcError` carrying what grpc would have raised (`code()`,
`details()`, `initial_metadata()`, `trailing_metadata()`,
`debug_error_string()`), so code written for grpc.aio (`except grpc.RpcError`)
works unchanged; the original `AioRpcError` is kept as `__cause__`.
Returned call objects are awaitable (unary responses) or async iterable
(streamed responses) and delegate the rest of the grpc.aio call API
(`initial_metadata()`, `trailing_metadata()`, `cancel()`, `write()`...).
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Sequence
from typing import Any

import grpc
import grpc.aio

from framework.config import ClientConfig, expect
from framework.errors import CallCancelledError, FrameworkError, from_rpc_error
from framework.policies.deadline import DeadlinePolicy
from framework.policy import (
    Arity,
    BoundChain,
    Call,
    Chain,
    Enter,
    Exit,
    Policy,
    Side,
    as_policies,
    run_exits,
)

__all__ = ["Channel", "ClientConfig", "connect", "merge_service_configs"]


def connect(
    target: str,
    *,
    policies: Sequence[Policy] = (),
    config: ClientConfig | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> Channel:
    """A channel to `target` ("host:port") whose calls run `policies` (first = outermost).

    Each call's absolute deadline is fixed when the call is created, before any
    policy runs (the caller's timeout, else the method's `timeout_s`, else the
    config's default, lowered to the inbound call's remaining time), so policies
    see `call.time_remaining()` and time spent in async enters counts against it;
    it becomes the RPC's timeout when the RPC starts.  Policies may contribute
    channel options through `channel_options()` (e.g. a retry service config).
    """
    expect(target, str, "connect(target)", 'a "host:port" string, e.g. "127.0.0.1:50051"')
    if config is not None:
        expect(config, ClientConfig, "connect(config=...)", "a ClientConfig(...)")
    config = config or ClientConfig()
    chain = Chain(as_policies(policies, "connect(policies=...)"), Side.CLIENT)
    deadline = DeadlinePolicy(config.default_timeout_s, propagate=config.propagate_deadline)
    options = _channel_options(chain.policies, config)
    if credentials is None:
        raw = grpc.aio.insecure_channel(target, options=options)
    else:
        raw = grpc.aio.secure_channel(target, credentials, options=options)
    return Channel(raw, chain, target, deadline)


def _channel_options(policies: Sequence[Policy], config: ClientConfig) -> list[tuple[str, Any]]:
    """The channel's options: the config's, then the policies'; service configs deep-merged.

    The user's `grpc.service_config` (in `ClientConfig.grpc_options`) is the base;
    each policy's is merged into it in chain order: objects merge key by key,
    `methodConfig` entries are kept side by side (an entry for a method both name
    is merged into one, as gRPC refuses a method named twice), and any other value
    a later contribution sets replaces the earlier one.
    """
    options: dict[str, Any] = {}
    service_config: dict[str, Any] | None = None
    contributions: list[tuple[str, Any]] = list(config.grpc_options)
    for policy in policies:
        contribute = getattr(policy, "channel_options", None)
        if contribute is not None:
            contributions.extend(contribute())
    for key, value in contributions:
        if key == "grpc.service_config":
            extra = json.loads(value) if isinstance(value, str | bytes) else dict(value)
            service_config = merge_service_configs(service_config or {}, extra)
        else:
            options[key] = value
    if service_config is not None:
        options["grpc.service_config"] = json.dumps(service_config, sort_keys=True)
    return list(options.items())


def merge_service_configs(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` deep-merged into `base` (neither is changed); see `_channel_options`."""
    merged = dict(base)
    for key, value in extra.items():
        old = merged.get(key)
        if key == "methodConfig" and isinstance(old, list) and isinstance(value, list):
            merged[key] = _merge_method_configs(old, value)
        elif isinstance(old, dict) and isinstance(value, dict):
            merged[key] = merge_service_configs(old, value)
        else:
            merged[key] = value
    return merged


def _name_key(name: dict[str, Any]) -> tuple[str, str]:
    return (str(name.get("service", "")), str(name.get("method", "")))


def _merge_method_configs(
    base: list[dict[str, Any]], extra: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    entries = [dict(entry, name=list(entry.get("name", []))) for entry in base]
    for entry in extra:
        fields = {k: v for k, v in entry.items() if k != "name"}
        unmatched: list[dict[str, Any]] = []
        for name in entry.get("name", []):
            key = _name_key(name)
            found = next((e for e in entries if key in map(_name_key, e["name"])), None)
            if found is None:
                unmatched.append(name)
                continue
            if len(found["name"]) == 1:
                entries[entries.index(found)] = merge_service_configs(found, fields)
            else:  # split the method out of the shared entry, then merge
                found["name"] = [n for n in found["name"] if _name_key(n) != key]
                entries.append(merge_service_configs(dict(found, name=[name]), fields))
        if unmatched:
            entries.append(dict(fields, name=unmatched))
    return entries


class Channel:
    """A grpc.aio channel whose calls run the client policy chain."""

    def __init__(
        self,
        raw: grpc.aio.Channel,
        chain: Chain,
        target: str,
        deadline: DeadlinePolicy | None = None,
    ) -> None:
        self.raw = raw
        self.chain = chain
        self.target = target
        self.deadline = deadline or DeadlinePolicy(ClientConfig().default_timeout_s)
        self._deadlines: dict[str, Enter] = {}

    def _bound(self, method: str, arity: Arity) -> tuple[BoundChain, Enter]:
        bound = self.chain.for_method(method, arity)
        deadline = self._deadlines.get(method)
        if deadline is None:
            deadline = self.deadline.bind(bound.method) or _no_deadline
            self._deadlines[method] = deadline
        return bound, deadline

    def unary_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> _UnaryUnary:
        raw = self.raw.unary_unary(
            method, request_serializer, response_deserializer, _registered_method
        )
        return _UnaryUnary(raw, *self._bound(method, Arity.UNARY_UNARY), self.target)

    def unary_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> _UnaryStream:
        raw = self.raw.unary_stream(
            method, request_serializer, response_deserializer, _registered_method
        )
        return _UnaryStream(raw, *self._bound(method, Arity.UNARY_STREAM), self.target)

    def stream_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> _StreamUnary:
        raw = self.raw.stream_unary(
            method, request_serializer, response_deserializer, _registered_method
        )
        return _StreamUnary(raw, *self._bound(method, Arity.STREAM_UNARY), self.target)

    def stream_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> _StreamStream:
        raw = self.raw.stream_stream(
            method, request_serializer, response_deserializer, _registered_method
        )
        return _StreamStream(raw, *self._bound(method, Arity.STREAM_STREAM), self.target)

    async def close(self, grace: float | None = None) -> None:
        await self.raw.close(grace)

    async def channel_ready(self) -> None:
        await self.raw.channel_ready()

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.raw.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self.raw.wait_for_state_change(last_observed_state)

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _no_deadline(call: Call) -> None:
    return None


def _observed(error: BaseException) -> BaseException:
    if isinstance(error, grpc.aio.AioRpcError):
        return from_rpc_error(error)
    if isinstance(error, GeneratorExit | asyncio.CancelledError):
        return CallCancelledError("the caller cancelled the call or stopped reading its responses")
    return error


_PENDING = object()


def _now(awaitable: Coroutine[Any, Any, Any]) -> Any:
    """The result of a grpc.aio accessor of a finished call, or `_PENDING` if it must wait.

    On a call whose status has arrived, `code()`, `details()` and the metadata
    accessors complete without suspending; reading them here, in the call's done
    callback, ends the exits at the moment the RPC ends, with no task per call.
    """
    try:
        awaitable.send(None)
    except StopIteration as stop:
        return stop.value
    awaitable.close()
    return _PENDING


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a start's failure as seen: the awaiters (if any) receive it, not the log."""
    if not task.cancelled():
        task.exception()


class _Ending:
    """The exits of one started call, run once: what the RPC's done callback holds.

    Kept apart from the call object the caller holds, so that object can be
    dropped (and, for a response stream, cancel the RPC as grpc.aio does) while
    the RPC's end still runs the exits.
    """

    __slots__ = ("exits", "finished", "outcome")

    def __init__(self, exits: Sequence[Exit]) -> None:
        self.exits = exits
        self.finished = False
        self.outcome: FrameworkError | None = None  # the typed error the RPC ended with

    def end(self, error: BaseException | None) -> None:
        if not self.finished:
            self.finished = True
            run_exits(self.exits, error)

    def __call__(self, raw: Any) -> None:
        """grpc.aio's done callback: the RPC has its status."""
        if self.finished:
            return
        if raw.cancelled():
            self.end(CallCancelledError("the caller cancelled the call"))
            return
        code = _now(raw.code())
        if code is _PENDING:  # not seen with grpcio 1.6x-1.8x; read it on the loop
            asyncio.get_running_loop().create_task(self._settle(raw))
            return
        if code is grpc.StatusCode.OK:
            self.end(None)
            return
        failure = grpc.aio.AioRpcError(
            code,
            _now(raw.initial_metadata()),
            _now(raw.trailing_metadata()),
            _now(raw.details()),
            _now(raw.debug_error_string()),
        )
        self.outcome = from_rpc_error(failure)
        self.end(self.outcome)

    async def _settle(self, raw: Any) -> None:
        code = await raw.code()
        if code is grpc.StatusCode.OK:
            self.end(None)
            return
        failure = grpc.aio.AioRpcError(
            code,
            await raw.initial_metadata(),
            await raw.trailing_metadata(),
            await raw.details(),
            await raw.debug_error_string(),
        )
        self.outcome = from_rpc_error(failure)
        self.end(self.outcome)


_NOTHING_TO_END = _Ending(())
_NOTHING_TO_END.finished = True


class _ResponseCall:
    """Shared by the two call shapes: the raw grpc.aio call and its exits, ended once.

    The exits are tied to the RPC itself (a done callback on the grpc.aio call),
    so they run exactly once however the call ends: awaited, iterated, read
    through `code()`/`details()`, cancelled, never looked at, or dropped.  With an
    async enter in the chain the call starts in one task, created with the call
    (an RPC starts when it is created, as in grpc.aio); every awaiter shares it,
    and `cancel()` before the RPC is sent cancels that task: the RPC is never sent
    and the enters that ran are exited.
    """

    __slots__ = ("_call", "_ending", "_first", "_raw", "_rejection", "_starting")

    def __init__(self, call: Call) -> None:
        self._call = call
        self._raw: Any = None
        self._ending = _NOTHING_TO_END
        self._rejection: BaseException | None = None
        self._starting: asyncio.Task[Any] | None = None
        self._first: _FirstStatus | None = None  # noted from the first write on

    # ----- how the call starts
    def _attach(self, raw: Any, exits: Sequence[Exit]) -> None:
        self._raw = raw
        if exits:
            self._ending = ending = _Ending(exits)
            raw.add_done_callback(ending)

    def _reject(self, error: BaseException) -> None:
        self._rejection = error

    def _start_later(self, enters: Sequence[Any], start: Callable[[], Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._begin(enters, start))
        task.add_done_callback(_retrieve)
        self._starting = task

    async def _begin(self, enters: Sequence[Any], start: Callable[[], Any]) -> Any:
        exits: list[Exit] = []
        try:
            for enter in enters:
                result = enter(self._call)
                if inspect.isawaitable(result):
                    result = await result
                if result is not None:
                    exits.append(result)
            raw = start()
        except BaseException as error:
            run_exits(exits, _observed(error))
            raise
        self._attach(raw, exits)
        return raw

    async def _started(self) -> Any:
        raw = self._raw
        if raw is not None:
            return raw
        if self._starting is not None:
            return await self._starting
        assert self._rejection is not None
        raise self._rejection

    # ----- how it ends
    def _end(self, error: BaseException | None) -> None:
        self._ending.end(error)

    def _failed(self, error: BaseException) -> BaseException:
        """Run the exits for `error` (if the RPC's end did not); return what to raise."""
        if isinstance(error, grpc.aio.AioRpcError) and not isinstance(error, FrameworkError):
            typed = self._ending.outcome or from_rpc_error(error)
            self._end(typed)
            return typed
        self._end(_observed(error))
        return error

    # ----- grpc.aio's call API
    def cancel(self) -> bool:
        """Cancel the RPC (or its start); the exits see CallCancelledError, once."""
        if self._raw is not None:
            return bool(self._raw.cancel())
        starting = self._starting
        if starting is not None and not starting.done():
            return starting.cancel()
        return False

    def cancelled(self) -> bool:
        if self._raw is not None:
            return bool(self._raw.cancelled())
        return self._starting is not None and self._starting.cancelled()

    def done(self) -> bool:
        if self._raw is not None:
            return bool(self._raw.done())
        return self._starting is None or self._starting.done()

    def time_remaining(self) -> float | None:
        if self._raw is not None:
            remaining: float | None = self._raw.time_remaining()
            return remaining
        return self._call.time_remaining()

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        """`callback(call)` once the call is done (at once if it already is)."""
        if self._raw is not None:
            self._raw.add_done_callback(lambda _raw: callback(self))
        elif self._starting is not None and not self._starting.done():
            self._starting.add_done_callback(lambda _task: self.add_done_callback(callback))
        else:
            callback(self)

    async def _raw_or_failure(self) -> Any:
        """The started grpc.aio call, or the framework error that kept it from starting."""
        try:
            return await self._started()
        except FrameworkError as error:
            return error
        except asyncio.CancelledError:
            if self._starting is not None and self._starting.cancelled():
                return CallCancelledError("the caller cancelled the call before it started")
            raise

    async def _status_source(self) -> Any:
        """What to read the status from: the framework error that kept the call from
        starting, the server's status a failed write hid (see `_peer_status`), or the
        grpc.aio call itself."""
        found = await self._raw_or_failure()
        if isinstance(found, FrameworkError) or self._first is None:
            return found
        if found.done() and await found.details() == _CORE_INTERNAL:
            first = self._first.error
            if first is not None and first.details() != _CORE_INTERNAL:
                return first
        return found

    async def code(self) -> grpc.StatusCode:
        found = await self._status_source()
        if isinstance(found, grpc.RpcError):
            return found.code()
        code: grpc.StatusCode = await found.code()
        return code

    async def details(self) -> str | None:
        found = await self._status_source()
        if isinstance(found, grpc.RpcError):
            return found.details()  # type: ignore[no-any-return]
        details: str | None = await found.details()
        return details

    async def initial_metadata(self) -> grpc.aio.Metadata:
        found = await self._status_source()
        if isinstance(found, grpc.RpcError):
            return found.initial_metadata()
        metadata: grpc.aio.Metadata = await found.initial_metadata()
        return metadata

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        found = await self._status_source()
        if isinstance(found, grpc.RpcError):
            return found.trailing_metadata()
        metadata: grpc.aio.Metadata = await found.trailing_metadata()
        return metadata

    async def debug_error_string(self) -> str:
        found = await self._status_source()
        if isinstance(found, grpc.RpcError):
            return found.debug_error_string()  # type: ignore[no-any-return]
        debug: str = await found.debug_error_string()
        return debug

    async def wait_for_connection(self) -> None:
        await (await self._started()).wait_for_connection()

    def _noting(self, raw: Any) -> _FirstStatus:
        first = self._first
        if first is None:  # before the first write: a failed send may overwrite the status
            first = self._first = _FirstStatus()
            raw.add_done_callback(first)
        return first

    async def write(self, request: Any) -> None:
        raw = await self._started()
        first = self._noting(raw)
        try:
            await raw.write(request)
        except grpc.aio.AioRpcError as error:  # the call ended: raise it typed, as reads do
            raise self._failed(await _peer_status(raw, error, first)) from error
        except asyncio.InvalidStateError as error:  # it had ended before this write
            if not raw.done() or await raw.code() is grpc.StatusCode.OK:
                raise
            ended = await _peer_status(raw, await _status_error(raw), first)
            raise self._failed(ended) from error

    async def done_writing(self) -> None:
        raw = await self._started()
        first = self._noting(raw)
        try:
            await raw.done_writing()
        except grpc.aio.AioRpcError as error:
            raise self._failed(await _peer_status(raw, error, first)) from error

    def __getattr__(self, name: str) -> Any:
        if self._raw is None:
            raise AttributeError(f"{name} is available once the call has started (await it)")
        return getattr(self._raw, name)


_CORE_INTERNAL = "Internal error from Core"
_PEER_STATUS_WAIT_S = 1.0


async def _status_error(raw: Any) -> grpc.aio.AioRpcError:
    """The ended call's status as the error grpc.aio raises for it."""
    return grpc.aio.AioRpcError(
        await raw.code(),
        await raw.initial_metadata(),
        await raw.trailing_metadata(),
        await raw.details(),
        await raw.debug_error_string(),
    )


class _FirstStatus:
    """A call's done callback that keeps the status the call first ended with."""

    __slots__ = ("error",)

    def __init__(self) -> None:
        self.error: grpc.aio.AioRpcError | None = None

    def __call__(self, raw: Any) -> None:
        if self.error is not None or raw.cancelled():
            return
        code = _now(raw.code())
        if code is _PENDING or code is grpc.StatusCode.OK:
            return
        self.error = grpc.aio.AioRpcError(
            code,
            _now(raw.initial_metadata()),
            _now(raw.trailing_metadata()),
            _now(raw.details()),
            _now(raw.debug_error_string()),
        )


async def _peer_status(
    raw: Any, error: grpc.aio.AioRpcError, first: _FirstStatus
) -> grpc.aio.AioRpcError:
    """The server's status behind grpc.aio's own INTERNAL for a send that failed.

    A write racing the server's end of the call (a refusal before the handler reads)
    fails in the core, and grpc.aio then sets the call's status to its own INTERNAL
    "Internal error from Core".  The server's status either came first (grpc.aio
    overwrote it: `first`, the call's done callback, kept it) or lands a moment later
    (wait for it, bounded).  Any other error is returned as it is.
    """
    if error.code() is not grpc.StatusCode.INTERNAL or error.details() != _CORE_INTERNAL:
        return error
    if first.error is not None and first.error.details() != _CORE_INTERNAL:
        return first.error
    loop = asyncio.get_running_loop()
    give_up = loop.time() + _PEER_STATUS_WAIT_S
    while loop.time() < give_up:
        if await raw.details() != _CORE_INTERNAL:
            return await _status_error(raw)
        await asyncio.sleep(0.002)
    return error


class _UnaryResponseCall(_ResponseCall):
    """What a unary-response call returns: await it for the response."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, Any]:
        return self._result().__await__()

    async def _result(self) -> Any:
        raw = await self._started()
        try:
            response = await raw
        except BaseException as error:
            raised = self._failed(error)
            if raised is error:
                raise
            raise raised from error
        self._end(None)
        return response


class _StreamResponseCall(_ResponseCall):
    """What a streamed-response call returns: iterate it with `async for`, or `read()`.

    Concurrent `read()`s take turns: grpc.aio allows one receive at a time on a call
    (a second one sent meanwhile hung until the deadline).
    """

    __slots__ = ("_reading",)
    _reading: asyncio.Lock

    def __del__(self) -> None:
        # as grpc.aio does for a response stream nobody holds any more: cancel it
        raw = self._raw
        if raw is not None and not raw.done():
            raw.cancel()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._responses()

    def _reading_lock(self) -> asyncio.Lock:
        try:
            return self._reading
        except AttributeError:
            self._reading = asyncio.Lock()
            return self._reading

    async def _responses(self) -> AsyncIterator[Any]:
        raw = await self._started()
        try:
            async for response in raw:
                yield response
        except BaseException as error:
            if isinstance(error, GeneratorExit | asyncio.CancelledError):
                raw.cancel()  # the caller stopped reading: stop the server's stream too
            raised = self._failed(error)
            if raised is error:
                raise
            raise raised from error
        self._end(None)

    async def read(self) -> Any:
        raw = await self._started()
        reading = self._reading_lock()
        try:
            async with reading:
                response = await raw.read()
        except BaseException as error:
            raised = self._failed(error)
            if raised is error:
                raise
            raise raised from error
        if response is grpc.aio.EOF:
            self._end(None)
        return response


class _Multicallable:
    """One method of one arity: runs the bound chain, then the raw grpc.aio multicallable."""

    __slots__ = ("_bound", "_deadline", "_raw", "_target")
    _shape: type[_ResponseCall] = _UnaryResponseCall
    _unary_request = True

    def __init__(self, raw: Any, bound: BoundChain, deadline: Enter, target: str) -> None:
        self._raw = raw
        self._bound = bound
        self._deadline = deadline
        self._target = target

    def __call__(
        self,
        request: Any = None,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        """`request` is the message, or for streamed requests an iterator (or None + write())."""
        call = Call(
            self._bound.method,
            Side.CLIENT,
            request=request if self._unary_request else None,
            metadata=tuple(metadata) if metadata else None,
            timeout=timeout,
            target=self._target,
        )
        bound, raw = self._bound, self._raw
        result = self._shape(call)

        def start() -> Any:
            # the deadline was fixed when the call was created: time spent in the
            # enters (a waiting bulkhead, a token refresh) counts against it
            return raw(
                request,
                timeout=call.time_remaining(),
                metadata=call.outbound_metadata(),
                credentials=credentials,
                wait_for_ready=wait_for_ready,
                compression=compression,
            )

        try:
            self._deadline(call)  # the absolute deadline, before any policy runs
            if bound.is_async:
                result._start_later(bound.enters, start)
                return result
            exits = bound.enter(call)
        except Exception as error:  # noqa: BLE001 - re-raised when the call is awaited, as in grpc
            result._reject(error)
            return result
        try:
            rpc = start()
        except BaseException as error:  # e.g. the channel is closed: exits still run
            run_exits(exits, _observed(error))
            raise
        result._attach(rpc, exits)
        return result


class _UnaryUnary(_Multicallable):
    __slots__ = ()


class _StreamUnary(_Multicallable):
    __slots__ = ()
    _unary_request = False


class _UnaryStream(_Multicallable):
    __slots__ = ()
    _shape = _StreamResponseCall


class _StreamStream(_Multicallable):
    __slots__ = ()
    _shape = _StreamResponseCall
    _unary_request = False
