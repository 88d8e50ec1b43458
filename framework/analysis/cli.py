"""`python -m framework analyze [PROTOS] [--code DIR] [--traces FILE] ...`

Prints the report (text or `--format json`), writes pictures of the service graph
(`--graph system.svg`, repeatable: .svg/.png through Graphviz, .dot, .mmd for Mermaid),
and with `--fail-on KIND,...` exits 1 when a finding of those kinds is present, so CI
keeps the architecture honest. Bad input (a missing directory, a proto that does not
compile, a trace file that is not JSON) is one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from framework.analysis.findings import FINDING_KINDS, analyze
from framework.analysis.load import ContractError, load_system
from framework.analysis.render import GraphvizMissingError, render_graph, to_json, to_text
from framework.analysis.traces import TraceFormatError

__all__ = ["main"]


def _kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(FINDING_KINDS))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown finding kind(s) {', '.join(unknown)}; known: {', '.join(FINDING_KINDS)}"
        )
    return kinds


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m framework analyze",
        description="Coupling and decomposition findings from the contracts, code and traces.",
    )
    parser.add_argument("protos", nargs="?", default="protos", type=Path, help="protos dir")
    parser.add_argument("--code", type=Path, help="services directory to scan (e.g. services)")
    parser.add_argument("--traces", type=Path, help="OTLP JSON trace export to read")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument(
        "--graph", type=Path, action="append", default=[], help="picture: .svg .png .dot .mmd"
    )
    parser.add_argument(
        "--fail-on", type=_kinds, default=[], help=f"exit 1 on: {','.join(FINDING_KINDS)}"
    )
    parser.add_argument(
        "--max-chain", type=int, default=2, help="context crossings allowed in a sync chain"
    )
    parser.add_argument(
        "--exclude-context", default="", help="bounded contexts to leave out, comma-separated"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.max_chain < 1:
        print("analyze: --max-chain must be at least 1", file=sys.stderr)
        return 2
    excluded = [c.strip() for c in args.exclude_context.split(",") if c.strip()]
    try:
        model = load_system(args.protos, args.code, args.traces, exclude_contexts=excluded)
        report = analyze(model, max_chain=args.max_chain)
        for picture in args.graph:
            render_graph(report, picture)
    except (ContractError, TraceFormatError, FileNotFoundError, GraphvizMissingError) as error:
        print(f"analyze: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # a service file that is not Python, an unknown picture format
        print(f"analyze: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(to_json(report) if args.format == "json" else to_text(report))
    failing = sorted({f.kind for f in report.findings} & set(args.fail_on))
    if failing:
        print(f"analyze: failing on {', '.join(failing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
