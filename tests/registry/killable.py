"""An echo instance in a process of its own, for tests that SIGKILL it.

    python -m tests.registry.killable REGISTRY_ADDRESS TTL_S

Starts a framework server with the echo servicer on 127.0.0.1:0, registers it
through a `RegistrationAgent` (lease `TTL_S`), writes its address as one line
to stdout once registered, then serves until it is killed.
"""

from __future__ import annotations

import asyncio
import sys

from framework.config import ServerConfig
from framework.registry.agent import AgentConfig, RegistrationAgent
from framework.server import Server
from framework.testing.echo import EchoServicer
from tests.registry.fleet import ECHO


async def main(registry: str, ttl_s: float) -> None:
    server = Server(
        ServerConfig(
            name="echo-killable", host="127.0.0.1", port=0, reflection=False, insecure_dev=True
        )
    )
    server.add(EchoServicer())
    agent = RegistrationAgent(registry, ECHO, AgentConfig(ttl_s=ttl_s))
    server.add_hook(agent)
    await server.start()
    if not agent.lease_id:
        raise SystemExit(f"could not register {server.address} with {registry}")
    sys.stdout.write(server.address + "\n")
    sys.stdout.flush()
    await asyncio.Event().wait()  # until SIGKILL


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2])))
