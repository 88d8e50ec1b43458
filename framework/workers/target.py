"""`python -m framework serve MODULE[:FACTORY] [--workers N]`: build a server, serve it.

`FACTORY` (default `build_server`) is a callable of no arguments returning a `Server`
(or an awaitable of one), built but not started: servicers, policies and hooks added.
With `--workers N` (default: the cores this process may run on) the process supervises N
workers, each running this same command (see `framework.workers.supervisor`).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os

from framework.server import Server

__all__ = ["default_workers", "load_server", "serve_target"]


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


async def load_server(target: str) -> Server:
    """Import `MODULE[:FACTORY]` and build its server; errors say what was expected."""
    module_name, _, attr = target.partition(":")
    attr = attr or "build_server"
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise SystemExit(f"serve: cannot import {module_name!r}: {error}") from error
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SystemExit(
            f"serve: {module_name} has no callable {attr!r}: give MODULE:FACTORY, a function "
            "of no arguments returning a framework Server (servicers added, not started)"
        )
    server = factory()
    if inspect.isawaitable(server):
        server = await server
    if not isinstance(server, Server):
        raise SystemExit(
            f"serve: {target} returned {type(server).__name__}, not a framework Server"
        )
    return server


async def serve_target(target: str, workers: int) -> None:
    """Build the target's server and serve it with `workers` processes (1: this one)."""
    if workers < 1:
        raise SystemExit(f"serve: --workers must be >= 1, got {workers}")
    server = await load_server(target)
    server.workers = workers
    await server.serve()


def main(target: str, workers: int | None) -> int:
    asyncio.run(serve_target(target, workers or default_workers()))
    return 0
