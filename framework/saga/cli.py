"""Command line for sagas: `python -m framework sagas <command>`.

    python -m framework sagas list [--status needs_attention] [--definition order.confirm]
    python -m framework sagas show SAGA_ID
    python -m framework sagas watch SAGA_ID
    python -m framework sagas retry SAGA_ID

Each talks to a `saga.v1.SagaService` (`--target host:port`, default
`$SAGAS_TARGET` or 127.0.0.1:50051; `--token` or `$SAGAS_TOKEN`, a bearer
token with `sagas:read`, `sagas:write` for retry).  `watch` prints each
transition as it is recorded and ends when the saga does.  Exit status: 0
done, 1 the service refused (the message says why; `show` of an unknown id,
`watch` of a saga that needs attention), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from datetime import UTC
from typing import Any, TextIO

from google.protobuf import timestamp_pb2

from framework.errors import FrameworkError
from gen.saga.v1 import saga_pb2 as pb
from gen.saga.v1.saga_pb2_grpc import SagaServiceStub

DEFAULT_TARGET = "127.0.0.1:50051"
STATUSES = {
    name.removeprefix("SAGA_STATUS_").lower(): value
    for name, value in pb.SagaStatus.items()
    if value != pb.SAGA_STATUS_UNSPECIFIED
}


def _status(value: int) -> str:
    return pb.SagaStatus.Name(value).removeprefix("SAGA_STATUS_")  # type: ignore[arg-type]


def _step_status(value: int) -> str:
    return pb.StepStatus.Name(value).removeprefix("STEP_STATUS_")  # type: ignore[arg-type]


def _when(stamp: timestamp_pb2.Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return "-"
    moment = stamp.ToDatetime().replace(tzinfo=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m framework sagas")
    parser.add_argument(
        "--target", default=os.environ.get("SAGAS_TARGET", DEFAULT_TARGET), help="host:port"
    )
    parser.add_argument(
        "--token", default=os.environ.get("SAGAS_TOKEN", ""), help="bearer token (sagas:read)"
    )
    parser.add_argument("--timeout-s", type=float, default=10.0, help="per call (not watch)")
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="sagas, newest first")
    listing.add_argument("--status", choices=sorted(STATUSES), help="only this status")
    listing.add_argument("--definition", default="", help="only this definition")
    listing.add_argument("--limit", type=int, default=50, help="most sagas shown (1-500)")
    for name, text in (
        ("show", "one saga and its step log"),
        ("watch", "follow a saga's transitions until it ends"),
        ("retry", "resume a saga that needs attention"),
    ):
        command = sub.add_parser(name, help=text)
        command.add_argument("saga_id")
    return parser


def _metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {args.token}"),) if args.token else ()


async def _list(args: argparse.Namespace, stub: Any, out: TextIO) -> int:
    if not 1 <= args.limit <= 500:
        out.write(f"error: --limit must be 1-500, got {args.limit}\n")
        return 2
    request = pb.ListSagasRequest(
        status=STATUSES[args.status] if args.status else pb.SAGA_STATUS_UNSPECIFIED,
        definition=args.definition,
        page_size=args.limit,
    )
    reply = await stub.ListSagas(request, metadata=_metadata(args), timeout=args.timeout_s)
    out.write(f"{'SAGA':38} {'DEFINITION':20} {'STATUS':16} {'UPDATED':25} ERROR\n")
    for s in reply.sagas:
        out.write(
            f"{s.saga_id:38} {s.definition:20} {_status(s.status):16} "
            f"{_when(s.updated_at):25} {s.error}\n"
        )
    more = " (more: raise --limit or filter)" if reply.next_page_token else ""
    out.write(f"{len(reply.sagas)} saga(s){more}\n")
    return 0


def _write_saga(saga: pb.Saga, out: TextIO) -> None:
    out.write(
        f"saga {saga.saga_id}  {saga.definition}  {_status(saga.status)}\n"
        f"  started {_when(saga.created_at)}  updated {_when(saga.updated_at)}"
        f"  deadline {_when(saga.deadline)}  transitions {saga.version}\n"
        f"  input {saga.input.type_url.rpartition('/')[2]} ({len(saga.input.value)} bytes)\n"
    )
    if saga.error:
        out.write(f"  error: {saga.error}\n")
    out.write(
        f"  {'#':>2} {'STEP':16} {'STATUS':20} {'TRIES':>5} {'UNDO':>4}  METHOD / COMPENSATION\n"
    )
    for index, step in enumerate(saga.steps, start=1):
        undo = f" / {step.compensation.rpartition('/')[2]}" if step.compensation else " (pivot)"
        out.write(
            f"  {index:>2} {step.name:16} {_step_status(step.status):20} {step.attempts:>5} "
            f"{step.compensation_attempts:>4}  {step.method}{undo}\n"
        )
        if step.error:
            out.write(f"  {'':>2} {'':16} last error: {step.error}\n")


async def _show(args: argparse.Namespace, stub: Any, out: TextIO) -> int:
    reply = await stub.GetSaga(
        pb.GetSagaRequest(saga_id=args.saga_id), metadata=_metadata(args), timeout=args.timeout_s
    )
    _write_saga(reply.saga, out)
    return 0


async def _watch(args: argparse.Namespace, stub: Any, out: TextIO) -> int:
    last = pb.SAGA_STATUS_UNSPECIFIED
    stream = stub.WatchSaga(pb.WatchSagaRequest(saga_id=args.saga_id), metadata=_metadata(args))
    async for item in stream:
        t = item.transition
        last = t.status
        step = f" {t.step}" if t.step else ""
        detail = f"  {t.detail}" if t.detail else ""
        out.write(f"{_when(t.at)} #{t.version:<3} {t.event}{step} -> {_status(t.status)}{detail}\n")
        out.flush()
    return 1 if last == pb.SAGA_STATUS_NEEDS_ATTENTION else 0


async def _retry(args: argparse.Namespace, stub: Any, out: TextIO) -> int:
    reply = await stub.RetrySaga(
        pb.RetrySagaRequest(saga_id=args.saga_id), metadata=_metadata(args), timeout=args.timeout_s
    )
    out.write(f"saga {reply.saga.saga_id} resumed: {_status(reply.saga.status)}\n")
    return 0


async def run(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run one command; the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:
        return int(stop.code or 0)
    out = out or sys.stdout
    from framework.client import connect

    channel = connect(args.target)
    try:
        stub = SagaServiceStub(channel)
        command = {"list": _list, "show": _show, "watch": _watch, "retry": _retry}[args.command]
        return await command(args, stub, out)
    except FrameworkError as error:
        out.write(f"error: {error.message} ({error.code().name} {error.reason})\n")
        return 1
    finally:
        await channel.close()


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return asyncio.run(run(argv))
