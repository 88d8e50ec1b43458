"""Building a gateway from its configuration, and serving it with uvicorn.

config = GatewayConfig.from_env()
gateway = build_gateway(config)            # routes, backends, chains
await serve(gateway)                       # until SIGINT/SIGTERM

async with running(gateway, port=0) as url:   # tests: a real server on 127.0.0.1
    ...
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
from collections.abc import AsyncIterator, Sequence

from framework.clock import Clock
from framework.gateway.app import Gateway
from framework.gateway.backends import Backends
from framework.gateway.config import GatewayConfig
from framework.gateway.routes import RouteTable, annotated_services, import_contracts
from framework.policy import Policy

__all__ = [
    "build_gateway",
    "default_client_policies",
    "default_ingress_policies",
    "running",
    "serve",
]

logger = logging.getLogger(__name__)


def default_ingress_policies(
    config: GatewayConfig,
    *,
    tracer_provider: object | None = None,
    clock: Clock | None = None,
) -> list[Policy]:
    """Tracing (when a provider is given), token verification, rate limit per caller."""
    from framework.policies.ratelimit import Limit, RateLimitConfig, RateLimitPolicy

    policies: list[Policy] = []
    if tracer_provider is not None:
        from framework.telemetry.tracing import TracingPolicy

        policies.append(TracingPolicy(tracer_provider))  # type: ignore[arg-type]
    if config.auth == "jwt":
        policies.append(_auth_policy(config, clock))
    limit = Limit(config.rate_per_s, config.burst)
    policies.append(RateLimitPolicy(RateLimitConfig(default=limit), clock=clock))
    return policies


def _auth_policy(config: GatewayConfig, clock: Clock | None) -> Policy:
    from framework.auth.keyset import JwksFile, KeySet, KeySource, StaticKeys, VerificationKey
    from framework.auth.policy import AuthPolicy
    from framework.auth.verifier import JwtConfig, JwtVerifier

    source: KeySource
    if config.jwks_file:
        source = JwksFile(config.jwks_file)
    else:
        assert config.jwt_secret is not None
        source = StaticKeys([VerificationKey.hmac(config.jwt_kid, config.jwt_secret)])
    issuer = config.jwt_issuer or None
    verifier = JwtVerifier(
        KeySet(source),
        JwtConfig(issuer=issuer if issuer is None else tuple(issuer), audience=config.jwt_audience),
    )
    return AuthPolicy(verifier)


def default_client_policies(*, tracer_provider: object | None = None) -> list[Policy]:
    """Tracing (when a provider is given) and a circuit breaker per instance and method."""
    from framework.policies.breaker import CircuitBreakerPolicy

    policies: list[Policy] = []
    if tracer_provider is not None:
        from framework.telemetry.tracing import TracingPolicy

        policies.append(TracingPolicy(tracer_provider))  # type: ignore[arg-type]
    policies.append(CircuitBreakerPolicy())
    return policies


def build_gateway(
    config: GatewayConfig,
    *,
    services: Sequence[str] | None = None,
    ingress_policies: Sequence[Policy] | None = None,
    client_policies: Sequence[Policy] | None = None,
    registry_policies: Sequence[Policy] = (),
    tracer_provider: object | None = None,
    clock: Clock | None = None,
) -> Gateway:
    """A gateway for `services` (default: `config.services`, else every annotated one)."""
    import_contracts()
    names = list(services or config.services or annotated_services())
    routes = RouteTable.from_services(names)
    if ingress_policies is None:
        ingress_policies = default_ingress_policies(
            config, tracer_provider=tracer_provider, clock=clock
        )
    if client_policies is None:
        client_policies = default_client_policies(tracer_provider=tracer_provider)
    backends = Backends(
        names,
        registry=config.registry,
        targets=config.backends,
        policies=client_policies,
        registry_policies=registry_policies,
    )
    from framework.telemetry.tracing import TracingPolicy

    traced = any(isinstance(p, TracingPolicy) for p in client_policies)
    return Gateway(
        config,
        routes=routes,
        backends=backends,
        ingress_policies=ingress_policies,
        forward_trace_headers=not traced,
    )


def _uvicorn_config(gateway: Gateway, host: str, port: int) -> object:
    import uvicorn

    http = "httptools" if importlib.util.find_spec("httptools") is not None else "h11"
    return uvicorn.Config(
        gateway.app,
        host=host,
        port=port,
        http=http,
        loop="none",  # the running asyncio loop (grpc.aio lives on it)
        lifespan="off",
        access_log=False,
        log_level="warning",
        server_header=False,
        proxy_headers=False,  # X-Forwarded-For is trusted only per GatewayConfig.trusted_proxies
    )


@contextlib.asynccontextmanager
async def running(
    gateway: Gateway, *, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 10.0
) -> AsyncIterator[str]:
    """Start the gateway (backends and an HTTP server); yield its base URL; stop it."""
    import uvicorn

    await gateway.start()
    server = uvicorn.Server(_uvicorn_config(gateway, host, port))  # type: ignore[arg-type]
    task = asyncio.create_task(server.serve())
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + start_timeout_s
        while not server.started:
            if task.done():
                task.result()  # raises why it could not start
                raise RuntimeError("the gateway's HTTP server stopped while starting")
            if loop.time() > deadline:
                raise TimeoutError(f"the gateway did not start within {start_timeout_s}s")
            await asyncio.sleep(0.01)
        bound = server.servers[0].sockets[0].getsockname()
        yield f"http://{host}:{bound[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait([task], timeout=start_timeout_s)
        await gateway.close()


async def serve(gateway: Gateway) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn's own signal handling)."""
    import uvicorn

    config = gateway.config
    await gateway.start()
    try:
        server = uvicorn.Server(_uvicorn_config(gateway, config.host, config.port))  # type: ignore[arg-type]
        logger.info(
            "gateway on http://%s:%s for %s",
            config.host,
            config.port,
            ", ".join(sorted(gateway.services)),
        )
        await server.serve()
    finally:
        await gateway.close()
