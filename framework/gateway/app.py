"""The gateway's ASGI application (Starlette): HTTP/JSON transcoding and gRPC-Web.

One request, HTTP/JSON::

    match route (404/405) -> ingress chain: tracing, auth (401/403), rate limit (429)
    -> read body within the limit (413) -> JSON + path + query -> request (400)
    -> backend call through the client chain (balanced, breaker, retries, deadline)
    -> response JSON (or the error's google.rpc.Status with its HTTP status)

The ingress chain is the framework's own policy chain run on the server side,
on a `Call` built from the HTTP request (headers as metadata, the client's
address as the peer), so the same `AuthPolicy`, `RateLimitPolicy` and
`TracingPolicy` that guard a gRPC server guard the gateway, and the verified
principal is what the rate limit counts.  Server-streaming methods answer
NDJSON (`{"result": ...}` lines, an `{"error": ...}` line if the stream fails
after it started) or Server-Sent Events when the client accepts
`text/event-stream`.  `POST /pkg.Service/Method` with a gRPC-Web content type
is relayed as gRPC-Web (binary or text) with no protobuf decoding.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
from collections.abc import Sequence
from typing import Any

from google.protobuf import descriptor_pool
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route, request_response
from starlette.types import ASGIApp

from framework.errors import (
    CallCancelledError,
    InvalidArgumentError,
    NotFoundError,
    UnimplementedError,
)
from framework.gateway import grpcweb
from framework.gateway.backends import Backends
from framework.gateway.config import GatewayConfig
from framework.gateway.docs import docs_page
from framework.gateway.routes import Binding, RouteTable
from framework.gateway.statuses import ErrorAnswer, answer_for, grpc_web_trailers
from framework.gateway.streams import RpcStream, read_body
from framework.gateway.transcode import RequestCodec, to_json_bytes
from framework.policy import (
    BoundChain,
    Call,
    Chain,
    Exit,
    Policy,
    Side,
    reset_current_call,
    run_exits,
    set_current_call,
)

__all__ = ["Gateway", "parse_grpc_timeout"]

logger = logging.getLogger(__name__)

# HTTP headers passed to the backend as gRPC metadata (besides `grpc-metadata-*`).
FORWARDED_HEADERS = frozenset({"authorization", "idempotency-key"})
TRACE_HEADERS = frozenset({"traceparent", "tracestate", "baggage"})
_METADATA_PREFIX = "grpc-metadata-"
_TIMEOUT = re.compile(r"(\d{1,8})([HMSmun])")
_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_JSON = "application/json"
_NDJSON = "application/x-ndjson"
_SSE = "text/event-stream"
HEALTH_TIMEOUT_S = 2.0


def parse_grpc_timeout(value: str) -> float:
    """`grpc-timeout` ("1S", "250m", "2M"...) in seconds; InvalidArgumentError otherwise."""
    match = _TIMEOUT.fullmatch(value.strip())
    if match is None:
        raise InvalidArgumentError(
            f"grpc-timeout must be 1-8 digits and a unit (H, M, S, m, u, n), got {value!r}"
        )
    return int(match.group(1)) * _UNITS[match.group(2)]


def _peer(request: Request) -> str:
    client = request.client
    if client is None:
        return "unknown"
    host, port = client.host, client.port
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


class Gateway:
    """Routes, backends and chains, served as one ASGI app (`gateway.app`)."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        routes: RouteTable,
        backends: Backends,
        ingress_policies: Sequence[Policy] = (),
        forward_trace_headers: bool = True,
        openapi: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.routes = routes
        self.backends = backends
        self.ingress = Chain(ingress_policies, Side.SERVER)
        self.ingress_policies = tuple(ingress_policies)
        self.forward_trace_headers = forward_trace_headers
        self.services = frozenset(backends.services)
        self._codecs = {b: RequestCodec(b) for b in routes.bindings}
        self._types: dict[Binding, tuple[Any, Any]] = {
            b: (
                GetMessageClass(b.method.input_type).SerializeToString,
                GetMessageClass(b.method.output_type).FromString,
            )
            for b in routes.bindings
        }
        self._openapi = openapi
        self._openapi_bytes: bytes | None = None
        self.app: ASGIApp = self._build()

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self.backends.start()
        for policy in self.ingress_policies:
            start = getattr(policy, "start", None)
            if start is not None:
                await start()

    async def close(self) -> None:
        for policy in self.ingress_policies:
            close = getattr(policy, "close", None)
            if close is not None:
                await close()
        await self.backends.close()

    def _build(self) -> ASGIApp:
        routes = [
            Route("/healthz", self._healthz, methods=["GET"]),
            Route("/readyz", self._readyz, methods=["GET"]),
            Route("/openapi.json", self._openapi_json, methods=["GET"]),
            Route("/docs", self._docs, methods=["GET"]),
        ]
        middleware: list[Middleware] = []
        if self.config.cors_origins:
            middleware.append(
                Middleware(
                    CORSMiddleware,
                    allow_origins=list(self.config.cors_origins),
                    allow_methods=["*"],
                    allow_headers=[
                        "authorization",
                        "content-type",
                        "idempotency-key",
                        "grpc-timeout",
                        "traceparent",
                        "tracestate",
                        "x-grpc-web",
                        "x-user-agent",
                    ],
                    expose_headers=[
                        "grpc-status",
                        "grpc-message",
                        "grpc-status-details-bin",
                        "retry-after",
                    ],
                    max_age=600,
                )
            )
        starlette = Starlette(routes=routes, middleware=middleware)
        # Everything else (any method, any path) is a binding or gRPC-Web.
        starlette.router.default = request_response(self._dispatch)  # type: ignore[arg-type]
        app: ASGIApp = starlette
        if self.config.trusted_proxies:
            from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

            app = ProxyHeadersMiddleware(app, trusted_hosts=list(self.config.trusted_proxies))  # type: ignore[arg-type,assignment]
        return app

    # ------------------------------------------------------ fixed endpoints
    async def _healthz(self, request: Request) -> Response:
        return _json_response({"status": "SERVING"})

    async def _readyz(self, request: Request) -> Response:
        services = sorted(self.services)
        found = await asyncio.gather(*(self.backends.health(s, HEALTH_TIMEOUT_S) for s in services))
        statuses = dict(zip(services, found, strict=True))
        ready = all(s == "SERVING" for s in found)
        body = {"status": "SERVING" if ready else "NOT_SERVING", "services": statuses}
        return _json_response(body, 200 if ready else 503)

    async def _openapi_json(self, request: Request) -> Response:
        if self._openapi_bytes is None:
            if self._openapi is None:
                from framework.gateway.openapi import openapi_document

                self._openapi = openapi_document(self.routes, self.config, self.ingress)
            self._openapi_bytes = json.dumps(self._openapi, indent=1).encode()
        return Response(self._openapi_bytes, media_type=_JSON)

    async def _docs(self, request: Request) -> Response:
        return HTMLResponse(docs_page(self.config.title))

    # ------------------------------------------------------------ dispatch
    async def _dispatch(self, request: Request) -> Response | RpcStream:
        content_type = request.headers.get("content-type", "")
        if request.method == "POST" and grpcweb.is_grpc_web(content_type):
            return await self._grpc_web(request, content_type)
        raw = request.scope.get("raw_path")
        raw_path = raw.decode("latin-1") if raw else request.url.path
        match = self.routes.match(request.method, raw_path)
        if match is None:
            allowed = self.routes.allowed(raw_path)
            if allowed:
                answer = answer_for(
                    UnimplementedError(
                        f"{request.method} is not bound to {raw_path}; use {', '.join(allowed)}",
                        reason="METHOD_NOT_ALLOWED",
                    )
                )
                response = _error_response(answer)
                response.status_code = 405
                response.headers["allow"] = ", ".join(allowed)
                return response
            return _error_response(
                answer_for(
                    NotFoundError(
                        f"no route for {request.method} {raw_path}; see /openapi.json",
                        reason="ROUTE_NOT_FOUND",
                    )
                )
            )
        return await self._transcode(request, match.binding, match.variables)

    def _enter(self, bound: BoundChain, request: Request, timeout: float | None) -> Call:
        metadata = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw)
        return Call(
            bound.method, Side.SERVER, metadata=metadata, target=_peer(request), timeout=timeout
        )

    async def _run_enters(self, bound: BoundChain, call: Call) -> list[Exit]:
        if bound.is_async:
            return await bound.aenter(call)
        return bound.enter(call)

    def _metadata(self, request: Request) -> list[tuple[str, str | bytes]]:
        out: list[tuple[str, str | bytes]] = []
        for raw_key, raw_value in request.headers.raw:
            key = raw_key.decode("latin-1")
            if key in FORWARDED_HEADERS or (self.forward_trace_headers and key in TRACE_HEADERS):
                out.append((key, _printable(key, raw_value)))
            elif key.startswith(_METADATA_PREFIX) and len(key) > len(_METADATA_PREFIX):
                name = key[len(_METADATA_PREFIX) :]
                if name.endswith("-bin"):
                    try:
                        out.append((name, base64.b64decode(raw_value, validate=True)))
                    except (binascii.Error, ValueError):
                        raise InvalidArgumentError(
                            f"header {key}: a -bin metadata value must be base64"
                        ) from None
                elif name.startswith("grpc-"):
                    continue  # reserved for gRPC itself
                else:
                    out.append((name, _printable(key, raw_value)))
        return out

    def _timeout(self, request: Request, contract_s: float, streaming: bool) -> float | None:
        header = request.headers.get("grpc-timeout")
        if header is not None:
            return min(parse_grpc_timeout(header), self.config.max_timeout_s)
        if contract_s > 0:
            return contract_s
        return None if streaming else self.config.default_timeout_s

    # ---------------------------------------------------------- HTTP/JSON
    async def _transcode(
        self, request: Request, binding: Binding, variables: dict[str, str]
    ) -> Response | RpcStream:
        bound = self.ingress.for_method(binding.full_name)
        streaming = binding.arity.response_streaming
        exits: list[Exit] = []
        token: object | None = None
        try:
            timeout = self._timeout(request, bound.method.policy.timeout_s, streaming)
            call = self._enter(bound, request, timeout)
            exits = await self._run_enters(bound, call)
            token = set_current_call(call)
            codec = self._codecs[binding]
            body = await read_body(request, self.config.max_body_bytes) if binding.body else b""
            message = codec.request(body, variables, request.query_params.multi_items())
            metadata = self._metadata(request)
            serializer, deserializer = self._types[binding]
            target = self.backends.callable(
                binding.service,
                binding.full_name,
                streaming=streaming,
                serializer=serializer,
                deserializer=deserializer,
            )
            if streaming:
                return await self._stream(request, target, message, timeout, metadata, codec, exits)
            response = await target(message, timeout=timeout, metadata=metadata)
            content = to_json_bytes(codec.response(response))
        except asyncio.CancelledError:
            run_exits(exits, CallCancelledError("the HTTP client went away"))
            raise
        except Exception as error:  # noqa: BLE001 - every failure becomes its HTTP answer
            run_exits(exits, error)
            return _error_response(answer_for(error))
        finally:
            if token is not None:
                reset_current_call(token)
        run_exits(exits, None)
        return Response(content, media_type=_JSON)

    async def _stream(
        self,
        request: Request,
        target: Any,
        message: Message,
        timeout: float | None,
        metadata: list[tuple[str, str | bytes]],
        codec: RequestCodec,
        exits: list[Exit],
    ) -> RpcStream:
        responses = target(message, timeout=timeout, metadata=metadata).__aiter__()
        try:
            first = await anext(responses)
        except StopAsyncIteration:
            first = None
        sse = _SSE in request.headers.get("accept", "")

        def finish(error: BaseException | None) -> None:
            run_exits(exits, error)

        if sse:
            return RpcStream(
                responses,
                first,
                media_type=_SSE,
                encode=lambda m: b"data: " + to_json_bytes(codec.response(m)) + b"\n\n",
                encode_error=lambda e: (
                    b"event: error\ndata: " + to_json_bytes(answer_for(e).json()) + b"\n\n"
                ),
                finish=finish,
            )
        return RpcStream(
            responses,
            first,
            media_type=_NDJSON,
            encode=lambda m: to_json_bytes({"result": codec.response(m)}) + b"\n",
            encode_error=lambda e: to_json_bytes({"error": answer_for(e).json()}) + b"\n",
            finish=finish,
        )

    # ------------------------------------------------------------ gRPC-Web
    async def _grpc_web(self, request: Request, content_type: str) -> Response | RpcStream:
        text = grpcweb.is_text(content_type)
        media_type = grpcweb.GRPC_WEB_TEXT + "+proto" if text else grpcweb.GRPC_WEB + "+proto"

        def frame(data: bytes) -> bytes:
            return base64.b64encode(data) if text else data

        exits: list[Exit] = []
        token: object | None = None
        try:
            service, method = self._grpc_web_method(request.url.path)
            full_name = f"/{service}/{method.name}"
            if method.client_streaming:
                raise UnimplementedError(
                    f"{full_name} streams requests, which gRPC-Web cannot carry; call it over gRPC"
                )
            bound = self.ingress.for_method(full_name)
            streaming = method.server_streaming
            timeout = self._timeout(request, bound.method.policy.timeout_s, streaming)
            call = self._enter(bound, request, timeout)
            exits = await self._run_enters(bound, call)
            token = set_current_call(call)
            body = await read_body(request, self.config.max_body_bytes)
            payload = grpcweb.read_message(grpcweb.decode_text(body) if text else body)
            metadata = self._metadata(request)
            target = self.backends.callable(service, full_name, streaming=streaming)
            if streaming:
                responses = target(payload, timeout=timeout, metadata=metadata).__aiter__()
                try:
                    first = await anext(responses)
                except StopAsyncIteration:
                    first = None

                def finish(error: BaseException | None) -> None:
                    run_exits(exits, error)

                return RpcStream(
                    responses,
                    first,
                    media_type=media_type,
                    encode=lambda m: frame(grpcweb.data_frame(m)),
                    encode_error=lambda e: frame(
                        grpcweb.trailer_frame(grpc_web_trailers(answer_for(e)))
                    ),
                    end=frame(grpcweb.trailer_frame(grpc_web_trailers(None))),
                    finish=finish,
                )
            reply = await target(payload, timeout=timeout, metadata=metadata)
            content = frame(grpcweb.data_frame(reply)) + frame(
                grpcweb.trailer_frame(grpc_web_trailers(None))
            )
        except asyncio.CancelledError:
            run_exits(exits, CallCancelledError("the HTTP client went away"))
            raise
        except Exception as error:  # noqa: BLE001 - every failure becomes its gRPC status
            run_exits(exits, error)
            answer = answer_for(error)
            return Response(
                frame(grpcweb.trailer_frame(grpc_web_trailers(answer))), media_type=media_type
            )
        finally:
            if token is not None:
                reset_current_call(token)
        run_exits(exits, None)
        return Response(content, media_type=media_type)

    def _grpc_web_method(self, path: str) -> tuple[str, Any]:
        service, _, name = path.lstrip("/").partition("/")
        if service not in self.services:
            raise UnimplementedError(
                f"service {service!r} is not exposed by this gateway", reason="UNKNOWN_SERVICE"
            )
        descriptor = descriptor_pool.Default().FindServiceByName(service)
        method = descriptor.methods_by_name.get(name)
        if method is None:
            raise UnimplementedError(f"{service} has no method {name!r}", reason="UNKNOWN_METHOD")
        return service, method


def _printable(key: str, value: bytes) -> str:
    text = value.decode("latin-1")
    if not all(" " <= ch <= "~" for ch in text):
        raise InvalidArgumentError(f"header {key} must be printable ASCII to pass as gRPC metadata")
    return text


def _json_response(body: Any, status: int = 200) -> Response:
    return Response(to_json_bytes(body), status_code=status, media_type=_JSON)


def _error_response(answer: ErrorAnswer) -> Response:
    return Response(
        to_json_bytes(answer.json()),
        status_code=answer.http_status,
        media_type=_JSON,
        headers=answer.headers,
    )
