"""Command line for the registry: `python -m framework.registry <command>`.

Commands:
  serve     run a registry (SQLite file by default, or PostgreSQL with --postgres)
  list      services with their instance counts and version weights
  show      one service's instances: address, version, zone, weight, health, lease
  weights   set version weights: `weights orders v1=90 v2=10` (canary), `--clear`
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from framework.errors import FrameworkError
from framework.registry.model import Health
from gen.registry.v1 import registry_pb2 as pb
from gen.registry.v1.registry_pb2_grpc import RegistryServiceStub

DEFAULT_REGISTRY = "127.0.0.1:50051"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m framework.registry")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a registry server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=50051)
    serve.add_argument("--db", default="registry.sqlite", help="SQLite file (default backend)")
    serve.add_argument("--postgres", default="", help="PostgreSQL DSN: share state with replicas")
    serve.add_argument("--schema", default="registry", help="PostgreSQL schema")
    serve.add_argument("--probe-interval-s", type=float, default=2.0, help="0 turns probing off")

    for name, text in (("list", "list services"), ("show", "show a service's instances")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--registry", default=DEFAULT_REGISTRY, help="registry host:port")
        p.add_argument("--token", default="", help="bearer token (scope registry:read)")
        if name == "show":
            p.add_argument("service")

    w = sub.add_parser("weights", help="set traffic weight per version (canary, blue/green)")
    w.add_argument("--registry", default=DEFAULT_REGISTRY, help="registry host:port")
    w.add_argument("--token", default="", help="bearer token (scope registry:admin)")
    w.add_argument("--clear", action="store_true", help="remove version routing")
    w.add_argument("service")
    w.add_argument("weights", nargs="*", metavar="VERSION=WEIGHT")
    return parser


def parse_weights(items: Sequence[str]) -> dict[str, int]:
    weights: dict[str, int] = {}
    for item in items:
        version, sep, value = item.partition("=")
        try:
            if not sep or not version:
                raise ValueError(item)
            weights[version] = int(value)
        except ValueError:
            raise SystemExit(
                f"weights look like VERSION=WEIGHT (e.g. v2=10), got {item!r}"
            ) from None
    return weights


def _metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {args.token}"),) if args.token else ()


async def _serve(args: argparse.Namespace) -> int:
    from framework.config import ServerConfig
    from framework.registry.health_probe import ProbeConfig
    from framework.registry.registry import Registry, RegistryConfig
    from framework.registry.service import RegistryServicer
    from framework.registry.store import RegistryStore
    from framework.server import Server

    store: RegistryStore
    if args.postgres:
        from framework.registry.postgres import PostgresStore

        store = PostgresStore(args.postgres, schema=args.schema)
    else:
        from framework.registry.sqlite import SqliteStore

        store = SqliteStore(args.db)
    registry = Registry(store, RegistryConfig(probe=ProbeConfig(interval_s=args.probe_interval_s)))
    await registry.start()
    server = Server(ServerConfig(name="registry", host=args.host, port=args.port))
    server.add(RegistryServicer(registry))
    try:
        await server.serve()
    finally:
        await registry.close()
    return 0


async def _list(args: argparse.Namespace, stub: Any, out: TextIO) -> int:
    reply = await stub.ListServices(pb.ListServicesRequest(), metadata=_metadata(args))
    out.write(f"{'SERVICE':40} {'HEALTHY':>7} {'TOTAL':>5}  VERSION WEIGHTS\n")
    for s in reply.services:
        weights = " ".join(f"{v}={w}" for v, w in sorted(s.version_weights.items())) or "-"
        out.write(f"{s.service:40} {s.healthy:>7} {s.instances:>5}  {weights}\n")
    out.write(f"revision {reply.revision}\n")
    return 0


async def _show(args: argparse.Namespace, stub: Any, out: TextIO) -> int:
    view = await stub.Discover(
        pb.DiscoverRequest(service=args.service, include_unhealthy=True), metadata=_metadata(args)
    )
    weights = " ".join(f"{v}={w}" for v, w in sorted(view.version_weights.items()))
    out.write(f"{view.service} (revision {view.revision}) version weights: {weights or '-'}\n")
    out.write(
        f"{'ADDRESS':24} {'VERSION':10} {'ZONE':8} {'WEIGHT':>6} {'HEALTH':12} "
        f"{'LEASE_S':>7}  LEASE_ID\n"
    )
    for i in view.instances:
        health = Health(int(i.health)).name
        out.write(
            f"{i.address:24} {i.version or '-':10} {i.zone or '-':8} {i.weight:>6} {health:12} "
            f"{i.lease_remaining_s:>7.1f}  {i.lease_id}\n"
        )
    return 0


async def _weights(args: argparse.Namespace, stub: Any, out: TextIO) -> int:
    weights = {} if args.clear else parse_weights(args.weights)
    if not weights and not args.clear:
        raise SystemExit("give VERSION=WEIGHT pairs (e.g. v1=90 v2=10), or --clear")
    reply = await stub.SetWeights(
        pb.SetWeightsRequest(service=args.service, version_weights=weights),
        metadata=_metadata(args),
    )
    shown = " ".join(f"{v}={w}" for v, w in sorted(weights.items())) or "cleared"
    out.write(f"{args.service}: version weights {shown} (revision {reply.revision})\n")
    return 0


async def run(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run one command; returns the exit status (1 when the registry refused it)."""
    args = build_parser().parse_args(argv)
    out = out or sys.stdout
    if args.command == "serve":
        return await _serve(args)
    from framework.client import connect

    channel = connect(args.registry)
    try:
        stub = RegistryServiceStub(channel)
        command = {"list": _list, "show": _show, "weights": _weights}[args.command]
        return await command(args, stub, out)
    except FrameworkError as error:
        out.write(f"error: {error.message} ({error.reason})\n")
        return 1
    finally:
        await channel.close()


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return asyncio.run(run(argv))
