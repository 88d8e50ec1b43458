"""pytest plugin: `pytest -p framework.testing.pytest_plugin` gives the `grpc_serve` fixture.

async def test_it(grpc_serve) -> None:
    t = await grpc_serve(MyServicer(), policies=[...])
    reply = await t.stub(MyStub).Method(request)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest

from framework.testing import TestServer, serve


@pytest.fixture
async def grpc_serve() -> AsyncIterator[Callable[..., Awaitable[TestServer]]]:
    """A factory: each call starts servicers in-process; all are stopped after the test."""
    async with AsyncExitStack() as stack:

        async def start(*servicers: Any, **kwargs: Any) -> TestServer:
            return await stack.enter_async_context(serve(*servicers, **kwargs))

        yield start
