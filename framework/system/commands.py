"""Operator commands for a running system: `python -m framework <command>` (or `microframework`).

    services            every service: instances, health, versions, weights
    health TARGET       host:port, or a service name (every instance of it)
    breakers            circuit breakers of every instance (state, failure rate)
    faults set|clear|list SERVICE ...   fault injection on every instance of a service
    events tail         a service's events as they are recorded (--follow)

Where the system is: `--registry HOST:PORT` and `--token-file FILE`, or by default what
`python -m framework up` wrote to `<data>/endpoints.json` for the manifest
(`--manifest`, default `system.toml`); `$MICROFRAMEWORK_TOKEN_FILE` also names the
token file.  Every listing takes `--json` (one JSON document on stdout); progress goes
to stderr when it is a terminal.  Exit codes: 0 done, 1 the system answered with an
error (or something is unhealthy), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import grpc

from framework.errors import FrameworkError

__all__ = ["COMMANDS", "main"]

COMMANDS = ("services", "health", "breakers", "faults", "events")
TOKEN_ENV = "MICROFRAMEWORK_TOKEN_FILE"


class UsageError(Exception):
    """Bad arguments or no system found (exit 2)."""


@dataclass(frozen=True, slots=True)
class Target:
    registry: str
    token: str

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def _endpoints(manifest: str) -> dict[str, str]:
    from framework.system.manifest import ManifestError, load_manifest

    try:
        loaded = load_manifest(manifest)
    except ManifestError as error:
        raise UsageError(f"{error}; or give --registry") from None
    path = loaded.data_dir / "endpoints.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UsageError(
            f"{path} not found: is the system running (`python -m framework up {manifest}`)? "
            "Or give --registry and --token-file"
        ) from None
    return {str(k): str(v) for k, v in data.items()}


def _target(args: argparse.Namespace, environ: Mapping[str, str]) -> Target:
    endpoints: dict[str, str] = {}
    if not args.registry or not (args.token_file or environ.get(TOKEN_ENV)):
        endpoints = _endpoints(args.manifest)
    registry = args.registry or endpoints.get("registry", "")
    token_file = args.token_file or environ.get(TOKEN_ENV) or endpoints.get("operator_token", "")
    return Target(registry, _read_token(token_file))


def _read_token(token_file: str) -> str:
    if not token_file:
        return ""
    try:
        return Path(token_file).read_text().strip()
    except OSError as error:
        raise UsageError(f"cannot read the token file {token_file}: {error.strerror}") from None


class Progress:
    """`[i/n] what` on stderr when it is a terminal (never on stdout: --json stays clean)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()

    def __call__(self, index: int, total: int, what: str) -> None:
        if self.enabled:
            self.stream.write(f"\r\x1b[K[{index}/{total}] {what}")
            if index == total:
                self.stream.write("\r\x1b[K")
            self.stream.flush()


def _table(out: TextIO, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [list(map(str, header)), *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for row in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


# ---------------------------------------------------------------- registry views


@dataclass(frozen=True, slots=True)
class InstanceRow:
    service: str
    instance: str
    address: str
    version: str
    zone: str
    weight: int
    health: str


async def _discover(target: Target, progress: Progress) -> tuple[list[InstanceRow], dict[str, Any]]:
    from framework.client import connect
    from framework.registry.model import Health
    from gen.registry.v1 import registry_pb2
    from gen.registry.v1.registry_pb2_grpc import RegistryServiceStub

    channel = connect(target.registry)
    try:
        stub = RegistryServiceStub(channel)
        listed = await stub.ListServices(
            registry_pb2.ListServicesRequest(), metadata=target.metadata, timeout=5
        )
        rows: list[InstanceRow] = []
        weights: dict[str, Any] = {}
        services = sorted(s.service for s in listed.services)
        for index, service in enumerate(services, start=1):
            progress(index, len(services), service)
            view = await stub.Discover(
                registry_pb2.DiscoverRequest(service=service, include_unhealthy=True),
                metadata=target.metadata,
                timeout=5,
            )
            weights[service] = dict(view.version_weights)
            for i in view.instances:
                rows.append(
                    InstanceRow(
                        service,
                        i.metadata.get("instance", ""),
                        i.address,
                        i.version,
                        i.zone,
                        i.weight,
                        Health(int(i.health)).name,
                    )
                )
        return rows, weights
    finally:
        await channel.close()


async def _services(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    rows, weights = await _discover(target, Progress())
    if args.json:
        json.dump(
            {
                "registry": target.registry,
                "services": [
                    {
                        "service": service,
                        "version_weights": weights[service],
                        "instances": [
                            {
                                "instance": r.instance,
                                "address": r.address,
                                "version": r.version,
                                "zone": r.zone,
                                "weight": r.weight,
                                "health": r.health,
                            }
                            for r in rows
                            if r.service == service
                        ],
                    }
                    for service in sorted(weights)
                ],
            },
            out,
            indent=2,
        )
        out.write("\n")
        return 0
    _table(
        out,
        ("SERVICE", "INSTANCE", "ADDRESS", "VERSION", "WEIGHT", "HEALTH"),
        [
            (r.service, r.instance or "-", r.address, r.version or "-", r.weight, r.health)
            for r in rows
        ],
    )
    routed = {s: w for s, w in weights.items() if w}
    for service, w in sorted(routed.items()):
        shown = " ".join(f"{v}={n}" for v, n in sorted(w.items()))
        out.write(f"version weights of {service}: {shown}\n")
    out.write(f"{len(weights)} services, {len(rows)} instances (registry {target.registry})\n")
    return 0


async def _instances(target: Target, name: str) -> list[InstanceRow]:
    """Instances of a service given by full name or short name (`payment`)."""
    rows, _ = await _discover(target, Progress())
    wanted = [
        r
        for r in rows
        if r.service == name
        or (
            "." not in name
            and r.service.startswith(f"{name}.")
            and not r.service.startswith("events.")
        )
    ]
    if not wanted:
        known = sorted({r.service for r in rows})
        raise UsageError(f"no service {name!r} in the registry; known: {', '.join(known)}")
    return wanted


# ---------------------------------------------------------------- health


def _report_json(summary: Any) -> dict[str, Any]:
    report = summary.report
    return {
        "target": summary.target,
        "status": summary.status,
        "healthy": summary.healthy,
        "draining": report.draining,
        "services": [{"service": s.service, "status": s.status} for s in report.services],
        "checks": [
            {
                "name": c.name,
                "required": c.required,
                "healthy": c.healthy,
                "latency_ms": round(c.latency_ms, 3),
                "last_error": c.last_error,
            }
            for c in report.checks
        ],
    }


async def _health(args: argparse.Namespace, environ: Mapping[str, str], out: TextIO) -> int:
    from framework.health import fetch_report

    looks_like_address = ":" in args.target and args.target.rsplit(":", 1)[1].isdigit()
    token = ""  # the checks' detail is only reported to operators (framework.health)
    if looks_like_address:
        addresses = [(args.target, "")]
        token = _read_token(args.token_file or environ.get(TOKEN_ENV, ""))
    else:
        target = _target(args, environ)
        token = target.token
        addresses = [(r.address, r.instance) for r in await _instances(target, args.target)]
    summaries: list[Any] = []
    failed: list[dict[str, str]] = []
    progress = Progress()
    for index, (address, _) in enumerate(addresses, start=1):
        progress(index, len(addresses), address)
        try:
            summaries.append(await fetch_report(address, timeout_s=args.timeout_s, token=token))
        except grpc.aio.AioRpcError as error:
            failed.append(
                {"target": address, "status": "UNREACHABLE", "error": error.details() or ""}
            )
    healthy = all(s.healthy for s in summaries) and not failed
    if args.json:
        json.dump(
            {"healthy": healthy, "instances": [*map(_report_json, summaries), *failed]},
            out,
            indent=2,
        )
        out.write("\n")
    else:
        for summary in summaries:
            out.write(f"{summary}\n")
        for item in failed:
            out.write(f"{item['target']}: UNREACHABLE ({item['error']})\n")
    return 0 if healthy else 1


# ---------------------------------------------------------------- breakers


async def _breakers(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    from framework.client import connect
    from gen.framework.v1 import breakers_pb2
    from gen.framework.v1.breakers_pb2_grpc import BreakerServiceStub

    rows, _ = await _discover(target, Progress())
    processes: dict[str, str] = {}
    for r in rows:
        if not r.service.startswith("registry."):
            processes.setdefault(r.address, r.instance)
    found: list[dict[str, Any]] = []
    unreachable: list[str] = []
    progress = Progress()
    for index, (address, instance) in enumerate(sorted(processes.items()), start=1):
        progress(index, len(processes), address)
        channel = connect(address)
        try:
            reply = await BreakerServiceStub(channel).ListBreakers(
                breakers_pb2.ListBreakersRequest(), metadata=target.metadata, timeout=5
            )
        except (FrameworkError, grpc.aio.AioRpcError):
            unreachable.append(address)
            continue
        finally:
            await channel.close()
        for b in reply.breakers:
            found.append(
                {
                    "instance": reply.instance or instance,
                    "target": b.target,
                    "method": b.method,
                    "state": b.state,
                    "failure_rate": round(b.failure_rate, 4),
                    "recorded": b.recorded,
                }
            )
    if args.json:
        json.dump({"breakers": found, "unreachable": unreachable}, out, indent=2)
        out.write("\n")
        return 0
    _table(
        out,
        ("INSTANCE", "METHOD", "TARGET", "STATE", "FAILURES"),
        [
            (
                b["instance"],
                b["method"],
                b["target"],
                b["state"],
                f"{b['failure_rate']:.0%} of {b['recorded']}",
            )
            for b in found
        ],
    )
    opened = sum(1 for b in found if b["state"] != "CLOSED")
    out.write(f"{len(found)} breakers in {len(processes)} processes, {opened} not closed\n")
    for address in unreachable:
        out.write(f"  (no answer from {address})\n")
    return 0


# ---------------------------------------------------------------- faults


def _fault_rule(args: argparse.Namespace) -> Any:
    from gen.framework.v1 import faults_pb2

    if args.abort is None and not args.delay_s:
        raise UsageError("a fault needs --abort CODE and/or --delay-s SECONDS")
    rule = faults_pb2.FaultRule(
        name=args.name, method=args.method, delay_s=args.delay_s, abort_message=args.message
    )
    if args.abort is not None:
        try:
            code = grpc.StatusCode[args.abort.upper()]
        except KeyError:
            names = ", ".join(c.name for c in grpc.StatusCode if c is not grpc.StatusCode.OK)
            raise UsageError(f"--abort takes a status code name: {names}") from None
        rule.abort_code = code.value[0]
    if args.percent is not None:
        rule.percent = args.percent
    return rule


async def _faults(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    from framework.client import connect
    from gen.framework.v1 import faults_pb2
    from gen.framework.v1.faults_pb2_grpc import FaultInjectionServiceStub

    instances = await _instances(target, args.service)
    request: Any
    if args.action == "set":
        request = faults_pb2.SetFaultsRequest(rules=[_fault_rule(args)])
    elif args.action == "clear":
        request = faults_pb2.ClearFaultsRequest(names=args.names)
    else:
        request = faults_pb2.ListFaultsRequest()
    results: list[dict[str, Any]] = []
    progress = Progress()
    for index, row in enumerate(instances, start=1):
        progress(index, len(instances), row.address)
        channel = connect(row.address)
        try:
            stub = FaultInjectionServiceStub(channel)
            call: Callable[..., Awaitable[Any]] = {
                "set": stub.SetFaults,
                "clear": stub.ClearFaults,
                "list": stub.ListFaults,
            }[args.action]
            reply = await call(request, metadata=target.metadata, timeout=5)
        finally:
            await channel.close()
        results.append(
            {
                "instance": row.instance,
                "address": row.address,
                "rules": [
                    {
                        "name": r.name,
                        "method": r.method,
                        "percent": r.percent if r.HasField("percent") else 100.0,
                        "delay_s": r.delay_s,
                        "abort": grpc.StatusCode(_code(r.abort_code)).name if r.abort_code else "",
                    }
                    for r in reply.rules
                ],
            }
        )
    if args.json:
        json.dump({"service": args.service, "instances": results}, out, indent=2)
        out.write("\n")
        return 0
    for item in results:
        rules = ", ".join(
            f"{r['name']} ({r['method'] or '*'}: {r['percent']:g}%"
            + (f", delay {r['delay_s']:g}s" if r["delay_s"] else "")
            + (f", abort {r['abort']}" if r["abort"] else "")
            + ")"
            for r in item["rules"]
        )
        out.write(f"{item['instance'] or item['address']}: {rules or 'no faults'}\n")
    return 0


def _code(number: int) -> tuple[int, str]:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code.value  # type: ignore[no-any-return]
    return grpc.StatusCode.UNKNOWN.value  # type: ignore[no-any-return]


# ---------------------------------------------------------------- events tail


def _event_json(envelope: Any) -> dict[str, Any]:
    from google.protobuf import json_format

    from framework.system.eventtypes import decode

    payload = decode(envelope.type, envelope.payload)
    return {
        "position": envelope.position,
        "type": envelope.type,
        "stream_id": envelope.stream_id,
        "version": envelope.version,
        "recorded_at": envelope.recorded_at.ToJsonString(),
        "event": json_format.MessageToDict(payload) if payload is not None else None,
    }


async def _events_tail(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    from framework.client import connect
    from framework.system.feed import EVENT_STORE_SERVICE
    from gen.events.v1 import store_pb2
    from gen.events.v1.store_pb2_grpc import EventStoreServiceStub

    rows, _ = await _discover(target, Progress())
    stores = [r for r in rows if r.service == EVENT_STORE_SERVICE]
    chosen = [
        r
        for r in stores
        if r.instance.rsplit("-", 1)[0] == args.service or r.instance == args.service
    ]
    if not chosen:
        names = sorted({r.instance.rsplit("-", 1)[0] for r in stores})
        raise UsageError(
            f"no event store of {args.service!r} is registered; found: {', '.join(names)}"
        )
    channel = connect(chosen[0].address)
    stub = EventStoreServiceStub(channel)
    position = args.after
    if args.last is not None:
        head = await stub.ReadAll(
            store_pb2.ReadAllRequest(after_position=0, limit=1), metadata=target.metadata, timeout=5
        )
        position = max(0, head.head_position - args.last)
    shown = 0
    try:
        while True:
            page = await stub.ReadAll(
                store_pb2.ReadAllRequest(after_position=position, limit=500),
                metadata=target.metadata,
                timeout=5,
            )
            for envelope in page.events:
                item = _event_json(envelope)
                if args.json:
                    out.write(json.dumps(item) + "\n")
                else:
                    body = (
                        json.dumps(item["event"], separators=(", ", ": "))
                        if item["event"] is not None
                        else "<unknown type>"
                    )
                    out.write(
                        f"#{item['position']:<6} {item['recorded_at']}  {item['type']}  "
                        f"{item['stream_id']} v{item['version']}  {body}\n"
                    )
                position = envelope.position
                shown += 1
            out.flush()
            if not page.events:
                if not args.follow:
                    break
                await asyncio.sleep(args.poll_s)
    finally:
        await channel.close()
    if not args.json and not args.follow:
        out.write(f"{shown} events (up to position {position})\n")
    return 0


# ---------------------------------------------------------------- parsing


def _common(parser: argparse.ArgumentParser, *, listing: bool = True) -> None:
    parser.add_argument(
        "--manifest", default="system.toml", help="the system (default: system.toml)"
    )
    parser.add_argument(
        "--registry", default="", help="registry host:port (default: from the running system)"
    )
    parser.add_argument(
        "--token-file",
        default="",
        help=f"operator token file (default: ${TOKEN_ENV} or the system's)",
    )
    if listing:
        parser.add_argument("--json", action="store_true", help="print one JSON document")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m framework")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("services", help="services with their instances, health, versions, weights")
    _common(s)
    h = sub.add_parser(
        "health", help="health of one server (host:port) or every instance of a service"
    )
    h.add_argument(
        "target", help="host:port, or a service name (e.g. payment or payment.v1.PaymentService)"
    )
    h.add_argument("--timeout-s", type=float, default=5.0)
    _common(h)
    b = sub.add_parser("breakers", help="circuit breakers of every instance")
    _common(b)
    f = sub.add_parser("faults", help="fault injection on every instance of a service")
    fsub = f.add_subparsers(dest="action", required=True)
    fs = fsub.add_parser("set", help="add or replace a rule")
    fs.add_argument("service")
    fs.add_argument("--name", default="cli", help="rule name (replaces a rule of that name)")
    fs.add_argument(
        "--method", default="", help='method pattern, e.g. "*/ChargePayment" (default: all)'
    )
    fs.add_argument(
        "--abort", default=None, metavar="CODE", help="abort with this status, e.g. UNAVAILABLE"
    )
    fs.add_argument("--delay-s", type=float, default=0.0)
    fs.add_argument(
        "--percent", type=float, default=None, help="share of matching calls (default 100)"
    )
    fs.add_argument("--message", default="")
    _common(fs)
    fc = fsub.add_parser("clear", help="remove rules (all, or those named)")
    fc.add_argument("service")
    fc.add_argument("names", nargs="*")
    _common(fc)
    fl = fsub.add_parser("list", help="show the rules")
    fl.add_argument("service")
    _common(fl)
    e = sub.add_parser("events", help="events of a service's store")
    esub = e.add_subparsers(dest="action", required=True)
    et = esub.add_parser("tail", help="print a service's events (--follow to keep going)")
    et.add_argument(
        "service", nargs="?", default="order", help="whose event store (default: order)"
    )
    et.add_argument("--after", type=int, default=0, help="start after this global position")
    et.add_argument("--last", type=int, default=None, help="start with the last N events")
    et.add_argument(
        "--follow", "-f", action="store_true", help="keep printing new events (Ctrl-C stops)"
    )
    et.add_argument("--poll-s", type=float, default=0.5)
    _common(et)
    return parser


async def run(argv: Sequence[str], environ: Mapping[str, str], out: TextIO) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "health":
        return await _health(args, environ, out)
    target = _target(args, environ)
    if not target.registry:
        raise UsageError("no registry address: give --registry or run the system with `up`")
    if args.command == "services":
        return await _services(args, target, out)
    if args.command == "breakers":
        return await _breakers(args, target, out)
    if args.command == "faults":
        return await _faults(args, target, out)
    return await _events_tail(args, target, out)


def main(
    argv: Sequence[str], environ: Mapping[str, str] | None = None, out: TextIO | None = None
) -> int:
    try:
        return asyncio.run(run(argv, os.environ if environ is None else environ, out or sys.stdout))
    except UsageError as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    except FrameworkError as error:
        sys.stderr.write(f"error: {error.message} ({error.reason})\n")
        return 1
    except grpc.aio.AioRpcError as error:
        sys.stderr.write(f"error: {error.code().name}: {error.details()}\n")
        return 1
    except KeyboardInterrupt:
        return 0
