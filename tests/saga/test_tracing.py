"""One trace from the RPC that started a saga through every step and compensation."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import any_pb2
from opentelemetry.sdk.trace import ReadableSpan

from framework.policies.validation import ValidationPolicy
from framework.saga import OrchestratorConfig, Retry, SagaOrchestrator
from framework.saga.service import SagaServicer
from framework.telemetry.sdk import Telemetry, TelemetryConfig
from framework.telemetry.tracing import TracingPolicy
from framework.testing import serve
from gen.saga.v1 import saga_pb2 as pb
from gen.saga.v1.saga_pb2_grpc import SagaServiceStub
from tests.saga.participants import an_order, order_saga
from tests.saga.world import World, saga_store

USER = str(uuid.uuid4())
FAST = Retry(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.02)


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    built = Telemetry.build(TelemetryConfig(service_name="sagas", traces_exporter="memory"))
    yield built
    built.shutdown()


def _spans(telemetry: Telemetry) -> list[ReadableSpan]:
    exporter = telemetry.span_exporter
    assert exporter is not None
    return list(exporter.get_finished_spans())  # type: ignore[attr-defined]


def _by_name(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def _parent_name(spans: list[ReadableSpan], span: ReadableSpan) -> str:
    assert span.parent is not None, f"{span.name} has no parent"
    parents = [s for s in spans if s.context.span_id == span.parent.span_id]
    assert parents, f"the parent of {span.name} was not exported"
    return parents[0].name


async def test_one_trace_from_start_saga_through_steps_and_compensations(
    tmp_path: Path, telemetry: Telemetry
) -> None:
    """StartSaga, each step's RPC and each compensation's RPC share one trace, nested."""
    provider = telemetry.tracer_provider
    tracing = TracingPolicy(provider)
    world = await World.open(
        tmp_path,
        users={USER: 10_000},
        decline=lambda _: True,
        server_policies=[tracing],
    )
    store = await saga_store(tmp_path / "sagas.db")
    orchestrator = SagaOrchestrator(
        store,
        [order_saga(retry=FAST)],
        world.participants([TracingPolicy(provider)]),
        tracer_provider=provider,
    )
    try:
        async with serve(
            SagaServicer(orchestrator),
            policies=[TracingPolicy(provider), ValidationPolicy()],
            client_policies=[TracingPolicy(provider)],
            hooks=[orchestrator],
        ) as server:
            order = an_order(USER, "WIDGET-1", 2, 100)
            packed = any_pb2.Any()
            packed.Pack(order)
            await server.stub(SagaServiceStub).StartSaga(
                pb.StartSagaRequest(
                    definition="order.confirm", input=packed, saga_id=order.order_id
                )
            )
            final = await orchestrator.wait(order.order_id, 30)
            assert final.status == pb.SAGA_STATUS_COMPENSATED
    finally:
        await orchestrator.close()
        await store.close()
        await world.close()
    spans = _spans(telemetry)
    start_rpc = [s for s in _by_name(spans, "saga.v1.SagaService/StartSaga")]
    trace_id = start_rpc[0].context.trace_id
    wanted = [
        "saga start order.confirm",
        "saga step reserve",
        "saga step charge",
        "saga compensate charge",
        "saga compensate reserve",
        "inventory.v1.InventoryService/ReserveStock",
        "payment.v1.PaymentService/ChargePayment",
        "payment.v1.PaymentService/RefundPayment",
        "inventory.v1.InventoryService/ReleaseStock",
    ]
    for name in wanted:
        found = _by_name(spans, name)
        assert found, f"no span {name}"
        assert {s.context.trace_id for s in found} == {trace_id}, name
    assert _parent_name(spans, _by_name(spans, "saga start order.confirm")[0]) == (
        "saga.v1.SagaService/StartSaga"
    )
    for step in ("saga step reserve", "saga compensate reserve"):
        assert _parent_name(spans, _by_name(spans, step)[0]) == "saga start order.confirm"
    # participant calls hang under their step: client span, then the participant's server span
    for rpc, step in (
        ("inventory.v1.InventoryService/ReserveStock", "saga step reserve"),
        ("payment.v1.PaymentService/RefundPayment", "saga compensate charge"),
    ):
        client, server_side = sorted(_by_name(spans, rpc), key=lambda s: s.kind.value)
        assert {_parent_name(spans, client), _parent_name(spans, server_side)} == {step, rpc}
    assert not _by_name(spans, "saga step notify")  # never reached


async def test_trace_continues_after_a_restart(tmp_path: Path, telemetry: Telemetry) -> None:
    """A saga resumed by a new orchestrator compensates inside the trace that started it."""
    provider = telemetry.tracer_provider
    world = await World.open(tmp_path, users={USER: 10_000}, payment_port=None)
    path = tmp_path / "sagas.db"
    store = await saga_store(path)
    endless = Retry(max_attempts=10_000, initial_backoff_s=0.01, max_backoff_s=0.02)
    first = SagaOrchestrator(
        store,
        [order_saga(retry=FAST)],
        world.participants([TracingPolicy(provider)]),
        config=OrchestratorConfig(compensation_retry=endless),
        tracer_provider=provider,
    )
    await first.start()
    order = an_order(USER, "WIDGET-1", 1, 100)
    with provider.get_tracer("test").start_as_current_span("request") as request:  # type: ignore[union-attr]
        await first.start_saga("order.confirm", order, saga_id=order.order_id)
    trace_id = request.get_span_context().trace_id
    async for t in first.watch(order.order_id):
        if t.event == "StepAttemptFailed" and "compensation" in t.detail:
            break  # compensating, payment still down: "crash" here
    await first.close()
    await store.close()
    await world.start_payment()
    store = await saga_store(path)
    second = SagaOrchestrator(
        store,
        [order_saga(retry=FAST)],
        world.participants([TracingPolicy(provider)]),
        tracer_provider=provider,
    )
    try:
        assert await second.start() == 1
        final = await second.wait(order.order_id, 30)
        assert final.status == pb.SAGA_STATUS_COMPENSATED
    finally:
        await second.close()
        await store.close()
        await world.close()
    spans = _spans(telemetry)
    resumed = _by_name(spans, "saga compensate reserve")
    assert resumed and {s.context.trace_id for s in resumed} == {trace_id}
    releases = _by_name(spans, "inventory.v1.InventoryService/ReleaseStock")
    assert releases and {s.context.trace_id for s in releases} == {trace_id}
    assert _parent_name(spans, resumed[0]) == "saga start order.confirm"
