"""What every service process of a system shares: configuration from the environment,
the server chain, its workload identity, discovery of the others, and its database.

A service's `main.py` stays a composition root:

    runtime = ServiceRuntime(RuntimeConfig.from_env("payment"))
    db = await runtime.open_database(types)
    server = runtime.server(health_checks=[Check("database", db.ping)])
    server.add(PaymentServicer(...))
    runtime.register(server, "payment.v1.PaymentService")
    await server.serve()

`python -m framework up` sets the environment (`SERVICE_*`, see `RuntimeConfig`);
tests build a `RuntimeConfig` directly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from framework.auth.bearer import BearerToken
from framework.auth.keyset import JwksFile, KeySet
from framework.auth.policy import AuthPolicy
from framework.auth.verifier import JwtConfig, JwtVerifier
from framework.config import ServerConfig
from framework.events.typeregistry import EventTypeRegistry
from framework.health import HealthCheck
from framework.policies.accesslog import AccessLogPolicy
from framework.policies.breaker import CircuitBreakerPolicy
from framework.policies.faults import FaultInjectionPolicy, FaultInjectionServicer
from framework.policies.idempotency import IdempotencyKeyPolicy
from framework.policies.ratelimit import RateLimitPolicy
from framework.policies.validation import ValidationPolicy
from framework.policy import Policy, Side
from framework.server import Server
from framework.system.database import ServiceDatabase, StoreUrl
from framework.system.keys import PLATFORM_ISSUER, USER_ISSUER, TokenFile

__all__ = ["Closable", "RuntimeConfig", "ServiceRuntime"]

logger = logging.getLogger(__name__)


def _get(env: Mapping[str, str], key: str, default: str = "") -> str:
    value = env.get(key)
    return value if value else default


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """A service process's settings (read once at start-up)."""

    name: str
    server: ServerConfig
    jwks_path: str
    audience: str
    issuers: tuple[str, ...] = (USER_ISSUER, PLATFORM_ISSUER)
    instance: str = ""
    registry: str = ""  # host:port of the registry; "" = do not register
    version: str = "v1"
    registration_ttl_s: float = 10.0
    token_file: str = ""  # this process's workload token (for calls to other services)
    store_url: str = ""  # sqlite:PATH or postgresql://...
    store_schema: str = ""
    bus_url: str = "store"  # "store" (read events from the owner's store) or nats://...
    bus_stream: str = "EVENTS"  # JetStream stream of the system
    bus_subject_prefix: str = "events"
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("RuntimeConfig.name must name the service")
        if not self.jwks_path:
            raise ValueError(
                f"{self.name}: no key set to verify tokens with; set SERVICE_JWKS (a JWKS file), "
                "or start the system with `python -m framework up`"
            )
        if not self.audience:
            raise ValueError(f"{self.name}: SERVICE_JWT_AUDIENCE must name the system")

    @classmethod
    def from_env(cls, name: str, environ: Mapping[str, str] | None = None) -> RuntimeConfig:
        """`SERVICE_*` variables (as `python -m framework up` sets them)."""
        env = os.environ if environ is None else environ
        issuers = _get(env, "SERVICE_JWT_ISSUERS", f"{USER_ISSUER},{PLATFORM_ISSUER}")
        try:
            ttl = float(_get(env, "SERVICE_REGISTRATION_TTL_S", "10"))
        except ValueError as error:
            raise ValueError(f"SERVICE_REGISTRATION_TTL_S: {error}") from None
        return cls(
            name=name,
            server=ServerConfig.from_env(name, env),
            jwks_path=_get(env, "SERVICE_JWKS"),
            audience=_get(env, "SERVICE_JWT_AUDIENCE"),
            issuers=tuple(i.strip() for i in issuers.split(",") if i.strip()),
            instance=_get(env, "SERVICE_INSTANCE", name),
            registry=_get(env, "SERVICE_REGISTRY"),
            version=_get(env, "SERVICE_VERSION", "v1"),
            registration_ttl_s=ttl,
            token_file=_get(env, "SERVICE_TOKEN_FILE"),
            store_url=_get(env, "SERVICE_STORE"),
            store_schema=_get(env, "SERVICE_STORE_SCHEMA"),
            bus_url=_get(env, "SERVICE_BUS", "store"),
            bus_stream=_get(env, "SERVICE_BUS_STREAM", "EVENTS"),
            bus_subject_prefix=_get(env, "SERVICE_BUS_SUBJECT_PREFIX", "events"),
            extra=dict(env),
        )


class ServiceRuntime:
    """Builds a service's server, identity, channels and database from a `RuntimeConfig`."""

    def __init__(self, config: RuntimeConfig) -> None:
        self.config = config
        self.faults = FaultInjectionPolicy()
        self._verifier: JwtVerifier | None = None
        self._bearer: BearerToken | None = None
        self._breakers = CircuitBreakerPolicy()
        self._channels: list[Any] = []
        self._close_first: list[Closable] = []

    # ------------------------------------------------------------ identity
    def verifier(self) -> JwtVerifier:
        """Verifies tokens of the system's issuers (the JWKS file is re-read when it changes)."""
        if self._verifier is None:
            keys = KeySet(JwksFile(self.config.jwks_path))
            self._verifier = JwtVerifier(
                keys, JwtConfig(issuer=self.config.issuers, audience=self.config.audience)
            )
        return self._verifier

    def bearer(self) -> BearerToken:
        """This process's workload token (re-read from its file before it expires)."""
        if self._bearer is None:
            if not self.config.token_file:
                raise ValueError(
                    f"{self.config.name} calls other services but has no workload token: "
                    "set SERVICE_TOKEN_FILE (python -m framework up does)"
                )
            self._bearer = BearerToken(provider=TokenFile(self.config.token_file).provide)
        return self._bearer

    # ------------------------------------------------------------ serving
    def server_policies(self, extra: Sequence[Policy] = ()) -> list[Policy]:
        """The server chain, outermost first.

        Access log; authentication (scopes from the contract); rate limits keyed by
        the verified subject (so after auth); idempotency keys where the contract
        requires them; validation rules; then `extra`; fault injection last, so an
        experiment delays or fails the handler itself, never a rejected call.
        """
        return [
            AccessLogPolicy(),
            AuthPolicy(self.verifier()),
            RateLimitPolicy(),
            IdempotencyKeyPolicy(),
            ValidationPolicy(),
            *extra,
            self.faults,
        ]

    def server(
        self,
        *,
        health_checks: Sequence[HealthCheck] = (),
        policies: Sequence[Policy] = (),
        hooks: Sequence[object] = (),
        closing: Sequence[Closable] = (),
    ) -> Server:
        """A server with the system's chain and the fault admin RPC.

        Once it has drained, the runtime's channels are closed, then `closing`
        (e.g. the database) in order.
        """
        server = Server(
            self.config.server,
            policies=self.server_policies(policies),
            health_checks=health_checks,
            hooks=[*hooks, _CloseAfterDrain(self, closing)],
        )
        server.add(FaultInjectionServicer(self.faults))
        from framework.system.admin import BreakerServicer

        server.add(BreakerServicer(self.config.instance, self._breakers))
        return server

    def register(
        self, server: Server, *services: str, metadata: Mapping[str, str] | None = None
    ) -> None:
        """Register `services` (full names) served by `server` in the registry while it runs."""
        if not self.config.registry:
            logger.info("%s: no SERVICE_REGISTRY, not registering", self.config.name)
            return
        from framework.registry.agent import AgentConfig, RegistrationAgent

        meta = {"instance": self.config.instance, "service": self.config.name, **(metadata or {})}
        for service in services:
            agent = RegistrationAgent(
                self.config.registry,
                service,
                AgentConfig(
                    version=self.config.version, ttl_s=self.config.registration_ttl_s, metadata=meta
                ),
                policies=self._registry_policies(),
            )
            server.add_hook(agent)

    def _registry_policies(self) -> list[Policy]:
        return [self.bearer()] if self.config.token_file else []

    # ------------------------------------------------------------ calling others
    def client_policies(self) -> list[Policy]:
        """Outbound chain: breaker per instance and method, workload token, idempotency keys."""
        return [self._breakers, self.bearer(), IdempotencyKeyPolicy(Side.CLIENT)]

    @property
    def breakers(self) -> CircuitBreakerPolicy:
        return self._breakers

    async def channel(self, service: str, *, metadata: Mapping[str, str] | None = None) -> Any:
        """A balanced channel to `service` (full name) through the registry; `metadata`
        selects instances (e.g. `{"service": "order"}` for the order service's event store)."""
        if not self.config.registry:
            raise ValueError(f"{self.config.name} needs SERVICE_REGISTRY to call {service}")
        from framework.registry.channel import balanced_channel
        from framework.registry.model import Selector

        channel = await balanced_channel(
            self.config.registry,
            service,
            selector=Selector(metadata=dict(metadata or {})),
            policies=self.client_policies(),
            registry_policies=self._registry_policies(),
        )
        self._channels.append(channel)
        return channel

    async def resolve(
        self, service: str, *, metadata: Mapping[str, str] | None = None
    ) -> list[str]:
        """Addresses of the healthy instances of `service` now (one registry query)."""
        if not self.config.registry:
            raise ValueError(f"{self.config.name} needs SERVICE_REGISTRY to find {service}")
        from framework.client import connect
        from gen.registry.v1 import registry_pb2
        from gen.registry.v1.registry_pb2_grpc import RegistryServiceStub

        channel = connect(self.config.registry, policies=self._registry_policies())
        try:
            view = await RegistryServiceStub(channel).Discover(
                registry_pb2.DiscoverRequest(service=service), timeout=5.0
            )
        finally:
            await channel.close()
        wanted = dict(metadata or {})
        return [
            i.address
            for i in view.instances
            if all(i.metadata.get(k) == v for k, v in wanted.items())
        ]

    def connect(self, address: str) -> Any:
        """A channel to one instance with the outbound chain, for long-lived streams tied
        to it (no default deadline: a subscription lasts as long as it is wanted)."""
        from framework.client import connect
        from framework.config import ClientConfig

        return connect(
            address,
            policies=[self.bearer(), IdempotencyKeyPolicy(Side.CLIENT)],
            config=ClientConfig(default_timeout_s=None),
        )

    def close_on_stop(self, resource: Closable) -> None:
        """Close `resource` once the server drained, before the `closing` ones (the database)."""
        self._close_first.append(resource)

    async def close(self) -> None:
        first, self._close_first = self._close_first, []
        for resource in reversed(first):
            await resource.close()
        channels, self._channels = self._channels, []
        for channel in channels:
            await channel.close()

    # ------------------------------------------------------------ data
    def store_url(self) -> StoreUrl:
        if not self.config.store_url:
            raise ValueError(
                f"{self.config.name} keeps data but SERVICE_STORE is not set "
                "(sqlite:PATH or a postgresql:// URL with SERVICE_STORE_SCHEMA)"
            )
        return StoreUrl(self.config.store_url, self.config.store_schema)

    async def open_database(self, types: EventTypeRegistry) -> ServiceDatabase:
        return await ServiceDatabase.open(self.store_url(), types)

    def with_server(self, **changes: Any) -> ServiceRuntime:
        """A runtime whose server config differs (tests: port 0)."""
        return ServiceRuntime(replace(self.config, server=replace(self.config.server, **changes)))


class Closable(Protocol):
    async def close(self) -> None: ...


class _CloseAfterDrain:
    """Server hook: close outbound channels, then the given resources, once drained."""

    def __init__(self, runtime: ServiceRuntime, closing: Sequence[Closable]) -> None:
        self.runtime = runtime
        self.closing = tuple(closing)

    async def on_stopped(self, server: Server) -> None:
        await self.runtime.close()
        for resource in self.closing:
            await resource.close()
