"""Limits every framework server has by default: a bounded number of calls and streams held
open at once, a port no other process can bind, reflection switchable from the environment."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from framework.config import ServerConfig
from framework.server import Server

LIMIT = 20


def _config(**changes: object) -> ServerConfig:
    return ServerConfig(name="limits", host="127.0.0.1", port=0, grace_s=0, **changes)  # type: ignore[arg-type]


async def _first_message(call: grpc.aio.UnaryStreamCall) -> object:  # type: ignore[type-arg]
    """The stream's first message, or the status code that ended it."""
    try:
        return await call.read()
    except grpc.aio.AioRpcError as error:
        return error.code()


async def test_default_limits_bound_calls_and_keep_the_port_exclusive() -> None:
    """By default concurrent calls are bounded well under 3,000 and SO_REUSEPORT is off."""
    config = ServerConfig()
    assert config.max_concurrent_rpcs is not None and config.max_concurrent_rpcs <= 1000
    assert config.reuse_port is False
    assert ("grpc.so_reuseport", 0) in config.channel_options
    streams = ServerConfig(max_concurrent_streams=64)
    assert ("grpc.max_concurrent_streams", 64) in streams.channel_options
    with pytest.raises(ValueError, match="max_concurrent_streams"):
        ServerConfig(max_concurrent_streams=0)


async def test_anonymous_watch_streams_beyond_the_limit_are_refused() -> None:
    """Anonymous health Watch streams beyond max_concurrent_rpcs are RESOURCE_EXHAUSTED at once,
    over one connection or many; the held ones keep working and slots free up when they end."""
    server = Server(_config(max_concurrent_rpcs=LIMIT))
    await server.start()
    channels = [grpc.aio.insecure_channel(server.address) for _ in range(3)]
    try:
        calls = [
            health_pb2_grpc.HealthStub(channels[i % 3]).Watch(health_pb2.HealthCheckRequest())
            for i in range(LIMIT + 15)
        ]
        firsts = await asyncio.wait_for(
            asyncio.gather(*(_first_message(c) for c in calls)), timeout=60
        )
        held = [
            c
            for c, f in zip(calls, firsts, strict=True)
            if isinstance(f, health_pb2.HealthCheckResponse)
        ]
        refused = [f for f in firsts if f == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert len(held) == LIMIT
        assert len(refused) == 15
        # a unary call is refused too while the streams hold every slot
        check = health_pb2_grpc.HealthStub(channels[0]).Check
        with pytest.raises(grpc.aio.AioRpcError) as refused_check:
            await check(health_pb2.HealthCheckRequest(), timeout=30)
        assert refused_check.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for call in held[:5]:
            call.cancel()
        for _ in range(600):  # the server releases a slot when it sees the cancellation
            try:
                reply = await check(health_pb2.HealthCheckRequest(), timeout=30)
                break
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                await asyncio.sleep(0.05)
        else:
            pytest.fail("no slot was released after 5 streams were cancelled")
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        for channel in channels:
            await channel.close()
        await server.stop(0)


_BIND = textwrap.dedent(
    """
    import asyncio, sys
    from framework.config import ServerConfig
    from framework.server import Server

    async def main() -> None:
        config = ServerConfig(
            name="second", host="127.0.0.1", port=int(sys.argv[1]), reuse_port=sys.argv[2] == "1"
        )
        server = Server(config)
        try:
            await server.start()
        except (OSError, RuntimeError) as error:
            print("refused:", error)
            raise SystemExit(3)
        print("bound", server.port)
        await server.stop(0)

    asyncio.run(main())
    """
)


def _bind_in_another_process(port: int, reuse_port: bool) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _BIND, str(port), "1" if reuse_port else "0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_another_process_cannot_bind_the_same_port_by_default() -> None:
    """With the default config a second process (even one opting in) cannot bind the port."""
    server = Server(_config())
    port = await server.start()
    try:
        for reuse in (False, True):
            result = await asyncio.to_thread(_bind_in_another_process, port, reuse)
            assert result.returncode == 3, result.stdout + result.stderr
            assert "refused" in result.stdout
    finally:
        await server.stop(0)


async def test_reuse_port_is_an_explicit_opt_in_on_both_sides() -> None:
    """Two processes that both set reuse_port share the port (what worker processes do)."""
    server = Server(_config(reuse_port=True))
    port = await server.start()
    try:
        result = await asyncio.to_thread(_bind_in_another_process, port, True)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"bound {port}" in result.stdout
    finally:
        await server.stop(0)


async def _reflected_services(address: str) -> list[str] | grpc.StatusCode:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
            timeout=30,
            wait_for_ready=True,
        )
        try:
            async for reply in call:
                return [s.name for s in reply.list_services_response.service]
        except grpc.aio.AioRpcError as error:
            return error.code()
    return []


async def test_reflection_is_switched_off_from_the_environment() -> None:
    """FRAMEWORK_REFLECTION=0 (or <PREFIX>REFLECTION=0) turns reflection off: UNIMPLEMENTED."""
    assert ServerConfig.from_env("x", {}).reflection is True
    assert ServerConfig.from_env("x", {"SERVICE_REFLECTION": "0"}).reflection is False
    assert (
        ServerConfig.from_env(
            "x", {"FRAMEWORK_REFLECTION": "0", "SERVICE_REFLECTION": "1"}
        ).reflection
        is True
    )
    with pytest.raises(ValueError, match="FRAMEWORK_REFLECTION must be 1 or 0"):
        ServerConfig.from_env("x", {"FRAMEWORK_REFLECTION": "off"})
    for env, expected in (({}, True), ({"FRAMEWORK_REFLECTION": "0"}, False)):
        config = ServerConfig.from_env("reflect", {"SERVICE_HOST": "127.0.0.1", **env})
        server = Server(config)
        await server.start()
        try:
            services = await _reflected_services(server.address)
        finally:
            await server.stop(0)
        if expected:
            assert isinstance(services, list) and "grpc.health.v1.Health" in services
        else:
            assert services == grpc.StatusCode.UNIMPLEMENTED


async def test_max_concurrent_rpcs_from_the_environment() -> None:
    """SERVICE_MAX_CONCURRENT_RPCS sets the limit; 0 removes it."""
    assert (
        ServerConfig.from_env("x", {"SERVICE_MAX_CONCURRENT_RPCS": "50"}).max_concurrent_rpcs == 50
    )
    assert (
        ServerConfig.from_env("x", {"SERVICE_MAX_CONCURRENT_RPCS": "0"}).max_concurrent_rpcs is None
    )
    assert ServerConfig.from_env("x", {}).max_concurrent_rpcs == ServerConfig().max_concurrent_rpcs


async def test_registry_process_reflection_switched_off_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m framework.registry serve` with FRAMEWORK_REFLECTION=0: UNIMPLEMENTED."""
    from tests.security.test_registry_cli import registry_process

    monkeypatch.setenv("FRAMEWORK_REFLECTION", "0")
    async with registry_process(tmp_path, "--insecure-dev") as (address, _):
        assert await _reflected_services(address) == grpc.StatusCode.UNIMPLEMENTED
