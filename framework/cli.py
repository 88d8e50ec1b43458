"""Command line: `python -m framework <command>`.

Commands:
  protos   compile protos/ into gen/ (what `make protos` runs)
  health   health of a server (host:port) or of every instance of a service (--json)
  services every service of a running system: instances, health, versions, weights (--json)
  breakers circuit breakers of every instance (--json)
  faults   set|clear|list fault injection on every instance of a service
  registry run or query the service registry (`python -m framework registry --help`)
  events   event store tools: `events tail [SERVICE] [-f]`, rebuild a projection (see --help)
  gateway  the HTTP/JSON and gRPC-Web gateway (`python -m framework gateway --help`)
  serve    serve MODULE[:FACTORY] with worker processes (`--workers N`, default the cores)
  reference  write docs/reference.md from the contracts (what `make docs` runs)
  analyze  coupling findings from contracts, code and traces (`python -m framework analyze --help`)
  sagas    list, show, watch or retry sagas (`python -m framework sagas --help`)
  token    a development JWT: `token --sub alice --scopes orders:read` (key from a file or env)
  new      scaffold a service: `new service catalog` (contract, layers, main, test)
  chaos    run chaos experiments against a system, print the table (`chaos run --help`)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path


def _protos(args: argparse.Namespace) -> int:
    from framework.codegen import CodegenConfig, generate

    changed = generate(CodegenConfig(proto_root=Path(args.proto_root), out_dir=Path(args.out)))
    print(f"{len(changed)} generated file(s) changed under {args.out}")
    return 0


def _reference(args: argparse.Namespace) -> int:
    from framework.reference import ReferenceConfig, write_reference

    changed = write_reference(ReferenceConfig(Path(args.proto_root), Path(args.out)))
    print(f"{args.out} {'updated' if changed else 'is current'}")
    return 0


def _up(args: argparse.Namespace) -> int:
    from framework.system.manifest import ManifestError, load_manifest
    from framework.system.supervisor import StartupError
    from framework.system.up import run_up

    try:
        manifest = load_manifest(args.manifest)
    except ManifestError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    def progress(text: str) -> None:
        print(f"up: {text}", file=sys.stderr, flush=True)

    try:
        return asyncio.run(run_up(manifest, progress=progress))
    except StartupError as error:
        print(f"error: the system did not start: {error}", file=sys.stderr)
        return 1


TOKEN_KEY_ENV = "FRAMEWORK_TOKEN_KEY"  # path of a PEM private key
TOKEN_SECRET_ENV = "FRAMEWORK_TOKEN_SECRET"  # an HMAC secret (HS256), at least 32 bytes


def _signing(args: argparse.Namespace) -> tuple[object, str | None, str | None]:
    """(SigningKey, issuer, audience) from --key, --secret-env, the environment or the system."""
    import os

    from framework.auth.devtoken import SigningKey

    kid = args.kid or "dev-1"
    key_path = args.key or os.environ.get(TOKEN_KEY_ENV, "")
    secret_env = args.secret_env or (TOKEN_SECRET_ENV if os.environ.get(TOKEN_SECRET_ENV) else "")
    if key_path:
        return SigningKey.from_pem_file(key_path, kid), args.issuer, args.audience
    if secret_env:
        secret = os.environ.get(secret_env, "")
        if not secret:
            raise ValueError(f"the environment variable {secret_env} is empty or unset")
        return SigningKey.hmac(secret, kid), args.issuer, args.audience
    # The development keys of the system `make run` started (python -m framework up).
    from framework.system.keys import (
        PLATFORM_ISSUER,
        PLATFORM_KID,
        USER_ISSUER,
        USER_KID,
        KeyFiles,
    )
    from framework.system.manifest import ManifestError, load_manifest

    manifest_path = Path(args.manifest)
    if not manifest_path.exists():
        raise ValueError(
            f"no signing key: pass --key PEM or --secret-env VAR, set {TOKEN_KEY_ENV} or "
            f"{TOKEN_SECRET_ENV}, or run it next to a system manifest ({manifest_path} is missing)"
        )
    try:
        manifest = load_manifest(manifest_path)
    except ManifestError as error:
        raise ValueError(str(error)) from None
    files = KeyFiles(manifest.data_dir / "keys")
    path = files.platform_signing if args.platform else files.user_signing
    if not path.exists():
        raise ValueError(
            f"no signing key at {path}: `make run` creates the system's development keys "
            "(or pass --key PEM / --secret-env VAR)"
        )
    kid, issuer = (PLATFORM_KID, PLATFORM_ISSUER) if args.platform else (USER_KID, USER_ISSUER)
    return (
        SigningKey.from_pem_file(path, args.kid or kid),
        args.issuer or issuer,
        args.audience or manifest.name,
    )


def _token(args: argparse.Namespace) -> int:
    from framework.auth.devtoken import SigningKey, mint_token

    try:
        key, issuer, audience = _signing(args)
        assert isinstance(key, SigningKey)
        scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
        issued = mint_token(
            key, args.sub, scopes, issuer=issuer, audience=audience, ttl_s=args.ttl_s
        )
    except (ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    expires = issued.expires_at.isoformat(timespec="seconds") if issued.expires_at else "never"
    print(
        f"token: sub={args.sub} scope={' '.join(sorted(set(scopes))) or '-'} "
        f"iss={issuer or '-'} aud={audience or '-'} {key.algorithm} kid={key.kid}, "
        f"expires {expires}; send it as 'authorization: Bearer <token>'",
        file=sys.stderr,
    )
    print(issued.token)
    return 0


def _new(args: argparse.Namespace) -> int:
    from framework.scaffold import ScaffoldError, new_service

    try:
        written = new_service(args.name, args.root)
    except ScaffoldError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    root = Path(args.root).resolve()
    for path in written:
        print(f"wrote {path.relative_to(root)}")
    print(
        f"next: make lint test (the new tests are tests/services/test_{args.name}.py); "
        "make run starts it with the system"
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    from framework.workers.target import main as serve_main

    return serve_main(args.target, args.workers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m framework")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("protos", help="compile .proto contracts into Python packages")
    p.add_argument("--proto-root", default="protos")
    p.add_argument("--out", default="gen")
    p.set_defaults(func=_protos)
    for name, text in (
        ("health", "health of a server (host:port) or of every instance of a service"),
        ("services", "every service of a running system: instances, health, versions"),
        ("breakers", "circuit breakers of every instance of a running system"),
        ("faults", "set|clear|list fault injection on a service's instances"),
    ):
        sub.add_parser(name, help=f"{text} (see {name} --help)")
    sub.add_parser("registry", help="the service registry: serve, list, show, weights (see --help)")
    sub.add_parser("gateway", help="the HTTP/JSON and gRPC-Web gateway (see --help)")
    sub.add_parser("events", help="event store tools: rebuild a projection (see --help)")
    sub.add_parser("analyze", help="coupling and decomposition findings (see --help)")
    u = sub.add_parser("up", help="run a whole system from its manifest (Ctrl-C stops it)")
    u.add_argument("manifest", nargs="?", default="system.toml", help="default: system.toml")
    u.set_defaults(func=_up)
    sub.add_parser("sagas", help="sagas: list, show ID, watch ID, retry ID (see --help)")
    t = sub.add_parser(
        "token",
        help="sign a development JWT (printed on stdout)",
        description="Sign a JWT for development. The key: --key PEM (or $FRAMEWORK_TOKEN_KEY), "
        "--secret-env VAR naming an HMAC secret of 32+ bytes (or $FRAMEWORK_TOKEN_SECRET), "
        "else the development keys of the system in --manifest (what `make run` created). "
        "Scopes go in the `scope` claim, space-separated. Never a built-in secret.",
    )
    t.add_argument("--sub", required=True, help="the caller (the sub claim)")
    t.add_argument("--scopes", default="", help="comma-separated, e.g. orders:read,orders:write")
    t.add_argument("--key", default="", help="PEM private key (EC -> ES256, RSA, Ed25519)")
    t.add_argument("--secret-env", default="", help="environment variable holding an HMAC secret")
    t.add_argument("--kid", default="", help="key id in the header (default: the key's)")
    t.add_argument("--issuer", default=None, help="the iss claim")
    t.add_argument("--audience", default=None, help="the aud claim")
    t.add_argument("--ttl-s", type=float, default=3600.0, help="lifetime in seconds (3600)")
    t.add_argument("--manifest", default="system.toml", help="system whose dev keys to use")
    t.add_argument(
        "--platform", action="store_true", help="sign as the platform (operator), not a user"
    )
    t.set_defaults(func=_token)
    n = sub.add_parser("new", help="scaffold a service: new service NAME")
    n.add_argument("kind", choices=["service"], help="what to create")
    n.add_argument("name", help="the service's name, e.g. catalog")
    n.add_argument("--root", default=".", help="the repository root (default: here)")
    n.set_defaults(func=_new)
    sub.add_parser("chaos", help="chaos experiments: run, check (see chaos run --help)")
    s = sub.add_parser(
        "serve",
        help="serve MODULE[:FACTORY]'s server with worker processes",
        description="Import MODULE, call FACTORY (default build_server: no arguments, returns a "
        "framework Server not yet started) and serve it with N worker processes sharing its "
        "port (SO_REUSEPORT), supervised: a crashed worker is restarted, SIGTERM drains all.",
    )
    s.add_argument("target", help="MODULE[:FACTORY], e.g. services.echo.main:build_server")
    s.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: the cores)"
    )
    s.set_defaults(func=_serve)
    r = sub.add_parser("reference", help="write the Markdown reference of the contracts")
    r.add_argument("--proto-root", default="protos")
    r.add_argument("--out", default="docs/reference.md")
    r.set_defaults(func=_reference)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from framework.telemetry.logs import PlainFormatter

    handler = logging.StreamHandler()
    handler.setFormatter(PlainFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] in (["services"], ["health"], ["breakers"], ["faults"]) or args_list[:2] == [
        "events",
        "tail",
    ]:
        from framework.system.commands import main as system_main

        return system_main(args_list)
    if args_list[:1] == ["registry"]:
        from framework.registry.cli import main as registry_main

        return int(registry_main(args_list[1:]))
    if args_list[:1] == ["gateway"]:
        from framework.gateway.cli import main as gateway_main

        return int(gateway_main(args_list[1:]))
    if args_list[:1] == ["events"]:
        from framework.events.cli import main as events_main

        return int(events_main(args_list[1:]))
    if args_list[:1] == ["analyze"]:
        from framework.analysis.cli import main as analyze_main

        return analyze_main(args_list[1:])
    if args_list[:1] == ["sagas"]:
        from framework.saga.cli import main as sagas_main

        return sagas_main(args_list[1:])
    if args_list[:1] == ["chaos"]:
        from framework.chaos.cli import main as chaos_main

        return chaos_main(args_list[1:])
    args = build_parser().parse_args(args_list)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
