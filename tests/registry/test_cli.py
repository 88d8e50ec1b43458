"""The registry command line against a running registry."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from framework.registry.cli import run
from framework.registry.sqlite import SqliteStore
from tests.registry.fleet import ECHO, EchoInstance, RegistryNode, start_echo, start_registry


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[RegistryNode]:
    """A registry with one self-registered echo instance (v1)."""
    n = await start_registry(SqliteStore(tmp_path / "r.sqlite"))
    yield n
    await n.stop()


@pytest.fixture
async def instance(node: RegistryNode) -> AsyncIterator[EchoInstance]:
    """One echo instance registered as v1."""
    i = await start_echo(node.address, version="v1")
    yield i
    await i.stop(0)


async def _run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    status = await run(list(argv), out)
    return status, out.getvalue()


async def test_list_show_and_set_weights(node: RegistryNode, instance: EchoInstance) -> None:
    """list shows the service, show its instance, weights sets then clears version routing."""
    status, text = await _run("list", "--registry", node.address)
    assert status == 0 and ECHO in text
    status, text = await _run("weights", "--registry", node.address, ECHO, "v1=90", "v2=10")
    assert status == 0 and "v1=90 v2=10" in text
    status, text = await _run("show", "--registry", node.address, ECHO)
    assert status == 0
    assert instance.address in text and "v1" in text and "UNKNOWN" in text
    assert "version weights: v1=90 v2=10" in text
    status, text = await _run("weights", "--registry", node.address, "--clear", ECHO)
    assert status == 0 and "cleared" in text


async def test_refused_weights_exit_with_the_registry_message(node: RegistryNode) -> None:
    """A negative weight exits 1 and prints what the registry said."""
    status, text = await _run("weights", "--registry", node.address, ECHO, "v1=-5")
    assert status == 1 and "weights must be >= 0" in text
