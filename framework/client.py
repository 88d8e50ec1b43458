"""Client builder and the client-side adapter of the policy chain.

`connect(target, policies=...)` returns a `grpc.aio.Channel` on which generated
stubs run the client chain.  grpc.aio uses a client interceptor object only for
the arities its class implements when it has several (grpc/grpc#31442), so the
adapter is four small interceptor objects, one per arity, sharing one chain.
Failures come back as the typed framework errors the server raised
(`except ConflictError` works across a hop); the original `AioRpcError` is kept
as `__cause__`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import grpc.aio

from framework.config import ClientConfig
from framework.deadline import DeadlinePolicy
from framework.errors import CallCancelledError, from_rpc_error
from framework.policy import Arity, BoundChain, Call, Chain, Exit, Policy, Side, run_exits

__all__ = ["ClientConfig", "connect"]


def connect(
    target: str,
    *,
    policies: Sequence[Policy] = (),
    config: ClientConfig | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> grpc.aio.Channel:
    """A channel to `target` ("host:port") whose calls run `policies` (first = outermost).

    The deadline step is pinned innermost. Policies may contribute channel options
    through `channel_options()` (e.g. a retry service config).
    """
    config = config or ClientConfig()
    chain = Chain(
        [
            *policies,
            DeadlinePolicy(config.default_timeout_s, propagate=config.propagate_deadline),
        ],
        Side.CLIENT,
    )
    options = _channel_options(chain.policies, config)
    interceptors = _adapters(chain, target)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)


def _channel_options(policies: Sequence[Policy], config: ClientConfig) -> list[tuple[str, Any]]:
    options: dict[str, Any] = dict(config.grpc_options)
    service_config: dict[str, Any] = {}
    for policy in policies:
        contribute = getattr(policy, "channel_options", None)
        if contribute is None:
            continue
        for key, value in contribute():
            if key == "grpc.service_config":
                service_config.update(json.loads(value) if isinstance(value, str) else value)
            else:
                options[key] = value
    if service_config:
        options["grpc.service_config"] = json.dumps(service_config, sort_keys=True)
    return list(options.items())


def _adapters(chain: Chain, target: str) -> list[grpc.aio.ClientInterceptor]:
    return [
        _UnaryUnary(chain, target),
        _UnaryStream(chain, target),
        _StreamUnary(chain, target),
        _StreamStream(chain, target),
    ]


class _Adapter:
    __slots__ = ("_chain", "_target")

    def __init__(self, chain: Chain, target: str) -> None:
        self._chain = chain
        self._target = target

    async def _begin(
        self, details: grpc.aio.ClientCallDetails, arity: Arity, request: object | None
    ) -> tuple[list[Exit], grpc.aio.ClientCallDetails]:
        bound: BoundChain = self._chain.for_method(details.method, arity)
        call = Call(
            bound.method,
            Side.CLIENT,
            request=request,
            metadata=details.metadata,
            timeout=details.timeout,
            target=self._target,
        )
        exits = await bound.aenter(call) if bound.is_async else bound.enter(call)
        outbound = call.outbound_metadata()
        if outbound is not None or call.timeout != details.timeout:
            details = grpc.aio.ClientCallDetails(
                details.method,
                call.timeout,
                grpc.aio.Metadata(*outbound) if outbound is not None else details.metadata,
                details.credentials,
                details.wait_for_ready,
            )
        return exits, details


def _observed(error: BaseException) -> BaseException:
    if isinstance(error, grpc.aio.AioRpcError):
        return from_rpc_error(error)
    if isinstance(error, GeneratorExit):
        return CallCancelledError("the caller stopped reading the response stream")
    return error


async def _finish_unary(exits: list[Exit], grpc_call: Any) -> Any:
    try:
        await grpc_call
    except grpc.aio.AioRpcError as rpc_error:
        typed = from_rpc_error(rpc_error)
        run_exits(exits, typed)
        raise typed from rpc_error
    except BaseException as error:
        run_exits(exits, _observed(error))
        raise
    run_exits(exits, None)
    return grpc_call


async def _responses(exits: list[Exit], grpc_call: Any) -> AsyncIterator[Any]:
    try:
        async for response in grpc_call:
            yield response
    except grpc.aio.AioRpcError as rpc_error:
        typed = from_rpc_error(rpc_error)
        run_exits(exits, typed)
        raise typed from rpc_error
    except BaseException as error:
        run_exits(exits, _observed(error))
        raise
    run_exits(exits, None)


class _UnaryUnary(_Adapter, grpc.aio.UnaryUnaryClientInterceptor):
    __slots__ = ()

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        exits, details = await self._begin(client_call_details, Arity.UNARY_UNARY, request)
        try:
            grpc_call = await continuation(details, request)
        except BaseException as error:
            run_exits(exits, _observed(error))
            raise
        return await _finish_unary(exits, grpc_call)


class _StreamUnary(_Adapter, grpc.aio.StreamUnaryClientInterceptor):
    __slots__ = ()

    async def intercept_stream_unary(
        self,
        continuation: Any,
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        exits, details = await self._begin(client_call_details, Arity.STREAM_UNARY, None)
        try:
            grpc_call = await continuation(details, request_iterator)
        except BaseException as error:
            run_exits(exits, _observed(error))
            raise
        return await _finish_unary(exits, grpc_call)


class _UnaryStream(_Adapter, grpc.aio.UnaryStreamClientInterceptor):
    __slots__ = ()

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        exits, details = await self._begin(client_call_details, Arity.UNARY_STREAM, request)
        try:
            grpc_call = await continuation(details, request)
        except BaseException as error:
            run_exits(exits, _observed(error))
            raise
        return _responses(exits, grpc_call)


class _StreamStream(_Adapter, grpc.aio.StreamStreamClientInterceptor):
    __slots__ = ()

    async def intercept_stream_stream(
        self,
        continuation: Any,
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        exits, details = await self._begin(client_call_details, Arity.STREAM_STREAM, None)
        try:
            grpc_call = await continuation(details, request_iterator)
        except BaseException as error:
            run_exits(exits, _observed(error))
            raise
        return _responses(exits, grpc_call)
