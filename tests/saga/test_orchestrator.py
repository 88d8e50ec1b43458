"""The orchestrator against real participants over gRPC: forward, compensation, retries."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from framework.saga import (
    OrchestratorConfig,
    Participants,
    Retry,
    SagaOrchestrator,
    SagaStatus,
    StepStatus,
)
from gen.payment.v1 import payment_pb2 as pay
from gen.saga.v1 import saga_pb2 as pb
from tests.saga.participants import an_order, order_saga
from tests.saga.world import World, saga_store

USER = str(uuid.uuid4())
PRICE = 250
FAST = Retry(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)


async def _orchestrator(
    tmp_path: Path, participants: Participants, **config: object
) -> SagaOrchestrator:
    store = await saga_store(tmp_path / "sagas.db")
    orchestrator = SagaOrchestrator(
        store,
        [order_saga(retry=FAST)],
        participants,
        config=OrchestratorConfig(**config),  # type: ignore[arg-type]
    )
    await orchestrator.start()
    return orchestrator


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = await World.open(tmp_path, users={USER: 10_000})
    try:
        yield w
    finally:
        await w.close()


async def _close(orchestrator: SagaOrchestrator) -> None:
    await orchestrator.close()
    await orchestrator.store.close()


async def test_happy_path_completes_every_step(tmp_path: Path, world: World) -> None:
    """A saga whose steps all succeed completes: stock held, amount charged, customer notified."""
    orchestrator = await _orchestrator(tmp_path, world.participants())
    try:
        order = an_order(USER, "WIDGET-1", 3, PRICE)
        saga = await orchestrator.run_saga("order.confirm", order, saga_id=order.order_id)
        assert saga.status == pb.SAGA_STATUS_COMPLETED
        assert [s.status for s in saga.steps] == [pb.STEP_STATUS_SUCCEEDED] * 3
        assert await world.reserved() == 3
        assert (await world.ledger.balances())[USER] == 10_000 - 3 * PRICE
        assert len(await world.notifications.sent()) == 1
        charged = await orchestrator.reply(order.order_id, "charge")
        assert isinstance(charged, pay.ChargePaymentResponse)
        assert charged.payment.amount_minor == 3 * PRICE
    finally:
        await _close(orchestrator)


@pytest.mark.parametrize("failing", ["reserve", "charge", "notify"])
async def test_failure_at_step_k_compensates_the_earlier_steps(
    tmp_path: Path, failing: str
) -> None:
    """A step refused by its participant: every earlier step is undone, in reverse order."""
    world = await World.open(
        tmp_path,
        stock=100,
        users={USER: 10_000},
        decline=lambda _: failing == "charge",
        fail_notify=lambda _: failing == "notify",
    )
    orchestrator = await _orchestrator(tmp_path, world.participants())
    try:
        # a reservation of more than the stock is the inventory's refusal
        quantity = 500 if failing == "reserve" else 4
        order = an_order(USER, "WIDGET-1", quantity, PRICE)
        saga = await orchestrator.run_saga("order.confirm", order, saga_id=order.order_id)
        assert saga.status == pb.SAGA_STATUS_COMPENSATED
        steps = {s.name: s for s in saga.steps}
        assert steps[failing].error.startswith("FAILED_PRECONDITION")
        # the participants' own state is as if nothing happened
        assert await world.reserved() == 0
        assert (await world.ledger.balances())[USER] == 10_000
        assert await world.notifications.sent() == []
        payments = await world.ledger.payments()
        assert all(status == pay.PAYMENT_STATUS_REFUNDED for _, _, status in payments.values())
        # compensations ran in reverse order of the steps that started
        log = [
            (t.event, t.step)
            async for t in orchestrator.watch(order.order_id)
            if t.event == "StepCompensated"
        ]
        order_of_steps = ["reserve", "charge", "notify"]
        undone = [name for name in reversed(order_of_steps[: order_of_steps.index(failing) + 1])]
        undone = [name for name in undone if name != "notify"]  # the pivot has no compensation
        assert log == [("StepCompensated", name) for name in undone]
    finally:
        await _close(orchestrator)
        await world.close()


async def test_participant_down_is_retried_then_compensated(tmp_path: Path) -> None:
    """Payment down: the charge is retried within its budget, then the saga compensates."""
    world = await World.open(tmp_path, users={USER: 10_000}, payment_port=None)
    orchestrator = await _orchestrator(
        tmp_path,
        world.participants(),
        compensation_retry=Retry(max_attempts=200, initial_backoff_s=0.01, max_backoff_s=0.02),
    )
    try:
        order = an_order(USER, "WIDGET-1", 2, PRICE)
        await orchestrator.start_saga("order.confirm", order, saga_id=order.order_id)
        events: list[tuple[str, str, str]] = []
        async for t in orchestrator.watch(order.order_id):
            events.append((t.event, t.step, t.detail))
            if t.event == "StepAttemptFailed" and "compensation" in t.detail:
                await world.start_payment()  # back up: the refund (a null compensation) lands
        retried = [
            e for e in events if e[:2] == ("StepAttemptFailed", "charge") and "action" in e[2]
        ]
        assert len(retried) == FAST.max_attempts - 1  # the last failure is the StepFailed
        assert ("StepFailed", "charge") in [(e[0], e[1]) for e in events]
        saga = await orchestrator.get(order.order_id)
        assert saga.status == pb.SAGA_STATUS_COMPENSATED
        assert await world.reserved() == 0
        assert (await world.ledger.balances())[USER] == 10_000
        assert await world.ledger.payments() == {}
    finally:
        await _close(orchestrator)
        await world.close()


async def test_compensation_past_its_limit_needs_attention_then_retry(tmp_path: Path) -> None:
    """A compensation that keeps failing marks the saga NEEDS_ATTENTION; retry() finishes it."""
    world = await World.open(tmp_path, users={USER: 10_000}, payment_port=None)
    orchestrator = await _orchestrator(
        tmp_path,
        world.participants(),
        compensation_retry=Retry(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.01),
    )
    try:
        order = an_order(USER, "WIDGET-1", 2, PRICE)
        saga = await orchestrator.run_saga("order.confirm", order, saga_id=order.order_id)
        assert saga.status == pb.SAGA_STATUS_NEEDS_ATTENTION
        steps = {s.name: s for s in saga.steps}
        assert steps["charge"].status == pb.STEP_STATUS_COMPENSATION_FAILED
        assert "RefundPayment" in saga.error
        listed, _ = await orchestrator.list(status=SagaStatus.NEEDS_ATTENTION)
        assert [s.saga_id for s in listed] == [order.order_id] or await _index_caught_up(
            orchestrator, order.order_id, SagaStatus.NEEDS_ATTENTION
        )
        assert await world.reserved() == 2  # stock is released only after the refund
        await world.start_payment()
        await world.payment_reachable()
        await orchestrator.retry(order.order_id, "test")
        final = await orchestrator.wait(order.order_id, 10)
        assert final.status == pb.SAGA_STATUS_COMPENSATED
        assert await world.reserved() == 0
    finally:
        await _close(orchestrator)
        await world.close()


async def _index_caught_up(
    orchestrator: SagaOrchestrator, saga_id: str, status: SagaStatus
) -> bool:
    """Poll (bounded, ~20 s: the index trails by a batch, longer on a loaded machine) until
    the index lists `saga_id` with `status`."""
    for _ in range(2000):
        listed, _ = await orchestrator.list(status=status)
        if saga_id in [s.saga_id for s in listed]:
            return True
        await orchestrator.index.store.wait_for_events(0, 0.01)
    return False


async def test_deadline_budget_turns_the_saga_back(tmp_path: Path) -> None:
    """A saga whose deadline passes while a participant is down compensates instead of waiting."""
    world = await World.open(tmp_path, users={USER: 10_000}, payment_port=None)
    orchestrator = await _orchestrator(
        tmp_path,
        world.participants(),
        compensation_retry=Retry(max_attempts=500, initial_backoff_s=0.01, max_backoff_s=0.02),
    )
    slow = Retry(max_attempts=1000, initial_backoff_s=0.02, max_backoff_s=0.05)
    orchestrator.definitions["order.slow"] = order_saga("order.slow", retry=slow)
    try:
        order = an_order(USER, "WIDGET-1", 1, PRICE)
        await orchestrator.start_saga("order.slow", order, saga_id=order.order_id, deadline_s=0.5)
        async for t in orchestrator.watch(order.order_id):
            if t.event == "StepAttemptFailed" and "compensation" in t.detail:
                await world.start_payment()
        saga = await orchestrator.get(order.order_id)
        assert saga.status == pb.SAGA_STATUS_COMPENSATED
        charge = {s.name: s for s in saga.steps}["charge"]
        assert charge.attempts < slow.max_attempts  # the budget ended it, not the retry limit
        assert await world.reserved() == 0
    finally:
        await _close(orchestrator)
        await world.close()


async def test_steps_of_a_finished_saga_are_all_recorded(tmp_path: Path, world: World) -> None:
    """GetSaga shows the step log: every step with its status and attempts."""
    orchestrator = await _orchestrator(tmp_path, world.participants())
    try:
        order = an_order(USER, "WIDGET-1", 1, PRICE)
        await orchestrator.run_saga("order.confirm", order, saga_id=order.order_id)
        saga = await orchestrator.get(order.order_id)
        assert [(s.name, s.attempts) for s in saga.steps] == [
            ("reserve", 1),
            ("charge", 1),
            ("notify", 1),
        ]
        assert saga.steps[0].compensation == "inventory.v1.InventoryService/ReleaseStock"
        assert saga.steps[2].compensation == ""
        assert StepStatus(saga.steps[0].status) is StepStatus.SUCCEEDED
        assert saga.version == 8  # started, 3 x (step started, step succeeded), completed
    finally:
        await _close(orchestrator)


async def test_a_three_step_saga_costs_four_appends(tmp_path: Path, world: World) -> None:
    """Start + first step, then each success with the next start, then completion: 4 appends."""
    store = await saga_store(tmp_path / "sagas.db")
    appends: list[tuple[str, list[str]]] = []
    original = store.append

    async def counting(stream_id: str, events: Any, expected: Any, **kw: Any) -> Any:
        appends.append((stream_id, [e.type.rpartition(".")[2] for e in events]))
        return await original(stream_id, events, expected, **kw)

    store.append = counting  # type: ignore[method-assign]
    orchestrator = SagaOrchestrator(store, [order_saga(retry=FAST)], world.participants())
    await orchestrator.start()
    try:
        order = an_order(USER, "WIDGET-1", 1, PRICE)
        saga = await orchestrator.run_saga("order.confirm", order, saga_id=order.order_id)
        assert saga.status == pb.SAGA_STATUS_COMPLETED
    finally:
        await _close(orchestrator)
    assert [events for stream, events in appends if stream == order.order_id] == [
        ["SagaStarted", "StepStarted"],
        ["StepSucceeded", "StepStarted"],
        ["StepSucceeded", "StepStarted"],
        ["StepSucceeded", "SagaCompleted"],
    ]
