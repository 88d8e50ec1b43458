"""A registry replica on PostgreSQL in a process of its own (e.g. under `faketime`).

    python -m tests.registry.replica DSN SCHEMA

Starts a registry (probing off, sweeping every 0.2 s) on 127.0.0.1:0, writes its
address and whether it leads as one line ("ADDRESS leader|follower") to stdout
once started, then serves until stdin closes.
"""

from __future__ import annotations

import asyncio
import sys

from framework.config import ServerConfig
from framework.registry.health_probe import ProbeConfig
from framework.registry.postgres import PostgresStore
from framework.registry.registry import Registry, RegistryConfig
from framework.registry.service import RegistryServicer
from framework.server import Server


async def main(dsn: str, schema: str) -> None:
    registry = Registry(
        PostgresStore(dsn, schema=schema),
        RegistryConfig(sweep_interval_s=0.2, probe=ProbeConfig(interval_s=0)),
    )
    await registry.start()
    server = Server(ServerConfig(name="registry", grace_s=0, reflection=False, insecure_dev=True))
    server.add(RegistryServicer(registry))
    await server.start()
    role = "leader" if registry.leading else "follower"
    sys.stdout.write(f"{server.address} {role}\n")
    sys.stdout.flush()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(0)
    await registry.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
