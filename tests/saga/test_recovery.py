"""Restarts, two orchestrators driving the same sagas, a definition changed under a saga."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from framework.saga import (
    OrchestratorConfig,
    Retry,
    SagaDefinition,
    SagaOrchestrator,
    SagaStatus,
    Step,
    saga_types,
)
from gen.order.v1 import order_pb2
from gen.saga.v1 import saga_pb2 as pb
from tests.saga.participants import RESERVE, an_order, order_saga, reserve_request
from tests.saga.world import World, saga_store

USER = str(uuid.uuid4())
PATIENT = Retry(max_attempts=10_000, initial_backoff_s=0.01, max_backoff_s=0.05)


async def _stuck_sagas(tmp_path: Path, world: World, count: int) -> list[order_pb2.Order]:
    """Sagas left mid-flight: started while payment is down, then the orchestrator stops."""
    store = await saga_store(tmp_path / "sagas.db")
    first = SagaOrchestrator(store, [order_saga(retry=PATIENT)], world.participants())
    await first.start()
    orders = [an_order(USER, "WIDGET-1", 1, 100) for _ in range(count)]
    for order in orders:
        await first.start_saga("order.confirm", order, saga_id=order.order_id)
    for order in orders:  # each is retrying its charge against the absent payment service
        async for t in first.watch(order.order_id):
            if t.event == "StepAttemptFailed":
                break
    await first.close()
    await store.close()
    return orders


async def test_two_orchestrators_resuming_the_same_sagas_apply_each_step_once(
    tmp_path: Path,
) -> None:
    """Two orchestrators on one store both resume the same sagas: one records each
    transition, the other leaves; every saga completes once, money and stock exact."""
    world = await World.open(tmp_path, users={USER: 10_000}, payment_port=None)
    try:
        orders = await _stuck_sagas(tmp_path, world, 6)
        await world.start_payment()
        stores = [await saga_store(tmp_path / "sagas.db") for _ in range(2)]
        pair = [
            SagaOrchestrator(s, [order_saga(retry=PATIENT)], world.participants()) for s in stores
        ]
        try:
            resumed = await asyncio.gather(*(o.start() for o in pair))
            assert resumed == [6, 6]
            finals = [await pair[0].wait(o.order_id, 60) for o in orders]
            assert {f.status for f in finals} == {pb.SAGA_STATUS_COMPLETED}
            for order in orders:  # one log per saga: every transition once
                events = [t.event async for t in pair[1].watch(order.order_id)]
                assert events.count("SagaCompleted") == 1
                assert events.count("StepSucceeded") == 3
            assert await world.reserved() == 6
            assert (await world.ledger.balances())[USER] == 10_000 - 600
            assert len(await world.notifications.sent()) == 6
        finally:
            for orchestrator, store in zip(pair, stores, strict=True):
                await orchestrator.close()
                await store.close()
    finally:
        await world.close()


async def test_a_definition_that_lost_a_step_marks_the_saga_for_attention(
    tmp_path: Path,
) -> None:
    """Resumed under a definition without one of its recorded steps, a saga needs attention."""
    world = await World.open(tmp_path, users={USER: 10_000}, payment_port=None)
    try:
        (order,) = await _stuck_sagas(tmp_path, world, 1)
        shrunk = SagaDefinition(
            "order.confirm",
            input_type=order_pb2.Order,
            steps=[Step("reserve", RESERVE, request=reserve_request)],
        )
        store = await saga_store(tmp_path / "sagas.db")
        orchestrator = SagaOrchestrator(
            store,
            [shrunk],
            world.participants(),
            config=OrchestratorConfig(compensation_retry=PATIENT),
        )
        try:
            await orchestrator.start()
            saga = await orchestrator.wait(order.order_id, 30)
            assert SagaStatus(saga.status) is SagaStatus.NEEDS_ATTENTION
            assert "has no step charge" in saga.error
            assert await world.reserved() == 1  # nothing undone behind the operator's back
        finally:
            await orchestrator.close()
            await store.close()
    finally:
        await world.close()


@pytest.mark.postgres
async def test_saga_log_connections_cut_mid_saga_are_survived(
    tmp_path: Path, postgres_dsn: str
) -> None:
    """The PostgreSQL saga log's connections are terminated mid-saga: the orchestrator
    re-reads the log and finishes every saga, each transition recorded once."""
    import asyncpg

    from framework.events.postgres import PostgresConfig, PostgresEventStore

    schema = f"sagas_{uuid.uuid4().hex[:12]}"
    store = await PostgresEventStore.open(
        PostgresConfig(dsn=postgres_dsn, schema=schema), saga_types()
    )
    admin = await asyncpg.connect(postgres_dsn)
    world = await World.open(tmp_path, users={USER: 10_000}, payment_port=None)
    orchestrator = SagaOrchestrator(
        store,
        [order_saga(retry=PATIENT)],
        world.participants(),
        config=OrchestratorConfig(recovery_backoff_s=0.05),
    )
    try:
        await orchestrator.start()
        orders = [an_order(USER, "WIDGET-1", 1, 100) for _ in range(3)]
        for order in orders:
            await orchestrator.start_saga("order.confirm", order, saga_id=order.order_id)
        for order in orders:  # retrying the charge: appending StepAttemptFailed now and then
            async for t in orchestrator.watch(order.order_id):
                if t.event == "StepAttemptFailed":
                    break
        cut = await admin.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE pid <> pg_backend_pid() AND query LIKE $1",
            f'%"{schema}"%',
        )
        assert cut  # the store's connections were there, and are gone
        await world.start_payment()
        for order in orders:
            saga = await orchestrator.wait(order.order_id, 60)
            assert saga.status == pb.SAGA_STATUS_COMPLETED
            events = [t.event async for t in orchestrator.watch(order.order_id)]
            assert events.count("StepSucceeded") == 3 and events.count("SagaCompleted") == 1
        assert await world.reserved() == 3
        assert (await world.ledger.balances())[USER] == 10_000 - 300
    finally:
        await orchestrator.close()
        await world.close()
        await store.close()
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()
