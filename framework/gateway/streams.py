"""Reading request bodies within a limit, and streaming RPC responses to HTTP.

`read_body` stops at `limit` bytes (413 before reading when Content-Length
already says too much).  `RpcStream` is an ASGI response for server-streaming
calls (NDJSON, Server-Sent Events, gRPC-Web): it runs in the request's own
task, so the policies' exits and the trace context stay in the context that
entered them, and a client that goes away cancels that task, which cancels the
gRPC call upstream at once instead of at the next message.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from framework.errors import CallCancelledError, FrameworkError
from framework.gateway.statuses import BodyTooLargeError

__all__ = ["RpcStream", "read_body"]


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> BodyTooLargeError:
    return BodyTooLargeError(
        f"the request body is larger than the gateway's limit of {limit} bytes",
        metadata={"limit_bytes": str(limit)},
    )


Encode = Callable[[Any], bytes]
EncodeError = Callable[[FrameworkError | BaseException], bytes]
Finish = Callable[[BaseException | None], None]


class RpcStream:
    """An ASGI response that relays a server stream: first message already read."""

    def __init__(
        self,
        responses: AsyncIterator[Any],
        first: Any,
        *,
        media_type: str,
        encode: Encode,
        encode_error: EncodeError,
        end: bytes = b"",  # sent after the last message on success only
        finish: Finish,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.responses = responses
        self.first = first
        self.media_type = media_type
        self.encode = encode
        self.encode_error = encode_error
        self.end = end
        self.finish = finish
        self.headers = headers or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        gone = asyncio.Event()

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    task.cancel()
                    return

        watcher = asyncio.create_task(watch())
        outcome: BaseException | None = None
        try:
            headers = [(b"content-type", self.media_type.encode())]
            headers += [(k.encode(), v.encode()) for k, v in self.headers.items()]
            headers.append((b"cache-control", b"no-cache"))
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            if self.first is not None:
                await _send(send, self.encode(self.first))
                async for response in self.responses:
                    await _send(send, self.encode(response))
            await _send(send, self.end, more=False)
        except asyncio.CancelledError as error:
            if gone.is_set() and task.uncancel() == 0:
                outcome = CallCancelledError("the HTTP client went away during the stream")
                return  # our own cancellation: the client left, nothing to send
            outcome = error
            raise
        except FrameworkError as error:  # the RPC failed after it started streaming
            outcome = error
            with contextlib.suppress(OSError):
                await _send(send, self.encode_error(error), more=False)
        except Exception as error:  # noqa: BLE001 - mapped to INTERNAL for the client, logged
            outcome = error
            with contextlib.suppress(OSError):
                await _send(send, self.encode_error(error), more=False)
        finally:
            watcher.cancel()
            await asyncio.wait([watcher])
            close = getattr(self.responses, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()  # cancels the gRPC call if it is still running
            self.finish(outcome)


async def _send(send: Send, body: bytes, *, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": more})
