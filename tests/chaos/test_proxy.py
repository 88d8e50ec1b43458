"""The TCP fault proxy with real sockets and a real PostgreSQL: pass, latency, reset, blackhole."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from framework.chaos.proxy import FaultProxy, ProxyMode


@pytest.fixture
async def echo() -> AsyncIterator[int]:
    """An echo server on 127.0.0.1:0; yields its port."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def _roundtrip(port: int, payload: bytes, timeout_s: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), timeout_s)
    finally:
        writer.close()


async def test_the_proxy_forwards_both_ways_and_adds_latency(echo: int) -> None:
    """PASS forwards bytes unchanged; LATENCY delays them by at least the latency."""
    proxy = await FaultProxy("echo", ("127.0.0.1", echo)).start()
    try:
        assert await _roundtrip(proxy.port, b"hello") == b"hello"
        proxy.set(ProxyMode.LATENCY, latency_s=0.2)
        loop = asyncio.get_running_loop()
        began = loop.time()
        assert await _roundtrip(proxy.port, b"slow") == b"slow"
        assert loop.time() - began >= 0.4  # 0.2 s each way: a lower bound the proxy guarantees
        assert proxy.connections == 2
    finally:
        await proxy.close()


async def test_reset_cuts_open_connections_and_refuses_new_ones_until_healed(echo: int) -> None:
    """RESET: the open connection is reset, new ones too; PASS again: connections work."""
    proxy = await FaultProxy("echo", ("127.0.0.1", echo)).start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        proxy.set(ProxyMode.RESET)
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readexactly(1), 60)
        writer.close()
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await _roundtrip(proxy.port, b"refused")
        assert proxy.resets >= 2
        proxy.set(ProxyMode.PASS)
        assert await _roundtrip(proxy.port, b"back") == b"back"
    finally:
        await proxy.close()


async def test_a_blackhole_holds_bytes_until_it_heals(echo: int) -> None:
    """BLACKHOLE: nothing comes back while it lasts; after PASS the held bytes arrive."""
    proxy = await FaultProxy("echo", ("127.0.0.1", echo)).start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"a")
        assert await reader.readexactly(1) == b"a"
        proxy.set(ProxyMode.BLACKHOLE)
        writer.write(b"held")
        await writer.drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(4), 0.3)
        proxy.set(ProxyMode.PASS)
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"held"
        writer.close()
    finally:
        await proxy.close()


async def test_the_proxy_refuses_a_non_loopback_listen_address() -> None:
    """The proxy listens on 127.0.0.1 only."""
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy("x", ("127.0.0.1", 1), host="0.0.0.0")


@pytest.mark.postgres
async def test_postgres_through_the_proxy_fails_on_reset_and_works_again(postgres_dsn: str) -> None:
    """A real PostgreSQL connection through the proxy: a reset breaks it, a new one works."""
    import asyncpg

    proxy = await FaultProxy("postgres", ("127.0.0.1", 5432)).start()
    try:
        dsn = postgres_dsn.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        conn = await asyncpg.connect(dsn)
        assert await conn.fetchval("SELECT 41 + 1") == 42
        proxy.set(ProxyMode.RESET)
        with pytest.raises((OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)):
            await conn.fetchval("SELECT 1", timeout=5)
        with pytest.raises((OSError, asyncpg.PostgresConnectionError)):
            await asyncpg.connect(dsn, timeout=5)
        proxy.set(ProxyMode.PASS)
        again = await asyncpg.connect(dsn)
        assert await again.fetchval("SELECT 1") == 1
        await again.close()
        conn.terminate()
    finally:
        await proxy.close()
