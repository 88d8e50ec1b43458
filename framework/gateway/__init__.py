"""HTTP/JSON gateway from the contracts: transcoding, OpenAPI, gRPC-Web (see README.md).

Needs the `gateway` extra (starlette, uvicorn).  Names load on first use, so
`import framework.gateway` alone imports neither:

    from framework.gateway import GatewayConfig, build_gateway, serve, running
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "Gateway": "framework.gateway.app",
    "GatewayConfig": "framework.gateway.config",
    "Backends": "framework.gateway.backends",
    "RouteTable": "framework.gateway.routes",
    "Binding": "framework.gateway.routes",
    "PathTemplate": "framework.gateway.templates",
    "build_gateway": "framework.gateway.serving",
    "default_client_policies": "framework.gateway.serving",
    "default_ingress_policies": "framework.gateway.serving",
    "running": "framework.gateway.serving",
    "serve": "framework.gateway.serving",
    "openapi_document": "framework.gateway.openapi",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'framework.gateway' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
