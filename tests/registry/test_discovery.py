"""Discovery when the registry is away: the call's deadline, bootstrap addresses, the view cache."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from framework.errors import DeadlineExceededError, UnavailableError
from framework.registry.channel import BalancerConfig, balanced_channel
from framework.registry.discovery import DiscoveryConfig
from framework.registry.sqlite import SqliteStore
from gen.echo.v1.echo_pb2 import EchoRequest
from gen.echo.v1.echo_pb2_grpc import EchoServiceStub
from tests.registry.fleet import ECHO, free_port, start_echo, start_registry, wait_until


async def test_waiting_for_the_registry_never_outlives_the_calls_deadline() -> None:
    """With the registry unreachable, a call with a short timeout fails with
    DEADLINE_EXCEEDED (reason REGISTRY_UNREACHABLE) at its own deadline, not with
    UNAVAILABLE after the channel's 30 s ready timeout."""
    channel = await balanced_channel(
        f"127.0.0.1:{free_port()}", ECHO, config=BalancerConfig(ready_timeout_s=30)
    )
    try:
        with pytest.raises(DeadlineExceededError) as caught:
            await EchoServiceStub(channel).Echo(EchoRequest(text="x"), timeout=0.3)
        assert caught.value.reason == "REGISTRY_UNREACHABLE"
        assert "bootstrap" in caught.value.message
    finally:
        await channel.close()


async def test_bootstrap_addresses_serve_until_the_registry_answers(tmp_path: Path) -> None:
    """Registry down at start: calls go to the bootstrap address; once the registry is up
    its view replaces the bootstrap one."""
    port = free_port()
    early = await start_echo(None)
    channel = await balanced_channel(
        f"127.0.0.1:{port}",
        ECHO,
        bootstrap=[early.address],
        discovery_config=DiscoveryConfig(reconnect_max_s=0.2),
    )
    node = None
    late = None
    try:
        assert channel.discovery.source == "bootstrap"
        stub = EchoServiceStub(channel)
        for _ in range(5):
            assert (await stub.Echo(EchoRequest(text="x"), timeout=5)).text == "x"
        assert early.calls == 5
        node = await start_registry(SqliteStore(tmp_path / "r.sqlite"), port=port)
        late = await start_echo(node.address)
        await wait_until(lambda: list(channel.endpoints) == [late.address], timeout_s=60)
        assert channel.discovery.source == "registry"
        await stub.Echo(EchoRequest(text="x"), timeout=5)
        assert late.calls == 1
    finally:
        await channel.close()
        await early.stop(0)
        if late is not None:
            await late.stop(0)
        if node is not None:
            await node.stop()


async def test_a_client_starts_from_its_cached_view_while_the_registry_is_down(
    tmp_path: Path,
) -> None:
    """A client that followed the registry leaves its view on disk; with the registry
    stopped, a new client starts from that file, calls every instance, and follows the
    registry again once it is back."""
    cache = DiscoveryConfig(cache_dir=str(tmp_path / "views"), reconnect_max_s=0.2)
    node = await start_registry(SqliteStore(tmp_path / "r.sqlite"))
    port = node.server.port
    fleet = [await start_echo(node.address) for _ in range(2)]
    first = await balanced_channel(node.address, ECHO, discovery_config=cache)
    await wait_until(lambda: len(first.endpoints) == 2)
    await first.close()  # flushes the cache
    await node.stop()

    second = await balanced_channel(node.address, ECHO, discovery_config=cache)
    newcomer = None
    try:
        assert second.discovery.source == "cache"
        assert set(second.endpoints) == {i.address for i in fleet}
        stub = EchoServiceStub(second)
        for _ in range(10):
            await stub.Echo(EchoRequest(text="x"), timeout=5)
        assert sum(i.calls for i in fleet) == 10
        node = await start_registry(SqliteStore(tmp_path / "r.sqlite"), port=port)
        newcomer = await start_echo(node.address)
        await wait_until(lambda: len(second.endpoints) == 3, timeout_s=60)
        assert second.discovery.source == "registry"
    finally:
        await second.close()
        await asyncio.gather(*(i.stop(0) for i in fleet))
        if newcomer is not None:
            await newcomer.stop(0)
        await node.stop()
    saved = json.loads(second.discovery.cache_file.read_text())  # type: ignore[union-attr]
    assert len(saved["instances"]) == 3  # the newest view went to disk


async def test_a_damaged_cache_file_is_ignored_in_favour_of_bootstrap(tmp_path: Path) -> None:
    """A cache file that is not a view (half-written by something else, another format)
    is logged and skipped; bootstrap addresses are used instead; no bootstrap and no
    registry: the call fails UNAVAILABLE saying the registry is unreachable."""
    cache = DiscoveryConfig(cache_dir=str(tmp_path), reconnect_max_s=0.2)
    instance = await start_echo(None)
    target = f"127.0.0.1:{free_port()}"
    channel = await balanced_channel(target, ECHO, discovery_config=cache)
    path = channel.discovery.cache_file
    await channel.close()
    assert path is not None
    path.write_text('{"format": 1, "service": "echo.v1.EchoService", "instances": [{"addr')
    with_bootstrap = await balanced_channel(
        target, ECHO, discovery_config=cache, bootstrap=[instance.address]
    )
    bare = await balanced_channel(
        target, ECHO, discovery_config=cache, config=BalancerConfig(ready_timeout_s=0.2)
    )
    try:
        assert with_bootstrap.discovery.source == "bootstrap"
        await EchoServiceStub(with_bootstrap).Echo(EchoRequest(text="x"), timeout=5)
        assert instance.calls == 1
        with pytest.raises(UnavailableError) as caught:
            await EchoServiceStub(bare).Echo(EchoRequest(text="x"))
        assert caught.value.reason == "REGISTRY_UNREACHABLE"
    finally:
        await with_bootstrap.close()
        await bare.close()
        await instance.stop(0)
