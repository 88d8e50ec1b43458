"""Regression tests for what the chaos experiments and the fuzzers found (each names it)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from framework.chaos.proxy import FaultProxy, ProxyMode
from framework.clock import ManualClock
from framework.errors import UnavailableError
from framework.events.consumer_group import StoreBus
from framework.events.consumer_grpc import RemoteSubscription
from framework.events.service import EventStoreServicer
from framework.events.sqlite import SqliteConfig, SqliteEventStore
from framework.events.typeregistry import EventTypeRegistry
from framework.registry.registry import Registry, RegistryConfig
from framework.registry.sqlite import SqliteStore
from framework.system.feed import _Owned, _StreamLostError
from framework.testing import serve
from gen.events.v1 import testing_pb2


async def test_a_draining_registry_stops_sweeping_so_no_lease_expires(tmp_path: Path) -> None:
    """registry-down: once the server drains (renewals refused), the registry sweeps no more;
    a lease past its TTL is still there for the next registry to extend."""
    clock = ManualClock()
    registry = Registry(SqliteStore(tmp_path / "registry.sqlite3"), RegistryConfig(), clock=clock)
    await registry.start()
    try:
        await registry.register("orders.v1.Orders", "127.0.0.1:7001", ttl_s=2)
        assert registry.leading
        await registry.on_draining(object())
        assert not registry.leading
        clock.advance(10)  # past the TTL: a leading registry would sweep it at the next period
        await asyncio.sleep(0)
        view = await registry.discover("orders.v1.Orders")
        assert [i.address for i in view.instances] == ["127.0.0.1:7001"]
    finally:
        await registry.close()


async def test_a_feed_on_a_dead_subscribe_stream_gives_up_so_it_can_resubscribe(
    tmp_path: Path,
) -> None:
    """kill-order: after the producer's server goes away, fetching on its Subscribe stream
    ends the consume loop (instead of retrying the dead stream forever)."""
    store = await SqliteEventStore.open(
        SqliteConfig(path=str(tmp_path / "events.db")), EventTypeRegistry.from_modules(testing_pb2)
    )
    bus = StoreBus(store)
    try:
        async with serve(EventStoreServicer(store, bus=bus)) as producer:
            host, port = producer.target.rsplit(":", 1)
            proxy = await FaultProxy("producer", (host, int(port))).start()
            channel = grpc.aio.insecure_channel(proxy.address)
            try:
                remote = await RemoteSubscription.open(channel, "notification")
                owned = _Owned(remote, channel, stream=True)
                assert await owned.fetch(8, 0.05) == []
                proxy.set(ProxyMode.RESET)  # the producer's connection dies (as on SIGKILL)
                with pytest.raises(_StreamLostError):
                    for _ in range(50):  # bounded: the reset is seen within a few fetches
                        await owned.fetch(8, 0.1)
            finally:
                await proxy.close()
        plain = _Owned(_Failing(), channel)  # a broker subscription: consume() retries it
        with pytest.raises(UnavailableError):
            await plain.fetch(8, 0.05)
        await owned.close()
    finally:
        await bus.close()
        await store.close()


class _Failing:
    async def fetch(self, max_count: int = 64, timeout_s: float = 1.0) -> list[object]:
        raise UnavailableError("broker away")

    async def close(self) -> None:
        return None


async def test_an_unparsable_streamed_request_is_invalid_argument(tmp_path: Path) -> None:
    """Fuzzing: garbage bytes on Subscribe (a stream grpc parses inside the handler) are
    INVALID_ARGUMENT, not INTERNAL."""
    store = await SqliteEventStore.open(
        SqliteConfig(path=str(tmp_path / "events.db")), EventTypeRegistry.from_modules(testing_pb2)
    )
    bus = StoreBus(store)
    try:
        async with serve(EventStoreServicer(store, bus=bus)) as server:
            channel = grpc.aio.insecure_channel(server.target)
            call = channel.stream_stream("/events.v1.EventStoreService/Subscribe")(
                iter([b"\xff\xfe\x00garbage"]), timeout=10
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in call:
                    pass
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            await channel.close()
    finally:
        await bus.close()
        await store.close()
