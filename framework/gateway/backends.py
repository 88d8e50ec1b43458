"""The services behind the gateway: one channel per service, and their health.

A service with a fixed target (`backends={"pkg.Service": "host:port"}`) gets a
`framework.client.connect` channel; every other one a registry-balanced
`BalancedChannel` (instances from the registry's Watch, one pick per call,
retries of idempotent calls on another instance).  Both run the gateway's
client policies on every attempt (breaker, tracing, bearer... and the pinned
deadline step).  Multicallables are made once per method and cached.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from framework.client import connect
from framework.config import ClientConfig
from framework.errors import FrameworkError, UnavailableError
from framework.policy import Policy

__all__ = ["Backends"]

logger = logging.getLogger(__name__)

_HEALTH_CHECK = "/grpc.health.v1.Health/Check"


class Backends:
    """Channels to the exposed services; `start()` opens them, `close()` closes them."""

    def __init__(
        self,
        services: Sequence[str],
        *,
        registry: str | None = None,
        targets: Mapping[str, str] | None = None,
        policies: Sequence[Policy] = (),
        registry_policies: Sequence[Policy] = (),
        credentials: grpc.ChannelCredentials | None = None,
        balancer_config: Any = None,
    ) -> None:
        self.services = tuple(services)
        self.registry = registry
        self.targets = dict(targets or {})
        missing = [s for s in self.services if s not in self.targets]
        if missing and registry is None:
            raise ValueError(
                f"no registry and no fixed target for {', '.join(missing)}: "
                "give a registry or a backend target for each service"
            )
        self.policies = tuple(policies)
        self.registry_policies = tuple(registry_policies)
        self.credentials = credentials
        self.balancer_config = balancer_config
        # The gateway sets every deadline itself (caller, contract, or its default).
        self.client_config = ClientConfig(default_timeout_s=None)
        self._channels: dict[str, Any] = {}
        self._callables: dict[tuple[str, str, str, bool], Any] = {}

    async def start(self) -> None:
        for service in self.services:
            if service in self._channels:
                continue
            target = self.targets.get(service)
            if target is not None:
                self._channels[service] = connect(
                    target,
                    policies=self.policies,
                    config=self.client_config,
                    credentials=self.credentials,
                )
            else:
                from framework.registry.channel import balanced_channel

                assert self.registry is not None
                self._channels[service] = await balanced_channel(
                    self.registry,
                    service,
                    policies=self.policies,
                    registry_policies=self.registry_policies,
                    credentials=self.credentials,
                    client_config=self.client_config,
                    config=self.balancer_config,
                )

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        self._callables.clear()
        await asyncio.gather(*(c.close() for c in channels.values()), return_exceptions=True)

    def channel(self, service: str) -> Any:
        channel = self._channels.get(service)
        if channel is None:
            raise UnavailableError(
                f"the gateway has no channel to {service!r}; it is not one of the exposed "
                "services or the gateway is not started",
                reason="NO_BACKEND",
            )
        return channel

    def callable(
        self,
        service: str,
        method: str,
        *,
        streaming: bool,
        serializer: Any = None,
        deserializer: Any = None,
    ) -> Any:
        """The multicallable for `method` ("/pkg.Service/M"), made once.

        Without (de)serializers it sends and returns raw bytes (gRPC-Web).
        """
        key = (service, method, "raw" if serializer is None else "typed", streaming)
        found = self._callables.get(key)
        if found is None:
            channel = self.channel(service)
            make = channel.unary_stream if streaming else channel.unary_unary
            found = make(method, request_serializer=serializer, response_deserializer=deserializer)
            self._callables[key] = found
        return found

    async def health(self, service: str, timeout_s: float) -> str:
        """The service's `grpc.health.v1` status name, or why it could not be asked."""
        check = self.callable(
            service,
            _HEALTH_CHECK,
            streaming=False,
            serializer=health_pb2.HealthCheckRequest.SerializeToString,
            deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            response = await check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except FrameworkError as error:
            return f"{error.code().name}: {error.message}"
        except grpc.aio.AioRpcError as error:
            return f"{error.code().name}: {error.details()}"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
