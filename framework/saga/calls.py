"""How the orchestrator reaches participants: one channel per service, bytes in and out.

`Participants` maps a service's full name to a channel: a framework channel
from `framework.client.connect(...)` (its client policies run: tracing,
bearer token, breaker...), a registry `BalancedChannel`, or a plain
`grpc.aio` channel.  Requests and replies cross as bytes (the log stores them
serialized), so nothing is parsed or serialized twice.  Every call carries
`idempotency-key: saga:<saga_id>/<step>/<action|compensation>`, which the
participant's barrier (`framework.saga.barrier`) records.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import grpc
import grpc.aio

from framework.errors import (
    FrameworkError,
    InternalError,
    UnavailableError,
    from_rpc_error,
)
from framework.saga.barrier import IDEMPOTENCY_KEY

__all__ = ["RETRYABLE", "Participants", "as_error", "retryable"]

# Codes after which the call may be tried again (the participant may not have
# acted, or acted and we did not hear: the barrier makes a repeat safe).  Any
# other code is the participant's answer: the step failed.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    }
)


def retryable(error: FrameworkError) -> bool:
    return error.code() in RETRYABLE


def _identity(data: bytes) -> bytes:
    return data


def as_error(error: Exception) -> FrameworkError:
    """The typed error for whatever a channel raised."""
    if isinstance(error, FrameworkError):
        return error
    if isinstance(error, grpc.aio.AioRpcError):
        return from_rpc_error(error)
    if isinstance(error, grpc.aio.UsageError):
        return UnavailableError(f"channel unusable: {error}")
    return InternalError(f"{type(error).__name__}: {error}")


class Participants:
    """Service full name -> channel; `default` serves any service not named."""

    def __init__(self, channels: Mapping[str, Any] | None = None, *, default: Any = None) -> None:
        self._channels = dict(channels or {})
        self._default = default
        self._callables: dict[str, Any] = {}

    def missing(self, services: Iterable[str]) -> list[str]:
        """The services with no channel."""
        if self._default is not None:
            return []
        return sorted(s for s in services if s not in self._channels)

    def _callable(self, service: str, method: str) -> Any:
        found = self._callables.get(method)
        if found is None:
            channel = self._channels.get(service, self._default)
            if channel is None:
                raise UnavailableError(
                    f"no channel for {service}: give Participants a channel for it"
                )
            found = channel.unary_unary(
                method, request_serializer=_identity, response_deserializer=_identity
            )
            self._callables[method] = found
        return found

    async def call(
        self, service: str, method: str, request: bytes, key: str, timeout_s: float
    ) -> bytes:
        """Send one serialized request; the serialized reply, or a typed error."""
        try:
            multicallable = self._callable(service, method)
            reply: bytes = await multicallable(
                request, timeout=timeout_s, metadata=((IDEMPOTENCY_KEY, key),)
            )
        except Exception as error:
            raise as_error(error) from error
        return reply
