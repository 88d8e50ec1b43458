"""The registry's PostgreSQL out of reach: callers get UNAVAILABLE (retry), never INTERNAL."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest

from framework.client import connect
from framework.errors import UnavailableError
from gen.registry.v1 import registry_pb2, registry_pb2_grpc
from tests.registry.fleet import eventually, registry_node


class Cuttable:
    """A TCP relay to PostgreSQL on 127.0.0.1 that the test can cut (listener and links)."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 5432)
        self._links |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for link in list(self._links):
            link.close()
        self._links.clear()
        await self._server.wait_closed()


@pytest.fixture
async def relay(postgres_dsn: str) -> AsyncIterator[Cuttable]:
    proxy = Cuttable()
    await proxy.start()
    yield proxy
    with contextlib.suppress(AssertionError):
        await proxy.cut()


async def test_store_down_is_unavailable_and_recovers(relay: Cuttable, postgres_dsn: str) -> None:
    """Discover while the database is cut: UNAVAILABLE (REGISTRY_STORE_DOWN); served once back."""
    from framework.registry.postgres import PostgresStore

    schema = f"reg_{uuid.uuid4().hex[:12]}"
    dsn = postgres_dsn.replace(":5432", f":{relay.port}")
    store = PostgresStore(dsn, schema=schema)
    async with registry_node(store) as node:
        channel = connect(node.address)
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        request = registry_pb2.DiscoverRequest(service="svc.v1.Down")
        await stub.Discover(request)  # served while the database answers
        await relay.cut()
        with pytest.raises(UnavailableError) as caught:
            await stub.Discover(request)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert caught.value.reason == "REGISTRY_STORE_DOWN"
        assert "unreachable" in caught.value.message and "5432" not in caught.value.message
        await relay.start()  # same port: the database is back

        async def served() -> bool:
            try:
                await stub.Discover(request)
            except UnavailableError:
                return False
            return True

        await eventually(served, timeout_s=60.0)
        await channel.close()
    await PostgresStore(postgres_dsn, schema=schema).drop()
