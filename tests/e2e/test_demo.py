"""`make run` end to end: `python -m services.demo` serves, answers calls, drains on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gen.inventory.v1 import inventory_pb2 as pb
from gen.inventory.v1.inventory_pb2_grpc import InventoryServiceStub

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0  # imports alone take ~15 s on a loaded 2-core machine
EXIT_TIMEOUT_S = 30.0


async def _read_announcement(process: asyncio.subprocess.Process) -> dict[str, str]:
    """The `address:` and `token:` lines the demo prints, read within a bounded time."""
    assert process.stdout is not None
    found: dict[str, str] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT_S
    while not {"address", "token"} <= found.keys():
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise AssertionError(f"the demo printed no address/token in {START_TIMEOUT_S}s")
        line = await asyncio.wait_for(process.stdout.readline(), remaining)
        if not line:
            raise AssertionError(f"the demo exited early with code {await process.wait()}")
        key, _, value = line.decode().strip().partition(": ")
        if key in ("address", "token"):
            found[key] = value
    return found


@contextlib.asynccontextmanager
async def _demo(tmp_path: Path, port: int) -> AsyncIterator[asyncio.subprocess.Process]:
    env = {**os.environ, "SERVICE_PORT": str(port), "INVENTORY_DB_PATH": str(tmp_path / "d.db")}
    with (tmp_path / "stderr.log").open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.demo",
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
        try:
            yield process
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


@pytest.fixture
async def demo(tmp_path: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    async with _demo(tmp_path, 0) as process:
        yield process


async def test_demo_serves_health_and_calls_and_drains(demo: asyncio.subprocess.Process) -> None:
    """The demo's address answers SERVING, accepts its printed token, and exits 0 on SIGTERM."""
    printed = await _read_announcement(demo)
    async with grpc.aio.insecure_channel(printed["address"]) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = InventoryServiceStub(channel)
        stock = await stub.GetStock(
            pb.GetStockRequest(sku="WIDGET-1"),
            metadata=[("authorization", f"Bearer {printed['token']}")],
            timeout=5,
        )
        assert stock.stock.on_hand == 100
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetStock(pb.GetStockRequest(sku="WIDGET-1"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    demo.send_signal(signal.SIGTERM)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(demo.wait(), EXIT_TIMEOUT_S)
    assert demo.returncode == 0


async def test_demo_falls_back_to_a_free_port(tmp_path: Path) -> None:
    """When SERVICE_PORT is taken the demo serves on another port instead of failing."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with _demo(tmp_path, port) as process:
            printed = await _read_announcement(process)
            host, _, served = printed["address"].rpartition(":")
            assert host == "127.0.0.1" and int(served) not in (0, port)
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), EXIT_TIMEOUT_S) == 0
