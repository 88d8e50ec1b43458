"""The payment service through real gRPC: saga-step barrier rules, declines, two replicas.

The barrier is the framework's (`framework.system.barrier.DatabaseBarrier`), in the
payment transaction, on SQLite and PostgreSQL; replicas share one database.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from framework.auth.policy import BearerToken
from framework.client import connect
from framework.clock import ManualClock
from framework.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
)
from framework.saga import Op, saga_key
from framework.system.barrier import retention_from_env
from gen.payment.v1 import payment_pb2 as pb
from gen.payment.v1.payment_pb2_grpc import PaymentServiceStub
from services.payment.application import PaymentConfig
from services.payment.main import PaymentService, build
from tests.services.kit import (
    Backend,
    Keys,
    cut_waiting_on,
    drop_schemas,
    poll,
    runtime_config,
)

LIMIT = 100_00


def _id() -> str:
    return str(uuid.uuid4())


def _key() -> tuple[tuple[str, str]]:
    return (("idempotency-key", _id()),)


def _saga_keys(step: str = "charge") -> tuple[tuple[tuple[str, str]], tuple[tuple[str, str]]]:
    """(action metadata, compensation metadata) as the orchestrator sends them for one step."""
    saga = _id()
    return (
        (("idempotency-key", saga_key(saga, step, Op.ACTION)),),
        (("idempotency-key", saga_key(saga, step, Op.COMPENSATION)),),
    )


def _charge(payment_id: str, amount: int = 25_00, order_id: str = "") -> pb.ChargePaymentRequest:
    return pb.ChargePaymentRequest(
        payment_id=payment_id,
        order_id=order_id or str(uuid.uuid5(uuid.NAMESPACE_URL, payment_id)),
        user_id="6f1d1d0c-5d5e-4c1e-9f57-0f0b7c1b9a11",
        amount_minor=amount,
        currency="EUR",
    )


async def _start(keys: Keys, backend: Backend, config: PaymentConfig) -> PaymentService:
    built = await build(runtime_config("payment", keys, backend), config)
    await built.server.start()
    return built


@pytest.fixture
async def replicas(keys: Keys, backend: Backend) -> AsyncIterator[list[PaymentService]]:
    """Two payment servers sharing one database, as `replicas = 2` runs them."""
    config = PaymentConfig(decline_above_minor=LIMIT)
    started = [await _start(keys, backend, config) for _ in range(2)]
    try:
        yield started
    finally:
        for service in started:
            await service.server.stop(0)


def _stub(
    service: PaymentService, keys: Keys, scopes: list[str] | None = None
) -> PaymentServiceStub:
    token = keys.token(
        "service:sagas", scopes or ["payments:write", "payments:read", "payments:admin"]
    )
    return PaymentServiceStub(connect(service.server.address, policies=[BearerToken(token)]))


async def test_a_repeated_charge_takes_the_money_once(
    replicas: list[PaymentService], keys: Keys
) -> None:
    """The same charge on both replicas returns one payment; the total charged counts it once."""
    first, second = (_stub(s, keys) for s in replicas)
    payment_id = _id()
    a = await first.ChargePayment(_charge(payment_id), metadata=_key())
    b = await second.ChargePayment(_charge(payment_id), metadata=_key())
    assert a.payment == b.payment and a.payment.status == pb.PAYMENT_STATUS_CHARGED
    assert await replicas[0].payments.store.totals() == {"CHARGED": 25_00}
    with pytest.raises(AlreadyExistsError) as mismatch:
        await first.ChargePayment(_charge(payment_id, amount=99), metadata=_key())
    assert mismatch.value.reason == "PAYMENT_MISMATCH"


async def test_racing_charges_on_two_replicas_charge_once(
    replicas: list[PaymentService], keys: Keys
) -> None:
    """Twenty concurrent charges of one id across two replicas: one CHARGED row, same replies."""
    stubs = [_stub(s, keys) for s in replicas]
    payment_id = _id()
    replies = await asyncio.gather(
        *(stubs[i % 2].ChargePayment(_charge(payment_id), metadata=_key()) for i in range(20))
    )
    assert len({r.payment.SerializeToString() for r in replies}) == 1
    assert await replicas[1].payments.store.totals() == {"CHARGED": 25_00}
    assert await replicas[1].payments.store.ledger_balance(payment_id) == 25_00  # one entry


async def test_refund_compensates_once_and_a_late_charge_takes_nothing(
    replicas: list[PaymentService], keys: Keys
) -> None:
    """Refund twice: refunded once; a charge after its refund is PAYMENT_CANCELLED."""
    stub = _stub(replicas[0], keys)
    payment_id = _id()
    await stub.ChargePayment(_charge(payment_id), metadata=_key())
    first = await stub.RefundPayment(
        pb.RefundPaymentRequest(payment_id=payment_id), metadata=_key()
    )
    again = await stub.RefundPayment(
        pb.RefundPaymentRequest(payment_id=payment_id), metadata=_key()
    )
    assert first.refunded and not again.refunded
    assert again.payment.status == pb.PAYMENT_STATUS_REFUNDED
    with pytest.raises(FailedPreconditionError) as late:
        await stub.ChargePayment(_charge(payment_id), metadata=_key())
    assert late.value.reason == "PAYMENT_CANCELLED"
    assert await replicas[0].payments.store.totals() == {"REFUNDED": 25_00}
    assert await replicas[0].payments.store.ledger_balance(payment_id) == 0  # +2500 -2500


async def test_a_refund_before_its_charge_blocks_the_charge(
    replicas: list[PaymentService], keys: Keys
) -> None:
    """Null compensation: refunded=false, nothing stored; the hanging charge is refused."""
    stub = _stub(replicas[0], keys)
    payment_id = _id()
    action, compensation = _saga_keys()
    reply = await stub.RefundPayment(
        pb.RefundPaymentRequest(payment_id=payment_id, reason="saga gave up"),
        metadata=compensation,
    )
    assert not reply.refunded and reply.payment.payment_id == payment_id
    for stub_of in (stub, _stub(replicas[1], keys)):  # refused on either replica, every time
        with pytest.raises(FailedPreconditionError) as hanging:
            await stub_of.ChargePayment(_charge(payment_id), metadata=action)
        assert hanging.value.reason == "ACTION_AFTER_COMPENSATION"
    assert await replicas[0].payments.store.totals() == {}
    assert await replicas[0].payments.store.ledger_balance(payment_id) == 0
    with pytest.raises(NotFoundError):
        await stub.GetPayment(pb.GetPaymentRequest(payment_id=payment_id))


async def test_a_refund_of_nothing_with_a_plain_key_records_nothing(
    replicas: list[PaymentService], keys: Keys
) -> None:
    """Without a saga key a refund of an unknown payment is refunded=false and stores nothing."""
    stub = _stub(replicas[0], keys)
    payment_id = _id()
    reply = await stub.RefundPayment(
        pb.RefundPaymentRequest(payment_id=payment_id), metadata=_key()
    )
    assert not reply.refunded
    assert await replicas[0].payments.store.totals() == {}
    with pytest.raises(NotFoundError):
        await stub.GetPayment(pb.GetPaymentRequest(payment_id=payment_id))


async def test_a_saga_action_repeated_on_two_replicas_at_once_applies_once(
    replicas: list[PaymentService], keys: Keys
) -> None:
    """Ten copies of one saga action racing over two replicas: one charge, the same reply."""
    stubs = [_stub(s, keys) for s in replicas]
    payment_id = _id()
    action, _ = _saga_keys()
    replies = await asyncio.gather(
        *(stubs[i % 2].ChargePayment(_charge(payment_id), metadata=action) for i in range(10))
    )
    assert len({r.SerializeToString() for r in replies}) == 1
    assert await replicas[0].payments.store.totals() == {"CHARGED": 25_00}
    assert await replicas[0].payments.store.ledger_balance(payment_id) == 25_00
    assert await replicas[0].payments.store.barrier.count() == 1


async def test_a_saga_compensation_repeated_answers_the_first_refund(
    replicas: list[PaymentService], keys: Keys
) -> None:
    """The same compensation twice (two replicas): the repeat answers the first, refunds once."""
    first, second = (_stub(s, keys) for s in replicas)
    payment_id = _id()
    action, compensation = _saga_keys()
    await first.ChargePayment(_charge(payment_id), metadata=action)
    refund = pb.RefundPaymentRequest(payment_id=payment_id, reason="saga compensated")
    a = await first.RefundPayment(refund, metadata=compensation)
    b = await second.RefundPayment(refund, metadata=compensation)
    assert a.refunded and a == b
    assert await replicas[0].payments.store.ledger_balance(payment_id) == 0  # +2500 -2500
    with pytest.raises(AlreadyExistsError) as reused:
        await first.RefundPayment(
            pb.RefundPaymentRequest(payment_id=payment_id, reason="other"), metadata=compensation
        )
    assert reused.value.reason == "IDEMPOTENCY_KEY_REUSED"


async def test_saga_action_and_compensation_racing_on_two_replicas_move_no_money(
    replicas: list[PaymentService], keys: Keys
) -> None:
    """Charge on one replica and its refund on the other at once: whichever wins, no money moves."""
    first, second = (_stub(s, keys) for s in replicas)
    outcomes = set()
    for _ in range(8):
        payment_id = _id()
        action, compensation = _saga_keys()
        charged, refunded = await asyncio.gather(
            first.ChargePayment(_charge(payment_id), metadata=action),
            second.RefundPayment(
                pb.RefundPaymentRequest(payment_id=payment_id), metadata=compensation
            ),
            return_exceptions=True,
        )
        assert isinstance(refunded, pb.RefundPaymentResponse)
        if isinstance(charged, FailedPreconditionError):  # compensation first: null, then hanging
            assert charged.reason == "ACTION_AFTER_COMPENSATION" and not refunded.refunded
            outcomes.add("null")
        else:  # the charge first, then undone
            assert isinstance(charged, pb.ChargePaymentResponse) and refunded.refunded
            outcomes.add("undone")
        assert await replicas[0].payments.store.ledger_balance(payment_id) == 0
    assert "CHARGED" not in await replicas[0].payments.store.totals()
    assert outcomes  # at least one of the two orders happened


async def test_a_charge_without_a_key_is_refused(
    replicas: list[PaymentService], keys: Keys
) -> None:
    """ChargePayment without an idempotency-key is INVALID_ARGUMENT and charges nothing."""
    stub = _stub(replicas[0], keys)
    with pytest.raises(InvalidArgumentError) as missing:
        await stub.ChargePayment(_charge(_id()))
    assert "idempotency-key" in missing.value.message
    assert await replicas[0].payments.store.totals() == {}


async def test_a_decline_is_recorded_and_repeated(
    replicas: list[PaymentService], keys: Keys
) -> None:
    """Above the card limit: PAYMENT_DECLINED, the same on retry, nothing charged."""
    stub = _stub(replicas[0], keys)
    payment_id = _id()
    for _ in range(2):
        with pytest.raises(FailedPreconditionError) as declined:
            await stub.ChargePayment(_charge(payment_id, amount=LIMIT + 1), metadata=_key())
        assert declined.value.reason == "PAYMENT_DECLINED"
    stored = await stub.GetPayment(pb.GetPaymentRequest(payment_id=payment_id))
    assert stored.payment.status == pb.PAYMENT_STATUS_FAILED


async def test_random_declines_are_drawn_once_per_payment(keys: Keys, backend: Backend) -> None:
    """failure_rate=1: every new charge is declined, and its retry is declined the same way."""
    service = await _start(keys, backend, PaymentConfig(failure_rate=1.0))
    try:
        stub = _stub(service, keys)
        payment_id = _id()
        for _ in range(2):
            with pytest.raises(FailedPreconditionError) as declined:
                await stub.ChargePayment(_charge(payment_id), metadata=_key())
            assert "card issuer" in declined.value.message
    finally:
        await service.server.stop(0)


async def test_customers_cannot_charge_or_read_other_payments(
    replicas: list[PaymentService], keys: Keys
) -> None:
    """A customer token lacks payments:write; payments:read of another's payment is refused."""
    payment_id = _id()
    await _stub(replicas[0], keys).ChargePayment(_charge(payment_id), metadata=_key())
    customer = keys.customer(_id(), ["orders:write", "payments:read"])
    as_customer = PaymentServiceStub(
        connect(replicas[0].server.address, policies=[BearerToken(customer)])
    )
    with pytest.raises(PermissionDeniedError) as scope:
        await as_customer.ChargePayment(_charge(_id()), metadata=_key())
    assert scope.value.reason == "SCOPE_MISSING"
    with pytest.raises(PermissionDeniedError) as owner:
        await as_customer.GetPayment(pb.GetPaymentRequest(payment_id=payment_id))
    assert owner.value.reason == "NOT_YOUR_PAYMENT"


@pytest.mark.postgres
async def test_a_charge_cut_mid_transaction_is_unavailable_and_its_retry_charges_once(
    keys: Keys, tmp_path: Path, postgres_dsn: str
) -> None:
    """PostgreSQL connection killed after the barrier row, before the payment row: UNAVAILABLE,
    nothing kept; the orchestrator's retry (same key, other replica) charges exactly once."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    backend = Backend("postgres", tmp_path, postgres_dsn, prefix)
    config = PaymentConfig()
    started = [await _start(keys, backend, config) for _ in range(2)]
    try:
        first, second = (_stub(s, keys) for s in started)
        payment_id = _id()
        action, _ = _saga_keys()
        calls: list[asyncio.Future[pb.ChargePaymentResponse]] = []

        async def charge() -> None:
            calls.append(
                asyncio.ensure_future(first.ChargePayment(_charge(payment_id), metadata=action))
            )
            await asyncio.wait([calls[0]])

        schema = backend.store("payment")[1]
        assert await cut_waiting_on(postgres_dsn, schema, "payments", charge) >= 1
        with pytest.raises(UnavailableError):
            await calls[0]
        store = started[0].payments.store
        assert await store.barrier.count() == 0  # the barrier row went with the transaction
        reply = await second.ChargePayment(_charge(payment_id), metadata=action)
        again = await first.ChargePayment(_charge(payment_id), metadata=action)
        assert reply == again and reply.payment.status == pb.PAYMENT_STATUS_CHARGED
        assert await store.ledger_balance(payment_id) == 25_00
        assert await store.barrier.count() == 1
    finally:
        for service in started:
            await service.server.stop(0)
        await drop_schemas(postgres_dsn, prefix)


async def test_pruning_keeps_sagas_in_flight_and_refuses_their_late_duplicates(
    keys: Keys, backend: Backend
) -> None:
    """Pruning deletes only sagas whose newest row is past the horizon: an in-flight saga's
    null compensation, older than the horizon itself, survives, so its late charge is still
    refused; a finished saga's rows go."""
    clock = ManualClock(datetime(2026, 3, 1, tzinfo=UTC))
    # a horizon of one hour; rounds only when called here (the interval never comes)
    env = {"SERVICE_BARRIER_HORIZON_S": "3600", "SERVICE_BARRIER_PRUNE_INTERVAL_S": "1e9"}
    service = await build(runtime_config("payment", keys, backend, **env), clock=clock)
    await service.server.start()
    try:
        stub = _stub(service, keys)
        barrier = service.payments.store.barrier
        in_flight = _id()

        def key(step: str, op: Op) -> tuple[tuple[str, str]]:
            return (("idempotency-key", saga_key(in_flight, step, op)),)

        # t0: one saga charges and is refunded (finished); the in-flight saga's compensation
        # arrives before its action (null compensation)
        done_id, late_id = _id(), _id()
        finished, finished_undo = _saga_keys()
        await stub.ChargePayment(_charge(done_id), metadata=finished)
        undo = pb.RefundPaymentRequest(payment_id=done_id)
        await stub.RefundPayment(undo, metadata=finished_undo)
        null = await stub.RefundPayment(
            pb.RefundPaymentRequest(payment_id=late_id), metadata=key("charge", Op.COMPENSATION)
        )
        assert not null.refunded
        clock.advance(50 * 60)  # t0+50min: the in-flight saga is still calling (another step)
        await stub.ChargePayment(_charge(_id()), metadata=key("fee", Op.ACTION))
        clock.advance(20 * 60)  # t0+70min: both sagas' t0 rows are older than the horizon
        assert await barrier.count() == 2 + 2 + 1
        assert await service.pruner.prune_once() == 2  # only the finished saga's two rows
        assert await barrier.count() == 3
        with pytest.raises(FailedPreconditionError) as late:  # the hanging action, still refused
            await stub.ChargePayment(_charge(late_id), metadata=key("charge", Op.ACTION))
        assert late.value.reason == "ACTION_AFTER_COMPENSATION"
        assert await service.payments.store.ledger_balance(late_id) == 0
        clock.advance(3600)  # the in-flight saga went quiet past the horizon: its rows go too
        assert await service.pruner.prune_once() == 3
        assert await barrier.count() == 0
    finally:
        await service.server.stop(0)


async def test_the_service_prunes_periodically(keys: Keys, backend: Backend) -> None:
    """The running service prunes on its interval: rows of a saga past the horizon disappear."""
    clock = ManualClock(datetime(2026, 3, 1, tzinfo=UTC))
    env = {"SERVICE_BARRIER_HORIZON_S": "3600", "SERVICE_BARRIER_PRUNE_INTERVAL_S": "600"}
    service = await build(runtime_config("payment", keys, backend, **env), clock=clock)
    await service.server.start()
    try:
        action, _ = _saga_keys()
        await _stub(service, keys).ChargePayment(_charge(_id()), metadata=action)
        barrier = service.payments.store.barrier
        assert await barrier.count() == 1

        async def pruner_asleep() -> bool | None:  # its first round is over (a slow one
            return True if clock.sleepers else None  # would otherwise sleep past the advance)

        await poll(pruner_asleep)
        clock.advance(3600 + 600)  # past the horizon, and the next round is due

        async def pruned() -> bool | None:  # the round is over: its count is recorded last
            return True if service.pruner.pruned == 1 else None

        assert await poll(pruned)
        assert await barrier.count() == 0
    finally:
        await service.server.stop(0)


def test_retention_settings_are_validated() -> None:
    """A bad horizon or interval is refused at start-up, naming the variable."""
    assert retention_from_env({}).horizon_s == 7 * 86400
    assert retention_from_env({"SERVICE_BARRIER_HORIZON_S": "60"}).horizon_s == 60
    with pytest.raises(ValueError, match="SERVICE_BARRIER_HORIZON_S"):
        retention_from_env({"SERVICE_BARRIER_HORIZON_S": "a week"})
    with pytest.raises(ValueError, match="horizon_s must be > 0"):
        retention_from_env({"SERVICE_BARRIER_HORIZON_S": "0"})
    with pytest.raises(ValueError, match="SERVICE_BARRIER_PRUNE_INTERVAL_S"):
        retention_from_env({"SERVICE_BARRIER_PRUNE_INTERVAL_S": "-1"})
