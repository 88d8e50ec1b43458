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
  reference  write docs/reference.md from the contracts (what `make docs` runs)
  analyze  coupling findings from contracts, code and traces (`python -m framework analyze --help`)
  sagas    list, show, watch or retry sagas (`python -m framework sagas --help`)
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
    r = sub.add_parser("reference", help="write the Markdown reference of the contracts")
    r.add_argument("--proto-root", default="protos")
    r.add_argument("--out", default="docs/reference.md")
    r.set_defaults(func=_reference)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
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
    args = build_parser().parse_args(args_list)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
