"""The shipped test kit: run servicers in-process with the real policy chain.

    from framework.testing import serve
    from gen.echo.v1.echo_pb2_grpc import EchoServiceStub

    async def test_echo() -> None:
        async with serve(MyServicer(), policies=[...]) as t:
            stub = t.stub(EchoServiceStub)
            reply = await stub.Echo(EchoRequest(text="hi"))

The server binds 127.0.0.1 on port 0; everything is torn down on exit. A pytest
plugin with the same as a fixture is in `framework.testing.pytest_plugin`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import grpc
import grpc.aio

from framework.client import connect
from framework.config import ClientConfig, ServerConfig
from framework.health import HealthCheck
from framework.policy import Policy
from framework.server import Server

S = TypeVar("S")

__all__ = ["TestServer", "serve"]


class TestServer:
    """A started in-process server plus channels to it."""

    __test__ = False  # not a pytest test class

    def __init__(self, server: Server, channel: grpc.aio.Channel) -> None:
        self.server = server
        self.channel = channel
        self._extra: list[grpc.aio.Channel] = []

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def target(self) -> str:
        return self.server.address

    def stub(self, stub_class: Callable[[grpc.aio.Channel], S]) -> S:
        """A generated stub on the default channel (which runs the client policies)."""
        return stub_class(self.channel)

    def connect(
        self,
        *,
        policies: Sequence[Policy] = (),
        config: ClientConfig | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> grpc.aio.Channel:
        """Another channel with its own client policies; closed with the server."""
        channel = connect(self.target, policies=policies, config=config, credentials=credentials)
        self._extra.append(channel)
        return channel

    async def close(self) -> None:
        for channel in [*self._extra, self.channel]:
            await channel.close()
        await self.server.stop(grace_s=0)


@asynccontextmanager
async def serve(
    *servicers: Any,
    policies: Sequence[Policy] = (),
    client_policies: Sequence[Policy] = (),
    health_checks: Sequence[HealthCheck] = (),
    config: ServerConfig | None = None,
    client_config: ClientConfig | None = None,
    hooks: Sequence[object] = (),
    credentials: grpc.ServerCredentials | None = None,
    client_credentials: grpc.ChannelCredentials | None = None,
) -> AsyncIterator[TestServer]:
    """Start `servicers` on 127.0.0.1:0 with `policies`; yield a `TestServer`.

    `credentials` serve TLS/mTLS (see framework.auth.tls); `client_credentials` are used
    by the default channel.  The default config is `insecure_dev` (an in-process test
    server may serve scoped methods with no AuthPolicy); pass `config=` to test a
    server as it will run.
    """
    server = Server(
        config
        or ServerConfig(name="test", host="127.0.0.1", port=0, grace_s=1.0, insecure_dev=True),
        policies=policies,
        health_checks=health_checks,
        hooks=hooks,
        credentials=credentials,
    )
    for servicer in servicers:
        server.add(servicer)
    await server.start()
    channel = connect(
        server.address,
        policies=client_policies,
        config=client_config,
        credentials=client_credentials,
    )
    harness = TestServer(server, channel)
    try:
        yield harness
    finally:
        await harness.close()
