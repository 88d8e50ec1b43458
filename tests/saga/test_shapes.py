"""Parallel groups, the per-step deadline from the saga's budget, and the log as the outbox."""

from __future__ import annotations

import uuid
from pathlib import Path

from framework.events.consumer_group import StoreBus
from framework.saga import Parallel, Retry, SagaDefinition, SagaOrchestrator, Step
from gen.order.v1 import order_pb2
from gen.saga.v1 import events_pb2 as ev
from gen.saga.v1 import saga_pb2 as pb
from tests.saga.participants import (
    CHARGE,
    NOTIFY,
    RESERVE,
    an_order,
    charge_request,
    notify_request,
    order_saga,
    reserve_request,
)
from tests.saga.world import World, saga_store

USER = str(uuid.uuid4())
FAST = Retry(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.02)


def _parallel() -> SagaDefinition:
    return SagaDefinition(
        "order.parallel",
        input_type=order_pb2.Order,
        steps=[
            Parallel(
                Step("reserve", RESERVE, request=reserve_request, retry=FAST),
                Step("charge", CHARGE, request=charge_request, retry=FAST),
            ),
            Step("notify", NOTIFY, request=notify_request, compensable=False, retry=FAST),
        ],
    )


async def test_parallel_group_runs_together_and_compensates_together(tmp_path: Path) -> None:
    """Reserve and charge start together; when the charge is declined the reservation is undone."""
    world = await World.open(
        tmp_path, users={USER: 10_000}, decline=lambda r: r.amount_minor == 700
    )
    store = await saga_store(tmp_path / "sagas.db")
    orchestrator = SagaOrchestrator(store, [_parallel()], world.participants())
    await orchestrator.start()
    try:
        ok = an_order(USER, "WIDGET-1", 2, 100)
        done = await orchestrator.run_saga("order.parallel", ok, saga_id=ok.order_id)
        assert done.status == pb.SAGA_STATUS_COMPLETED
        assert [s.group for s in done.steps] == [0, 0, 1]
        log = [(t.event, t.step) async for t in orchestrator.watch(ok.order_id)]
        # both steps of the group were recorded as started before either answered
        first_answer = min(
            i for i, (e, _) in enumerate(log) if e in ("StepSucceeded", "StepFailed")
        )
        assert {("StepStarted", "reserve"), ("StepStarted", "charge")} <= set(log[:first_answer])
        bad = an_order(USER, "WIDGET-1", 7, 100)
        undone = await orchestrator.run_saga("order.parallel", bad, saga_id=bad.order_id)
        assert undone.status == pb.SAGA_STATUS_COMPENSATED
        assert await world.reserved() == 2  # only the completed order's units
        assert (await world.ledger.balances())[USER] == 10_000 - 200
    finally:
        await orchestrator.close()
        await store.close()
        await world.close()


async def test_step_deadline_is_the_smaller_of_its_timeout_and_the_saga_budget(
    tmp_path: Path,
) -> None:
    """A step with a 10 s timeout in a saga with 2 s left is called with at most 2 s."""
    world = await World.open(tmp_path, users={USER: 10_000})
    store = await saga_store(tmp_path / "sagas.db")
    orchestrator = SagaOrchestrator(
        store, [order_saga(timeout_s=10.0, retry=FAST)], world.participants()
    )
    await orchestrator.start()
    try:
        order = an_order(USER, "WIDGET-1", 1, 100)
        saga = await orchestrator.run_saga(
            "order.confirm", order, saga_id=order.order_id, deadline_s=2.0
        )
        assert saga.status == pb.SAGA_STATUS_COMPLETED
        (remaining,) = world.payment.deadlines
        # bounded by the saga's budget (2 s), not by the step's 10 s (gRPC rounds the
        # deadline it sends up by a little, hence the half second)
        assert remaining is not None and remaining <= 2.5
        roomy = an_order(USER, "WIDGET-1", 1, 100)
        await orchestrator.run_saga("order.confirm", roomy, saga_id=roomy.order_id)
        assert world.payment.deadlines[1] is not None and world.payment.deadlines[1] > 2.5
    finally:
        await orchestrator.close()
        await store.close()
        await world.close()


async def test_saga_outcomes_are_published_from_the_log(tmp_path: Path) -> None:
    """The saga's events are in the store's events table (the outbox): a bus group gets them."""
    world = await World.open(tmp_path, users={USER: 10_000})
    store = await saga_store(tmp_path / "sagas.db")
    orchestrator = SagaOrchestrator(store, [order_saga(retry=FAST)], world.participants())
    await orchestrator.start()
    bus = StoreBus(store)
    try:
        completed = ev.SagaCompleted.DESCRIPTOR.full_name
        subscription = await bus.subscribe("billing", event_types=[completed])
        order = an_order(USER, "WIDGET-1", 1, 100)
        await orchestrator.run_saga("order.confirm", order, saga_id=order.order_id)
        received = []
        for _ in range(50):  # bounded: the group catches up from the store
            received = await subscription.fetch(10, timeout_s=0.2)
            if received:
                break
        assert [(d.envelope.stream_id, d.envelope.type) for d in received] == [
            (order.order_id, completed)
        ]
        for delivery in received:
            await delivery.ack()
        await subscription.close()
    finally:
        await bus.close()
        await orchestrator.close()
        await store.close()
        await world.close()
