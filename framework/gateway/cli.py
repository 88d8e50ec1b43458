"""`python -m framework gateway`: serve the HTTP/JSON gateway.

    python -m framework gateway --registry 127.0.0.1:50051 --port 8080
    python -m framework gateway --backend inventory.v1.InventoryService=127.0.0.1:50061 --auth off

Flags win over the `GATEWAY_*` environment (see framework/gateway/config.py).
Tracing follows the `OTEL_*` environment when an exporter is configured.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from framework.telemetry.sdk import Telemetry

__all__ = ["main"]

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m framework gateway",
        description="HTTP/JSON and gRPC-Web gateway generated from the services' contracts.",
    )
    parser.add_argument("--registry", help="registry host:port (GATEWAY_REGISTRY)")
    parser.add_argument(
        "--backend",
        action="append",
        default=[],
        metavar="SERVICE=HOST:PORT",
        help="a fixed target for a service, instead of the registry (repeatable)",
    )
    parser.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="PKG.SERVICE",
        help="a service to expose (repeatable; default: every annotated service)",
    )
    parser.add_argument("--host", help="address to listen on (GATEWAY_HOST, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (GATEWAY_PORT, 8080)")
    parser.add_argument(
        "--auth", choices=["jwt", "off"], help="verify bearer tokens at the gateway (GATEWAY_AUTH)"
    )
    parser.add_argument("--routes", action="store_true", help="print the routes and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from framework.gateway.config import GatewayConfig
    from framework.gateway.serving import build_gateway, serve

    backends: dict[str, str] = {}
    for pair in args.backend:
        service, sep, target = pair.partition("=")
        if not sep:
            print(f"--backend expects SERVICE=HOST:PORT, got {pair!r}", file=sys.stderr)
            return 2
        backends[service] = target
    try:
        config = GatewayConfig.from_env(
            registry=args.registry,
            backends=backends or None,
            services=tuple(args.service) or None,
            host=args.host,
            port=args.port,
            auth=args.auth,
        )
    except ValueError as error:
        print(f"gateway: {error}", file=sys.stderr)
        return 2
    telemetry = _telemetry()
    try:
        gateway = build_gateway(
            config, tracer_provider=telemetry.tracer_provider if telemetry is not None else None
        )
    except ValueError as error:  # a service or binding that cannot be served
        print(f"gateway: {error}", file=sys.stderr)
        return 2
    if args.routes:
        for binding in gateway.routes.bindings:
            print(f"{binding.http_method:7} {binding.template.source:45} {binding.full_name}")
        return 0
    try:
        asyncio.run(serve(gateway))
    finally:
        if telemetry is not None:
            telemetry.shutdown()
    return 0


def _telemetry() -> Telemetry | None:
    """OpenTelemetry from OTEL_* when a trace exporter is configured, else None (no tracing)."""
    from framework.telemetry.sdk import Telemetry, TelemetryConfig

    config = TelemetryConfig.from_env()
    if config.disabled or config.traces_exporter == "none":
        return None
    return Telemetry.build(config)
