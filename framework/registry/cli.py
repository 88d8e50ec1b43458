"""Command line for the registry: `python -m framework.registry <command>`.

Commands:
  serve     run a registry (SQLite file by default, or PostgreSQL with --postgres)
  list      services with their instance counts and version weights
  show      one service's instances: address, version, zone, weight, health, lease left
  weights   set version weights: `weights orders v1=90 v2=10` (canary), `--clear`

`serve` refuses to start without authentication: give `--jwks FILE` (bearer tokens
verified against that key set) and/or `--client-ca` with `--identities FILE`
(mTLS workload identities), or `--insecure-dev` for a local development registry
anyone on the machine can change (logged loudly).  Who may register which service
names: `--grants FILE` / `--grants-claim CLAIM` (default: a token's own subject).

The other commands read the bearer token from `$REGISTRY_TOKEN` or `--token-file`,
never from the command line (other users of the machine can read process lists).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from framework.errors import FrameworkError
from framework.registry.model import Health
from gen.registry.v1 import registry_pb2 as pb
from gen.registry.v1.registry_pb2_grpc import RegistryServiceStub

DEFAULT_REGISTRY = "127.0.0.1:50051"
TOKEN_ENV = "REGISTRY_TOKEN"

logger = logging.getLogger(__name__)


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
    auth = serve.add_argument_group("authentication (required unless --insecure-dev)")
    auth.add_argument("--jwks", default="", help="JWKS file of the keys tokens are signed with")
    auth.add_argument("--issuer", default="", help="required token issuer (iss)")
    auth.add_argument("--audience", default="", help="required token audience (aud)")
    auth.add_argument("--tls-cert", default="", help="server certificate (PEM): serve TLS")
    auth.add_argument("--tls-key", default="", help="server private key (PEM)")
    auth.add_argument("--client-ca", default="", help="CA of client certificates: require mTLS")
    auth.add_argument(
        "--identities",
        default="",
        help='JSON file {"method pattern": ["spiffe://... pattern"]}: mTLS identities '
        "allowed without a token",
    )
    auth.add_argument(
        "--insecure-dev",
        action="store_true",
        help="development only: serve WITHOUT authentication (anyone can register, "
        "deregister and reroute traffic)",
    )
    grants = serve.add_argument_group("who may register which service names")
    grants.add_argument(
        "--grants", default="", help='JSON file {"caller pattern": ["service pattern"]}'
    )
    grants.add_argument(
        "--grants-claim", default="", help="token claim listing the service names it may register"
    )
    serve.add_argument(
        "--allow-network",
        action="append",
        default=[],
        metavar="CIDR",
        help="only accept instance addresses in this network (repeatable); the health "
        "prober connects to every registered address",
    )

    for name, text in (("list", "list services"), ("show", "show a service's instances")):
        p = sub.add_parser(name, help=text)
        _client_arguments(p, "registry:read")
        if name == "show":
            p.add_argument("service")

    w = sub.add_parser("weights", help="set traffic weight per version (canary, blue/green)")
    _client_arguments(w, "registry:admin")
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


def _client_arguments(parser: argparse.ArgumentParser, scope: str) -> None:
    parser.add_argument("--registry", default=DEFAULT_REGISTRY, help="registry host:port")
    parser.add_argument(
        "--token-file",
        default="",
        help=f"file holding the bearer token (scope {scope}); default: ${TOKEN_ENV}",
    )
    parser.add_argument("--token", default=None, help=argparse.SUPPRESS)  # refused, see _token
    parser.add_argument("--ca", default="", help="CA certificate (PEM): connect with TLS")
    parser.add_argument("--cert", default="", help="client certificate (PEM) for mTLS")
    parser.add_argument("--key", default="", help="client private key (PEM) for mTLS")


def _token(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
    if args.token is not None:
        raise SystemExit(
            "--token is not accepted: other users can read command lines. Put the token "
            f"in ${TOKEN_ENV} or in a file given with --token-file"
        )
    if args.token_file:
        try:
            return Path(args.token_file).read_text().strip()
        except OSError as error:
            raise SystemExit(f"cannot read --token-file {args.token_file}: {error}") from None
    return environ.get(TOKEN_ENV, "").strip()


def _metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {args.bearer}"),) if args.bearer else ()


def _auth_policies(args: argparse.Namespace) -> list[Any]:
    """The registry server's authentication, from the flags; [] only with --insecure-dev."""
    from framework.auth.keyset import JwksFile, KeySet
    from framework.auth.policy import AuthPolicy
    from framework.auth.verifier import JwtConfig, JwtVerifier

    if args.identities and not args.client_ca:
        raise SystemExit("--identities needs --client-ca: identities come from client certificates")
    if (args.tls_cert or args.tls_key or args.client_ca) and not (args.tls_cert and args.tls_key):
        raise SystemExit("TLS needs both --tls-cert and --tls-key")
    if not args.jwks and not args.identities:
        if not args.insecure_dev:
            raise SystemExit(
                "refusing to serve a registry without authentication: anyone who can reach it "
                "could register their own address for your services, deregister instances and "
                "change traffic weights. Give --jwks FILE (bearer tokens) and/or --client-ca with "
                "--identities FILE (mTLS), or --insecure-dev for local development only"
            )
        return []
    verifier = None
    if args.jwks:
        verifier = JwtVerifier(
            KeySet(JwksFile(args.jwks)),
            JwtConfig(issuer=args.issuer or None, audience=args.audience or None),
        )
    identities = None
    if args.identities:
        try:
            identities = json.loads(Path(args.identities).read_text())
        except (OSError, ValueError) as error:
            raise SystemExit(f"cannot read --identities {args.identities}: {error}") from None
    return [AuthPolicy(verifier, allowed_identities=identities)]


async def _serve(args: argparse.Namespace) -> int:
    from framework.auth.grants import NameGrants
    from framework.auth.tls import ServerTls, server_credentials
    from framework.config import ServerConfig
    from framework.registry.health_probe import ProbeConfig
    from framework.registry.registry import Registry, RegistryConfig
    from framework.registry.service import RegistryServicer
    from framework.registry.store import RegistryStore
    from framework.server import Server

    policies = _auth_policies(args)
    try:
        grants = (
            NameGrants.load(args.grants, claim=args.grants_claim)
            if args.grants
            else NameGrants(claim=args.grants_claim)
        )
        credentials = (
            server_credentials(ServerTls(args.tls_cert, args.tls_key, args.client_ca or None))
            if args.tls_cert
            else None
        )
        config = RegistryConfig(
            probe=ProbeConfig(interval_s=args.probe_interval_s),
            allowed_networks=tuple(args.allow_network),
        )
    except ValueError as error:
        raise SystemExit(str(error)) from None
    if not policies:
        logger.warning(
            "INSECURE DEVELOPMENT REGISTRY (--insecure-dev): no authentication; anyone who "
            "can reach %s:%s can register, deregister and reroute every service",
            args.host,
            args.port,
        )
    store: RegistryStore
    if args.postgres:
        from framework.registry.postgres import PostgresStore

        store = PostgresStore(args.postgres, schema=args.schema)
    else:
        from framework.registry.sqlite import SqliteStore

        store = SqliteStore(args.db)
    registry = Registry(store, config)
    await registry.start()
    # FRAMEWORK_REFLECTION=0 switches reflection off, as for every server
    switch = {k: v for k, v in os.environ.items() if k == "FRAMEWORK_REFLECTION"}
    reflection = ServerConfig.from_env("registry", switch).reflection
    server = Server(
        ServerConfig(
            name="registry",
            host=args.host,
            port=args.port,
            insecure_dev=not policies,
            reflection=reflection,
        ),
        policies=policies,
        credentials=credentials,
    )
    server.add(RegistryServicer(registry, grants=grants))
    server.add_hook(registry)  # on_draining: stop sweeping, renewals are refused from now on
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
        f"{'ADDRESS':24} {'VERSION':10} {'ZONE':8} {'WEIGHT':>6} {'HEALTH':12} {'LEASE_S':>7}\n"
    )
    for i in view.instances:
        health = Health(int(i.health)).name
        out.write(
            f"{i.address:24} {i.version or '-':10} {i.zone or '-':8} {i.weight:>6} {health:12} "
            f"{i.lease_remaining_s:>7.1f}\n"
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


async def run(
    argv: Sequence[str] | None = None,
    out: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """Run one command; returns the exit status (1 when the registry refused it)."""
    args = build_parser().parse_args(argv)
    out = out or sys.stdout
    if args.command == "serve":
        return await _serve(args)
    from framework.auth.tls import ClientTls, channel_credentials
    from framework.client import connect

    args.bearer = _token(args, os.environ if environ is None else environ)
    credentials = None
    if args.ca or args.cert:
        try:
            credentials = channel_credentials(
                ClientTls(args.ca or None, args.cert or None, args.key or None)
            )
        except ValueError as error:
            raise SystemExit(str(error)) from None
    channel = connect(args.registry, credentials=credentials)
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
