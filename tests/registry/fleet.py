"""In-process registries and echo instances for the registry tests and benchmark."""

from __future__ import annotations

from asyncio.subprocess import Process
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from framework.auth.grants import NameGrants
from framework.clock import Clock, SystemClock
from framework.config import ServerConfig
from framework.policy import BasePolicy, Call, Policy, Side
from framework.registry.agent import AgentConfig, RegistrationAgent
from framework.registry.health_probe import ChannelFactory, ProbeConfig
from framework.registry.registry import Registry, RegistryConfig
from framework.registry.service import RegistryServicer
from framework.registry.store import RegistryStore
from framework.server import Server
from framework.testing.echo import EchoServicer

ECHO = "echo.v1.EchoService"
REPO = Path(__file__).resolve().parents[2]
NO_PROBE = ProbeConfig(interval_s=0)

# For a test taking the `backend` fixture: run on SQLite only (what it tests does not
# depend on the store, and it is slow enough that a second run would cost).
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


@dataclass(frozen=True)
class Backend:
    """Where a test's registry keeps its state (`backend` fixture): `make()` gives a new,
    unopened store on that same state, so a restarted registry finds what it had."""

    name: str
    make: Callable[[], RegistryStore]


@dataclass
class RegistryNode:
    """A running registry: the use cases and the gRPC server serving them."""

    registry: Registry
    server: Server

    @property
    def address(self) -> str:
        return self.server.address

    async def stop(self) -> None:
        await self.server.stop(grace_s=0)
        await self.registry.close()


async def start_registry(
    store: RegistryStore,
    *,
    clock: Clock | None = None,
    probe: ProbeConfig = NO_PROBE,
    sweep_interval_s: float = 1.0,
    port: int = 0,
    policies: Sequence[Policy] = (),
    grants: NameGrants | None = None,
    probe_channel_factory: ChannelFactory | None = None,
) -> RegistryNode:
    registry = Registry(
        store,
        RegistryConfig(sweep_interval_s=sweep_interval_s, watch_poll_s=0.5, probe=probe),
        clock=clock,
        probe_clock=SystemClock(),
        probe_channel_factory=probe_channel_factory,
    )
    await registry.start()
    server = Server(
        # no policies: the registry tests' anonymous registry (insecure_dev)
        ServerConfig(
            name="registry", port=port, grace_s=0, reflection=False, insecure_dev=not policies
        ),
        policies=policies,
    )
    server.add(RegistryServicer(registry, grants=grants))
    await server.start()
    return RegistryNode(registry, server)


@asynccontextmanager
async def registry_node(store: RegistryStore, **kwargs: object) -> AsyncIterator[RegistryNode]:
    node = await start_registry(store, **kwargs)  # type: ignore[arg-type]
    try:
        yield node
    finally:
        await node.stop()


@dataclass
class EchoInstance:
    """An echo server, self-registered through its agent unless `agent` is None."""

    server: Server
    servicer: EchoServicer
    agent: RegistrationAgent | None
    version: str = ""
    stopped: bool = field(default=False)

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def calls(self) -> int:
        return self.servicer.calls.get("Echo", 0)

    async def stop(self, grace_s: float | None = None) -> None:
        if not self.stopped:
            self.stopped = True
            await self.server.stop(grace_s)


async def start_echo(
    registry_address: str | None,
    *,
    version: str = "v1",
    ttl_s: float = 10.0,
    weight: int = 100,
    grace_s: float = 2.0,
    drain_delay_s: float = 0.0,
    deregister_wait_s: float | None = None,
    deregister_wait_max_s: float | None = None,
    servicer: EchoServicer | None = None,
) -> EchoInstance:
    """An echo server (`servicer`, a plain EchoServicer by default); with a registry
    address it registers itself (agent hook; the agent's deregister_wait_s is
    AgentConfig's default unless given)."""
    servicer = servicer or EchoServicer()
    server = Server(
        ServerConfig(
            name=f"echo-{version}",
            grace_s=grace_s,
            drain_delay_s=drain_delay_s,
            reflection=False,
            insecure_dev=True,  # the echo test service, no AuthPolicy
        )
    )
    server.add(servicer)
    agent = None
    if registry_address is not None:
        config = AgentConfig(version=version, ttl_s=ttl_s, weight=weight)
        if deregister_wait_max_s is not None:
            config = replace(config, deregister_wait_max_s=deregister_wait_max_s)
        if deregister_wait_s is not None:
            config = replace(config, deregister_wait_s=deregister_wait_s)
        agent = RegistrationAgent(registry_address, ECHO, config)
        server.add_hook(agent)
    await server.start()
    return EchoInstance(server, servicer, agent, version)


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 60.0) -> None:
    """Poll `predicate` every few ms; fail the test when it stays false for `timeout_s`."""
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.01)


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 60.0) -> None:
    """Like `wait_until`, for a check that has to await."""
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.01)


async def spawn(
    module: str, *args: str, log: Path, prefix: Sequence[str] = ()
) -> tuple[Process, str]:
    """`[prefix...] python -m module args...` in its own process; returns it and the address
    it prints as its first line (its stderr goes to `log`, shown if it fails to start)."""
    import asyncio
    import sys

    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            *prefix,
            sys.executable,
            "-m",
            module,
            *args,
            cwd=REPO,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), timeout=30)
    except TimeoutError:
        process.kill()
        await process.wait()
        output = await asyncio.to_thread(log.read_text)
        raise AssertionError(f"{module} did not start: {output}") from None
    if not line:
        await process.wait()
        output = await asyncio.to_thread(log.read_text)
        raise AssertionError(f"{module} exited: {output}")
    return process, line.decode().strip()


async def stop_process(process: Process) -> None:
    """Kill a spawned process if it still runs, and reap it."""
    if process.returncode is None:
        process.kill()
        await process.wait()


class Attempts(BasePolicy):
    """Client policy counting attempts per instance (each instance channel runs it)."""

    sides = frozenset({Side.CLIENT})

    def __init__(self) -> None:
        self.targets: Counter[str] = Counter()

    def enter(self, call: Call) -> None:
        self.targets[call.target] += 1


def free_port() -> int:
    """A port nothing listens on (bound and released; only used on 127.0.0.1)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
