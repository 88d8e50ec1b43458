"""A real gateway (uvicorn on 127.0.0.1:0) in front of real gRPC test services.

`harness(...)` starts the library and echo servicers on one in-process gRPC
server (port 0) with the backend policies, builds the gateway with fixed
backend targets, serves it over HTTP and yields a `Harness` with an httpx
client on it.  Tokens are HS256 JWTs minted with `mint(...)`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import pytest

from framework.gateway import Gateway, GatewayConfig, build_gateway, running
from framework.policies.validation import ValidationPolicy
from framework.policy import Policy
from framework.testing import TestServer, serve
from framework.testing.echo import EchoServicer
from tests.gateway.library import LibraryServicer

SECRET = "gateway-test-secret-0123456789abcdef0123"
LIBRARY = "gateway.v1.LibraryService"
ECHO = "echo.v1.EchoService"


def mint(scopes: Sequence[str] = (), *, subject: str = "alice", secret: str = SECRET) -> str:
    now = int(time.time())
    claims = {"sub": subject, "iat": now, "exp": now + 3600, "scope": " ".join(scopes)}
    return jwt.encode(claims, secret, algorithm="HS256", headers={"kid": "dev"})


def bearer(*scopes: str, subject: str = "alice") -> dict[str, str]:
    return {"authorization": f"Bearer {mint(scopes, subject=subject)}"}


@dataclass
class Harness:
    url: str
    client: httpx.AsyncClient
    gateway: Gateway
    backend: TestServer
    library: LibraryServicer
    echo: EchoServicer
    extra: dict[str, Any] = field(default_factory=dict)


@asynccontextmanager
async def harness(
    *,
    backend_policies: Sequence[Policy] | None = None,
    ingress_policies: Sequence[Policy] | None = None,
    client_policies: Sequence[Policy] | None = None,
    **config: Any,
) -> AsyncIterator[Harness]:
    library, echo = LibraryServicer(), EchoServicer()
    policies = [ValidationPolicy()] if backend_policies is None else backend_policies
    async with serve(library, echo, policies=policies) as backend:
        settings: dict[str, Any] = {
            "port": 0,
            "backends": {LIBRARY: backend.target, ECHO: backend.target},
            "jwt_secret": SECRET,
        }
        settings.update(config)
        gateway = build_gateway(
            GatewayConfig(**settings),
            services=[LIBRARY, ECHO],
            ingress_policies=ingress_policies,
            client_policies=client_policies,
        )
        async with running(gateway) as url, httpx.AsyncClient(base_url=url, timeout=60) as client:
            yield Harness(url, client, gateway, backend, library, echo)


@pytest.fixture
async def gw() -> AsyncIterator[Harness]:
    """The default harness: gateway auth on (HS256), validation on the backend."""
    async with harness() as h:
        yield h
