"""`python -m framework chaos run|check ...`: chaos experiments against a system.

    python -m framework chaos run services/chaos/experiments [--manifest system.toml]
        [--store sqlite | postgresql://...] [--bus store | nats://...] [--report DIR]
        [--only NAME,...] [--service-env SERVICE:KEY=VALUE ...] [--keep] [--json]
    python -m framework chaos check EXPERIMENT.toml|DIR ...   # validate, list

`run` starts the manifest's system in a throwaway data directory (its own PostgreSQL
schemas and NATS stream, dropped afterwards unless --keep), runs the experiments,
prints the table and writes `<report>/report.json` and one `<name>.png` timeline each.
Exit status: 0 every hypothesis and invariant held, 1 something failed (named on the
last lines), 2 bad arguments or experiment files.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _service_env(items: Sequence[str]) -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {}
    for item in items:
        service, sep, assignment = item.partition(":")
        key, eq, value = assignment.partition("=")
        if not sep or not eq or not service or not key:
            raise ValueError(f"--service-env takes SERVICE:KEY=VALUE, got {item!r}")
        found.setdefault(service, {})[key] = value
    return found


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m framework chaos")
    sub = parser.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="run experiments against a fresh system; print the table")
    run.add_argument("paths", nargs="+", help="experiment files or directories of *.toml")
    run.add_argument("--manifest", default="system.toml")
    run.add_argument("--store", default="", help='"sqlite" or postgresql://... (default: manifest)')
    run.add_argument("--bus", default="", help='"store" or nats://... (default: manifest)')
    run.add_argument("--report", default="chaos-report", help="where report.json and PNGs go")
    run.add_argument("--only", default="", help="comma-separated experiment names")
    run.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="SERVICE:KEY=VALUE",
        help="extra environment for a service's processes (e.g. a test flag)",
    )
    run.add_argument("--keep", action="store_true", help="keep the data, schemas and stream")
    run.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    run.add_argument("--seed", type=int, default=18, help="random choices (random processes)")
    check = sub.add_parser("check", help="validate experiment files and list them")
    check.add_argument("paths", nargs="+")
    return parser


def main(argv: Sequence[str]) -> int:
    import logging

    from framework.chaos.experiment import ExperimentError, load_experiments

    args = _parser().parse_args(list(argv))
    for noisy in ("httpx", "httpcore", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        experiments = load_experiments(list(args.paths))
    except ExperimentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.action == "check":
        for e in experiments:
            faults = ", ".join(f"@{f.at_s:g}s {f.describe()}" for f in e.faults) or "no faults"
            print(f"{e.name}: {e.load.rate_per_s:g}/s for {e.load.duration_s:g}s; {faults}")
        return 0
    if args.only:
        wanted = {n.strip() for n in args.only.split(",") if n.strip()}
        unknown = sorted(wanted - {e.name for e in experiments})
        if unknown:
            print(
                f"error: --only names unknown experiment(s): {', '.join(unknown)}", file=sys.stderr
            )
            return 2
        experiments = [e for e in experiments if e.name in wanted]
    try:
        service_env = _service_env(args.service_env)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from framework.chaos.report import print_table, to_json, write_json
    from framework.chaos.runner import RunConfig, run_chaos
    from framework.system.manifest import ManifestError
    from framework.system.supervisor import StartupError

    config = RunConfig(
        experiments,
        manifest=Path(args.manifest),
        report_dir=Path(args.report),
        store=args.store,
        bus=args.bus,
        service_env=service_env,
        keep=args.keep,
        seed=args.seed,
    )
    try:
        results = asyncio.run(run_chaos(config, sys.stderr))
    except (ManifestError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except StartupError as error:
        print(f"error: the system did not start: {error}", file=sys.stderr)
        return 1
    path = write_json(results, config.report_dir / "report.json")
    if args.json:
        json.dump(to_json(results), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_table(results, sys.stdout)
        print(f"report: {path}")
    return 0 if results and all(r.passed for r in results) else 1
