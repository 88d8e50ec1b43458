"""Measure how long the registry and its clients take to recover from each fault.

    python -m tests.registry.recovery_times [--postgres DSN]

Runs each fault of the recovery table in framework/registry/README.md against
real servers on 127.0.0.1 with the default configuration (unless a row says
otherwise) and prints one line per fault: what the user saw, and the time to
recover.  Not a test (no assertions beyond sanity): the README quotes its output.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import asyncpg
import grpc

from framework.errors import FrameworkError
from framework.policies.faults import FaultInjectionPolicy, FaultRule
from framework.registry.channel import BalancedChannel, BalancerConfig, balanced_channel
from framework.registry.discovery import DiscoveryConfig
from framework.registry.health_probe import ProbeConfig
from framework.registry.postgres import PostgresStore
from framework.registry.registry import Registry, RegistryConfig
from framework.registry.sqlite import SqliteStore
from framework.registry.store import RegistryStore
from gen.echo.v1.echo_pb2 import EchoRequest
from gen.echo.v1.echo_pb2_grpc import EchoServiceStub
from gen.registry.v1 import registry_pb2 as pb
from gen.registry.v1.registry_pb2_grpc import RegistryServiceStub
from tests.registry.fleet import (
    ECHO,
    Attempts,
    RegistryNode,
    spawn,
    start_echo,
    stop_process,
)


async def _until(check: Callable[[], Awaitable[bool] | bool], limit_s: float = 120) -> float:
    """Seconds until `check` holds (polled every 5 ms)."""
    start = time.perf_counter()
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.perf_counter() - start
        if time.perf_counter() - start > limit_s:
            raise RuntimeError("not recovered within the limit")
        await asyncio.sleep(0.005)


async def _registry(store: RegistryStore, port: int = 0, **config: object) -> RegistryNode:
    from framework.config import ServerConfig
    from framework.registry.service import RegistryServicer
    from framework.server import Server

    registry = Registry(store, RegistryConfig(**config))  # type: ignore[arg-type]
    await registry.start()
    server = Server(
        ServerConfig(name="registry", port=port, grace_s=0, reflection=False, insecure_dev=True)
    )
    server.add(RegistryServicer(registry))
    await server.start()
    return RegistryNode(registry, server)


class Load:
    """Echo calls in a loop through a balanced client."""

    def __init__(self, channel: BalancedChannel, timeout_s: float = 5.0) -> None:
        self.channel = channel
        self.timeout_s = timeout_s
        self.ok = 0
        self.failed = 0
        self.done = False
        self.tasks = [asyncio.create_task(self._worker()) for _ in range(4)]

    async def _worker(self) -> None:
        stub = EchoServiceStub(self.channel)
        while not self.done:
            try:
                await stub.Echo(EchoRequest(text="x"), timeout=self.timeout_s)
                self.ok += 1
            except FrameworkError:
                self.failed += 1

    async def stop(self) -> None:
        self.done = True
        await asyncio.gather(*self.tasks)


async def registry_outage(tmp: Path, outage_s: float) -> str:
    node = await _registry(SqliteStore(tmp / f"outage-{outage_s}.sqlite"))
    port = node.server.port
    fleet = [await start_echo(node.address, ttl_s=2) for _ in range(3)]
    channel = await balanced_channel(node.address, ECHO)
    await _until(lambda: len(channel.endpoints) == 3)
    sizes: list[int] = []
    channel.discovery.subscribe(lambda view: sizes.append(len(view.instances)))
    load = Load(channel)
    leases = {i.agent.lease_id for i in fleet if i.agent}
    await node.stop()
    await asyncio.sleep(outage_s)
    node = await _registry(SqliteStore(tmp / f"outage-{outage_s}.sqlite"), port=port)
    restarted = time.perf_counter()
    store = node.registry.store
    extended = {i.lease_id: i.expires_at for i in await store.instances()}
    watch_s = await _until(lambda: channel.discovery.connected)

    async def renewed() -> bool:
        now = {i.lease_id: i.expires_at for i in await store.instances()}
        return all(now.get(lease, 0) > extended.get(lease, 0) for lease in leases)

    await _until(renewed)
    renew_s = time.perf_counter() - restarted
    await load.stop()
    same = {i.agent.lease_id for i in fleet if i.agent} == leases
    await channel.close()
    for instance in fleet:
        await instance.stop(0)
    await node.stop()
    return (
        f"registry down {outage_s:.1f} s (TTL 2 s): calls failed {load.failed} of "
        f"{load.ok + load.failed}, smallest view {min(sizes, default=3)} of 3, same leases "
        f"{same}; after the restart the watch resumed in {watch_s:.2f} s and every agent "
        f"renewed in {renew_s:.2f} s"
    )


async def client_start_from_cache(tmp: Path) -> str:
    node = await _registry(SqliteStore(tmp / "cache.sqlite"))
    fleet = [await start_echo(node.address) for _ in range(2)]
    config = DiscoveryConfig(cache_dir=str(tmp / "views"))
    first = await balanced_channel(node.address, ECHO, discovery_config=config)
    await _until(lambda: len(first.endpoints) == 2)
    await first.close()
    await node.stop()
    start = time.perf_counter()
    second = await balanced_channel(node.address, ECHO, discovery_config=config)
    await EchoServiceStub(second).Echo(EchoRequest(text="x"), timeout=5)
    took = time.perf_counter() - start
    bare = await balanced_channel(node.address, ECHO, config=BalancerConfig())
    start = time.perf_counter()
    try:
        await EchoServiceStub(bare).Echo(EchoRequest(text="x"), timeout=0.5)
        outcome = "answered"
    except FrameworkError as error:
        outcome = f"{error.code().name} {error.reason}"
    bare_s = time.perf_counter() - start
    await second.close()
    await bare.close()
    for instance in fleet:
        await instance.stop(0)
    return (
        f"client started while the registry is down: first call answered after {took:.3f} s "
        f"from the cached view; without cache or bootstrap a 0.5 s call ends {outcome} after "
        f"{bare_s:.2f} s"
    )


async def slow_instance(tmp: Path, registry: str) -> str:
    attempts = Attempts()
    good = [await start_echo(registry) for _ in range(2)]
    process, slow = await spawn("tests.registry.slow", registry, "2.0", log=tmp / "slow.log")
    channel = await balanced_channel(registry, ECHO, policies=[attempts])
    await _until(lambda: len(channel.endpoints) == 3)
    load = Load(channel, timeout_s=1.0)
    endpoint = channel.endpoints[slow]
    ejected_s = await _until(lambda: endpoint.outlier.ejected)
    failed_before = load.failed
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(b"fast\n")
    await process.stdin.drain()
    await process.stdout.readline()
    back_s = await _until(lambda: not endpoint.outlier.ejected)
    await load.stop()
    await channel.close()
    await stop_process(process)
    for instance in good:
        await instance.stop(0)
    return (
        f"an instance whose handler blocks its loop 2 s per call (calls with a 1 s timeout): "
        f"ejected after {ejected_s:.1f} s with {failed_before} calls "
        f"failed (DEADLINE_EXCEEDED); once fast, back after {back_s:.1f} s (ejection 30 s, "
        f"then 3 health probes 1 s apart)"
    )


async def killed_instance(tmp: Path, registry: str) -> str:
    survivors = [await start_echo(registry) for _ in range(2)]
    process, victim = await spawn("tests.registry.killable", registry, "10", log=tmp / "k.log")
    channel = await balanced_channel(registry, ECHO)
    await _until(lambda: len(channel.endpoints) == 3)
    load = Load(channel)
    await asyncio.sleep(0.5)
    process.kill()
    await process.wait()
    start = time.perf_counter()
    await _until(lambda: victim not in channel.endpoints)
    gone_s = time.perf_counter() - start
    await load.stop()
    await channel.close()
    for instance in survivors:
        await instance.stop(0)
    return (
        f"instance SIGKILLed under load: {load.failed} of {load.ok + load.failed} calls failed "
        f"(retried elsewhere); out of the client's view after {gone_s:.1f} s (health checks "
        f"every 2 s, 2 failures)"
    )


async def failing_fleet(registry: str) -> str:
    from framework.config import ServerConfig
    from framework.registry.agent import AgentConfig, RegistrationAgent
    from framework.server import Server
    from framework.testing.echo import EchoServicer

    servers, policies = [], []
    for _ in range(3):
        faults = FaultInjectionPolicy(
            [FaultRule("down", method="*/Echo", abort_code=grpc.StatusCode.UNAVAILABLE)]
        )
        server = Server(
            ServerConfig(name="echo", grace_s=0, reflection=False, insecure_dev=True),
            policies=[faults],
        )
        server.add(EchoServicer())
        server.add_hook(RegistrationAgent(registry, ECHO, AgentConfig()))
        await server.start()
        servers.append(server)
        policies.append(faults)
    attempts = Attempts()
    channel = await balanced_channel(registry, ECHO, policies=[attempts])
    await _until(lambda: len(channel.endpoints) == 3)
    stub = EchoServiceStub(channel)
    for _ in range(1000):
        try:
            await stub.Echo(EchoRequest(text="x"), timeout=5)
        except FrameworkError:
            pass
    amplification = sum(attempts.targets.values()) / 1000
    for faults in policies:
        faults.clear()
    start = time.perf_counter()
    tokens = channel.retry_tokens
    assert tokens is not None
    while tokens.tokens <= tokens._threshold:
        await stub.Echo(EchoRequest(text="x"), timeout=5)
    refill_s = time.perf_counter() - start
    await channel.close()
    for server in servers:
        await server.stop(0)
    return (
        f"every instance answering UNAVAILABLE: {amplification:.3f} attempts per call over "
        f"1,000 calls (3.00 without the budget); once healthy, retries allowed again after "
        f"{refill_s:.2f} s of successful calls"
    )


async def postgres_faults(dsn: str) -> list[str]:
    lines = []
    schema = f"rec_{uuid.uuid4().hex[:10]}"
    a = await _registry(PostgresStore(dsn, schema=schema))
    b = await _registry(PostgresStore(dsn, schema=schema))
    leader, follower = (a, b) if a.registry.leading else (b, a)
    await leader.stop()
    took = await _until(lambda: follower.registry.leading)
    lines.append(
        f"leading replica stopped: another leads after {took:.2f} s (sweep_interval_s 1 s)"
    )
    c = await _registry(PostgresStore(dsn, schema=schema))
    store = follower.registry.store
    assert isinstance(store, PostgresStore)
    admin = await asyncpg.connect(dsn)
    await admin.execute("SELECT pg_terminate_backend($1)", store._lock_conn.get_server_pid())
    terms = follower.registry.terms + c.registry.terms
    took = await _until(lambda: follower.registry.terms + c.registry.terms > terms)
    lines.append(f"leader's database session terminated: a leader again after {took:.2f} s")
    listener = c.registry.store
    assert isinstance(listener, PostgresStore)
    await admin.execute("SELECT pg_terminate_backend($1)", listener._listener.get_server_pid())
    await _until(lambda: not listener.listening)
    channel = grpc.aio.insecure_channel(c.address)
    stream = RegistryServiceStub(channel).Watch(pb.WatchRequest(service="orders", deltas=True))
    await stream.read()
    start = time.perf_counter()
    await follower.registry.register("orders", "127.0.0.1:7001")
    await stream.read()
    took = time.perf_counter() - start
    lines.append(
        f"a replica's LISTEN connection terminated: its watchers saw a change made on "
        f"another replica after {took:.2f} s (watch_poll_s 2 s), and it listens again"
    )
    stream.cancel()
    await channel.close()
    await admin.close()
    await follower.stop()
    await c.stop()
    await PostgresStore(dsn, schema=schema).drop()
    return lines


async def main(dsn: str | None) -> None:
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        print(await registry_outage(tmp, 1.5), flush=True)
        print(await registry_outage(tmp, 5.0), flush=True)
        print(await client_start_from_cache(tmp), flush=True)
        node = await _registry(SqliteStore(tmp / "probed.sqlite"), probe=ProbeConfig())
        try:
            print(await slow_instance(tmp, node.address), flush=True)
            print(await killed_instance(tmp, node.address), flush=True)
            print(await failing_fleet(node.address), flush=True)
        finally:
            await node.stop()
    if dsn:
        for line in await postgres_faults(dsn):
            print(line, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--postgres", default="")
    asyncio.run(main(parser.parse_args().postgres or None))
