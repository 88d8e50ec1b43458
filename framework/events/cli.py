"""Command line for the event store: `python -m framework.events <command>`.

    python -m framework.events rebuild --store sqlite:events.db \\
        --projection orders.read_model:balances [--upcasters orders.events:upcasters]
    python -m framework.events rebuild --store postgresql://postgres@127.0.0.1/app \\
        --schema events --projection orders.read_model:balances

`rebuild` resets a projection's read model and its checkpoint in one
transaction and replays every stored event into it (`ProjectionRunner.rebuild`),
then prints how many events it applied.  `--projection` names
`package.module:attribute`: a projection object, or a factory (a callable with
no arguments, sync or async) returning one, written for the store's backend
(a SQLite projection for `sqlite:`, an asyncpg one for `postgresql://`).
`--upcasters` optionally names an `Upcasters` object or factory the same way,
for projections that read events through old schema versions.  Rebuilding only
reads events, so no event type registry is needed.

Exit status: 0 done, 2 bad arguments (a message says which), 1 the rebuild failed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import logging
import sys
from collections.abc import Sequence
from typing import Any

from framework.events.projection import ProjectionConfig, ProjectionRunner
from framework.events.typeregistry import EventTypeRegistry
from framework.events.upcast import Upcasters

logger = logging.getLogger(__name__)


class UsageError(Exception):
    """A command-line argument that cannot be used; the message says why."""


def load_object(spec: str, what: str) -> Any:
    """The attribute named by `package.module:attribute` (dots allowed after the colon)."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise UsageError(f"--{what} must look like package.module:attribute, got {spec!r}")
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise UsageError(f"--{what}: cannot import {module_name!r}: {error}") from error
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise UsageError(f"--{what}: {module_name!r} has no attribute {attribute!r}") from None
    return found


async def build(spec: str, what: str, looks_built: Any) -> Any:
    """The object `spec` names, calling it first when it is a factory (sync or async)."""
    found = load_object(spec, what)
    if looks_built(found) or not callable(found):
        return found
    made = found()
    if inspect.isawaitable(made):
        made = await made
    return made


def _is_projection(candidate: Any) -> bool:
    return not isinstance(candidate, type) and all(
        hasattr(candidate, attr) for attr in ("name", "apply", "reset")
    )


async def open_store(url: str, schema: str, upcasters: Upcasters | None) -> Any:
    """The store behind `sqlite:PATH` or `postgresql://...` (drivers imported on demand)."""
    types = EventTypeRegistry()  # a rebuild only reads: no type is checked
    if url.startswith("sqlite:"):
        from framework.events.sqlite import SqliteConfig, SqliteEventStore

        path = url.removeprefix("sqlite:").removeprefix("//")
        if not path:
            raise UsageError("--store sqlite: needs a file path, e.g. sqlite:events.db")
        return await SqliteEventStore.open(SqliteConfig(path=path), types, upcasters)
    if url.startswith(("postgresql://", "postgres://")):
        from framework.events.postgres import PostgresConfig, PostgresEventStore

        return await PostgresEventStore.open(
            PostgresConfig(dsn=url, schema=schema), types, upcasters
        )
    raise UsageError(f"--store must be sqlite:PATH or postgresql://..., got {url!r}")


async def rebuild(args: argparse.Namespace) -> int:
    """Rebuild the named projection from position 0; prints the events applied."""
    upcasters = None
    if args.upcasters:
        upcasters = await build(args.upcasters, "upcasters", lambda o: isinstance(o, Upcasters))
        if not isinstance(upcasters, Upcasters):
            raise UsageError(f"--upcasters {args.upcasters} gave {type(upcasters).__name__}")
    projection = await build(args.projection, "projection", _is_projection)
    if not _is_projection(projection):
        raise UsageError(
            f"--projection {args.projection} gave {type(projection).__name__}, "
            "which lacks name/apply/reset"
        )
    store = await open_store(args.store, args.schema, upcasters)
    try:
        runner = ProjectionRunner(
            store, projection, ProjectionConfig(batch_size=args.batch_size), trace=False
        )
        applied = await runner.rebuild()
    finally:
        await store.close()
    sys.stdout.write(
        f"rebuilt projection {projection.name}: {applied} events applied, "
        f"checkpoint at position {runner.position}\n"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m framework.events", description="Event store maintenance commands."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("rebuild", help="reset a projection and replay every event into it")
    r.add_argument("--store", required=True, help="sqlite:PATH or postgresql://user@host/db")
    r.add_argument("--schema", default="events", help="PostgreSQL schema of the store")
    r.add_argument("--projection", required=True, help="package.module:projection_or_factory")
    r.add_argument("--upcasters", default="", help="package.module:upcasters_or_factory")
    r.add_argument("--batch-size", type=int, default=500, help="events per transaction")
    r.set_defaults(func=rebuild)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        code: int = asyncio.run(args.func(args))
    except UsageError as error:
        parser.error(str(error))
    return code
