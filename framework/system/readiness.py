"""Readiness checks the supervisor polls: is a process serving yet?

Each returns an async callable answering True/False (never raising for "not yet"),
with a short timeout per attempt, so a slow start is just polled again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from framework.errors import FrameworkError

__all__ = ["grpc_serving", "http_ok", "registered"]

Ready = Callable[[], Awaitable[bool]]
_ATTEMPT_TIMEOUT_S = 1.0


def grpc_serving(target: str) -> Ready:
    """The server at `target` answers `grpc.health.v1` SERVING."""

    async def check() -> bool:
        async with grpc.aio.insecure_channel(target) as channel:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=_ATTEMPT_TIMEOUT_S
                )
            except grpc.aio.AioRpcError:
                return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    return check


def _token(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text().strip()
    return ""


def registered(registry: str, service: str, instance: str, token_file: Path) -> Ready:
    """The registry lists `instance` (metadata) of `service`, not NOT_SERVING."""
    from framework.client import connect
    from framework.registry.model import Health
    from gen.registry.v1 import registry_pb2
    from gen.registry.v1.registry_pb2_grpc import RegistryServiceStub

    async def check() -> bool:
        token = _token(token_file)
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        channel = connect(registry)
        try:
            view = await RegistryServiceStub(channel).Discover(
                registry_pb2.DiscoverRequest(service=service, include_unhealthy=True),
                metadata=metadata,
                timeout=_ATTEMPT_TIMEOUT_S,
            )
        except (grpc.aio.AioRpcError, FrameworkError):
            return False
        finally:
            await channel.close()
        return any(
            i.metadata.get("instance") == instance and i.health != Health.NOT_SERVING.value
            for i in view.instances
        )

    return check


def http_ok(url: str) -> Ready:
    """`GET url` answers 2xx."""

    async def check() -> bool:
        import httpx

        try:
            async with httpx.AsyncClient(timeout=_ATTEMPT_TIMEOUT_S) as client:
                response = await client.get(url)
        except httpx.HTTPError:
            return False
        return response.is_success

    return check
