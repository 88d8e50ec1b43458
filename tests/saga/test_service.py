"""SagaService through real gRPC (validation and error mapping in the chain), and its CLI."""

from __future__ import annotations

import asyncio
import io
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from framework.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from framework.policies.validation import ValidationPolicy
from framework.saga import OrchestratorConfig, Retry, SagaOrchestrator
from framework.saga.cli import run as sagas_cli
from framework.saga.service import SagaServicer
from framework.testing import TestServer, serve
from gen.inventory.v1 import inventory_pb2 as inv
from gen.order.v1 import order_pb2
from gen.saga.v1 import saga_pb2 as pb
from gen.saga.v1.saga_pb2_grpc import SagaServiceStub
from tests.saga.participants import an_order, order_saga
from tests.saga.world import World, saga_store

ROOT = Path(__file__).resolve().parents[2]
USER = str(uuid.uuid4())
FAST = Retry(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.02)


class Harness:
    def __init__(self, world: World, orchestrator: SagaOrchestrator, server: TestServer) -> None:
        self.world, self.orchestrator, self.server = world, orchestrator, server
        self.stub = server.stub(SagaServiceStub)

    async def start(self, order: order_pb2.Order, **fields: object) -> pb.StartSagaResponse:
        packed = any_pb2.Any()
        packed.Pack(order)
        request = pb.StartSagaRequest(
            definition="order.confirm", input=packed, saga_id=order.order_id
        )
        for key, value in fields.items():
            if isinstance(value, any_pb2.Any):
                getattr(request, key).CopyFrom(value)
            else:
                setattr(request, key, value)
        reply: pb.StartSagaResponse = await self.stub.StartSaga(request)
        return reply

    async def finished(self, saga_id: str) -> pb.Saga:
        return await self.orchestrator.wait(saga_id, 30)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    world = await World.open(
        tmp_path, users={USER: 1_000_000}, decline=lambda r: r.amount_minor == 13
    )
    store = await saga_store(tmp_path / "sagas.db")
    orchestrator = SagaOrchestrator(
        store,
        [order_saga(retry=FAST)],
        world.participants(),
        config=OrchestratorConfig(compensation_retry=FAST),
    )
    try:
        async with serve(
            SagaServicer(orchestrator), policies=[ValidationPolicy()], hooks=[orchestrator]
        ) as server:
            yield Harness(world, orchestrator, server)
    finally:
        await orchestrator.close()
        await store.close()
        await world.close()


async def test_start_saga_is_idempotent_by_id(harness: Harness) -> None:
    """StartSaga twice with one id starts one saga; the same id with another input is refused."""
    order = an_order(USER, "WIDGET-1", 1, 100)
    first = await harness.start(order)
    assert first.created and first.saga.status == pb.SAGA_STATUS_RUNNING
    again = await harness.start(order)
    assert not again.created and again.saga.saga_id == order.order_id
    other = an_order(USER, "WIDGET-1", 2, 100)
    other.order_id = order.order_id
    with pytest.raises(AlreadyExistsError) as caught:
        await harness.start(other)
    assert caught.value.reason == "SAGA_ID_REUSED"
    assert (await harness.finished(order.order_id)).status == pb.SAGA_STATUS_COMPLETED
    assert await harness.world.reserved() == 1  # one saga ran, once


async def test_unknown_definition_and_malformed_input_are_invalid_argument(
    harness: Harness,
) -> None:
    """An unknown definition, an input of another type or unparsable bytes: INVALID_ARGUMENT."""
    order = an_order(USER, "WIDGET-1", 1, 100)
    with pytest.raises(InvalidArgumentError) as unknown:
        await harness.start(order, definition="order.nope")
    assert unknown.value.reason == "UNKNOWN_SAGA_DEFINITION"
    assert "order.confirm" in unknown.value.message  # says which it knows
    wrong = any_pb2.Any()
    wrong.Pack(inv.GetStockRequest(sku="A"))
    with pytest.raises(InvalidArgumentError) as wrong_type:
        await harness.start(order, input=wrong)
    assert wrong_type.value.reason == "WRONG_SAGA_INPUT"
    garbage = any_pb2.Any(type_url="type.googleapis.com/order.v1.Order", value=b"\xff\xff\xff")
    with pytest.raises(InvalidArgumentError) as unparsable:
        await harness.start(order, input=garbage)
    assert unparsable.value.reason == "BAD_SAGA_INPUT"
    with pytest.raises(InvalidArgumentError) as bad_id:
        await harness.start(order, saga_id="not an id!")
    assert {v.field for v in bad_id.value.violations} == {"saga_id"}
    with pytest.raises(InvalidArgumentError):
        await harness.start(order, deadline_s=-1.0)
    listed = await harness.stub.ListSagas(pb.ListSagasRequest())
    assert list(listed.sagas) == []  # nothing was started


async def test_unknown_saga_is_not_found(harness: Harness) -> None:
    """GetSaga, WatchSaga and RetrySaga of an unknown id are NOT_FOUND."""
    missing = str(uuid.uuid4())
    with pytest.raises(NotFoundError) as caught:
        await harness.stub.GetSaga(pb.GetSagaRequest(saga_id=missing))
    assert caught.value.reason == "SAGA_NOT_FOUND"
    with pytest.raises(NotFoundError):
        async for _ in harness.stub.WatchSaga(pb.WatchSagaRequest(saga_id=missing)):
            pass
    with pytest.raises(NotFoundError):
        await harness.stub.RetrySaga(pb.RetrySagaRequest(saga_id=missing))


async def test_watch_streams_the_log_then_ends(harness: Harness) -> None:
    """WatchSaga sends every transition in order and ends after the final one."""
    order = an_order(USER, "WIDGET-1", 1, 13)  # declined: the saga compensates
    await harness.start(order)
    seen = [
        (r.transition.version, r.transition.event, r.transition.step)
        async for r in harness.stub.WatchSaga(pb.WatchSagaRequest(saga_id=order.order_id))
    ]
    assert [v for v, _, _ in seen] == list(range(1, len(seen) + 1))
    events = [(e, s) for _, e, s in seen]
    assert events[0] == ("SagaStarted", "")
    assert ("StepFailed", "charge") in events
    assert events.index(("StepCompensated", "charge")) < events.index(
        ("StepCompensated", "reserve")
    )
    assert events[-1] == ("SagaCompensated", "")
    tail = [
        r.transition.version
        async for r in harness.stub.WatchSaga(
            pb.WatchSagaRequest(saga_id=order.order_id, after_version=len(seen) - 1)
        )
    ]
    assert tail == [len(seen)]


async def test_list_filters_by_status_and_pages(harness: Harness) -> None:
    """ListSagas filters by status and pages newest first with a token."""
    completed = [an_order(USER, "WIDGET-1", 1, 100) for _ in range(3)]
    declined = an_order(USER, "WIDGET-1", 1, 13)
    for order in [*completed, declined]:
        await harness.start(order)
    for order in [*completed, declined]:
        await harness.finished(order.order_id)
    await harness.orchestrator.refresh_index()  # the index follows the log asynchronously
    done = await harness.stub.ListSagas(pb.ListSagasRequest(status=pb.SAGA_STATUS_COMPLETED))
    assert {s.saga_id for s in done.sagas} == {o.order_id for o in completed}
    undone = await harness.stub.ListSagas(pb.ListSagasRequest(status=pb.SAGA_STATUS_COMPENSATED))
    assert [s.saga_id for s in undone.sagas] == [declined.order_id]
    assert "charge failed" in undone.sagas[0].error
    first = await harness.stub.ListSagas(pb.ListSagasRequest(page_size=3))
    second = await harness.stub.ListSagas(
        pb.ListSagasRequest(page_size=3, page_token=first.next_page_token)
    )
    assert first.next_page_token and not second.next_page_token
    newest_first = [declined.order_id, *reversed([o.order_id for o in completed])]
    assert [s.saga_id for s in [*first.sagas, *second.sagas]] == newest_first
    with pytest.raises(InvalidArgumentError):
        await harness.stub.ListSagas(pb.ListSagasRequest(page_token="garbage"))
    with pytest.raises(InvalidArgumentError):
        await harness.stub.ListSagas(pb.ListSagasRequest(page_size=501))


async def test_retry_of_a_saga_that_does_not_need_attention_is_refused(
    harness: Harness,
) -> None:
    """RetrySaga on a completed saga is FAILED_PRECONDITION and changes nothing."""
    order = an_order(USER, "WIDGET-1", 1, 100)
    await harness.start(order)
    done = await harness.finished(order.order_id)
    with pytest.raises(FailedPreconditionError):
        await harness.stub.RetrySaga(pb.RetrySagaRequest(saga_id=order.order_id))
    again = await harness.stub.GetSaga(pb.GetSagaRequest(saga_id=order.order_id))
    assert again.saga.version == done.version


async def test_cli_lists_shows_and_watches(harness: Harness) -> None:
    """`sagas list|show|watch` print the sagas, the step log and the transitions."""
    order = an_order(USER, "WIDGET-1", 1, 13)
    await harness.start(order)
    target = ["--target", harness.server.target]
    watched = io.StringIO()
    assert await sagas_cli([*target, "watch", order.order_id], watched) == 0
    lines = watched.getvalue().splitlines()
    assert "SagaStarted -> RUNNING" in lines[0]
    assert "SagaCompensated -> COMPENSATED" in lines[-1]
    shown = io.StringIO()
    assert await sagas_cli([*target, "show", order.order_id], shown) == 0
    text = shown.getvalue()
    assert f"saga {order.order_id}  order.confirm  COMPENSATED" in text
    assert "charge" in text and "PAYMENT_DECLINED" in text and "(pivot)" in text
    await harness.orchestrator.refresh_index()
    listed = io.StringIO()
    assert await sagas_cli([*target, "list", "--status", "compensated"], listed) == 0
    assert order.order_id in listed.getvalue() and "1 saga(s)" in listed.getvalue()
    missing = io.StringIO()
    assert await sagas_cli([*target, "show", str(uuid.uuid4())], missing) == 1
    assert "NOT_FOUND SAGA_NOT_FOUND" in missing.getvalue()


async def test_cli_through_the_framework_dispatcher(harness: Harness) -> None:
    """`python -m framework sagas show ID` runs as a subprocess and exits 0 (1 when unknown)."""
    order = an_order(USER, "WIDGET-1", 1, 100)
    await harness.start(order)
    await harness.finished(order.order_id)

    async def cli(*argv: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "framework",
            "sagas",
            "--target",
            harness.server.target,
            *argv,
            cwd=ROOT,
            env={**os.environ},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(process.communicate(), 120)
        return await process.wait(), out.decode()

    code, out = await cli("show", order.order_id)
    assert code == 0 and "COMPLETED" in out
    code, out = await cli("show", str(uuid.uuid4()))
    assert code == 1 and "SAGA_NOT_FOUND" in out
