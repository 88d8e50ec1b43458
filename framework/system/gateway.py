"""The HTTP gateway as a process of a system: `python -m framework.system.gateway`.

What `python -m framework up` starts: `framework.gateway` configured from `GATEWAY_*`
(set by `up`: the registry, the system's key set, issuers and audience, the services
to expose, host and port), finding the services through the registry with this
process's workload token (the registry only answers authenticated watchers).  Callers'
`Authorization` headers are verified at the gateway and passed on to the services.
"""

from __future__ import annotations

import asyncio
import logging

from framework.system.runtime import RuntimeConfig, ServiceRuntime

__all__ = ["main"]


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from framework.gateway.config import GatewayConfig
    from framework.gateway.serving import build_gateway, serve

    runtime = ServiceRuntime(RuntimeConfig.from_env("gateway"))
    gateway = build_gateway(GatewayConfig.from_env(), registry_policies=[runtime.bearer()])
    asyncio.run(serve(gateway))


if __name__ == "__main__":
    main()
