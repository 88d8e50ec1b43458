"""An echo instance whose Echo handler can block its event loop, in a process of its own.

    python -m tests.registry.slow REGISTRY_ADDRESS BLOCK_S

Registers itself (lease 30 s), writes its address as one line to stdout, then
serves.  While slow (the start state) every Echo call blocks the whole event
loop for BLOCK_S with `time.sleep` (the overloaded instance of issue #13:
health checks and other calls wait too).  A line "fast" on stdin ends that;
"slow" starts it again; each command is acknowledged with a line "ok".
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from framework.config import ServerConfig
from framework.registry.agent import AgentConfig, RegistrationAgent
from framework.server import Server
from framework.testing.echo import EchoServicer
from gen.echo.v1 import echo_pb2
from tests.registry.fleet import ECHO


class BlockingEcho(EchoServicer):
    """Echo that blocks the loop while `slow` is set."""

    def __init__(self, block_s: float) -> None:
        super().__init__()
        self.block_s = block_s
        self.slow = True

    async def Echo(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        if self.slow:
            time.sleep(self.block_s)  # noqa: ASYNC251 - on purpose: it blocks its event loop
        return await super().Echo(request, context)


async def main(registry: str, block_s: float) -> None:
    servicer = BlockingEcho(block_s)
    server = Server(
        ServerConfig(
            name="echo-slow", host="127.0.0.1", port=0, reflection=False, insecure_dev=True
        )
    )
    server.add(servicer)
    agent = RegistrationAgent(registry, ECHO, AgentConfig(ttl_s=30))
    server.add_hook(agent)
    await server.start()
    if not agent.lease_id:
        raise SystemExit(f"could not register {server.address} with {registry}")
    sys.stdout.write(server.address + "\n")
    sys.stdout.flush()
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        servicer.slow = line.strip() == "slow"
        sys.stdout.write("ok\n")
        sys.stdout.flush()
    await server.stop(0)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2])))
