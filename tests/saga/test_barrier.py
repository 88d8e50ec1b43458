"""The participant barrier through real gRPC, on SQLite and PostgreSQL.

The payment participant (tests/saga/participants.py) records each saga key in
its own database transaction with the money it moves; every test asserts the
participant's own state (balances, payment rows) after the calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from framework.clock import ManualClock
from framework.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
)
from framework.policies.validation import ValidationPolicy
from framework.saga import BarrierCall, Op, saga_key
from framework.saga.barrier import micros
from framework.testing import TestServer, serve
from gen.payment.v1 import payment_pb2 as pay
from gen.payment.v1.payment_pb2_grpc import PaymentServiceStub
from tests.saga.participants import Ledger, PaymentServicer, SqliteLedger

USER = str(uuid.uuid4())
START = 10_000
T0 = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Ledger]:
    """The payment ledger on the parametrized database, with one funded account."""
    clock = ManualClock(T0)
    if request.param == "sqlite":
        found: Ledger = SqliteLedger(str(tmp_path / "ledger.db"), clock=clock)
        await found.open_account(USER, START)
        try:
            yield found
        finally:
            await found.close()
        return
    import asyncpg

    from tests.saga.participants import PostgresLedger

    dsn = request.getfixturevalue("postgres_dsn")
    schema = f"pay_{uuid.uuid4().hex[:12]}"
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=8)
    pg = PostgresLedger(pool, schema, clock=clock)
    await pg.setup()
    await pg.open_account(USER, START)
    try:
        yield pg
    finally:
        await pool.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await pool.close()


@pytest.fixture
async def payments(ledger: Ledger) -> AsyncIterator[TestServer]:
    async with serve(PaymentServicer(ledger), policies=[ValidationPolicy()]) as t:
        yield t


def _charge(amount: int = 300) -> pay.ChargePaymentRequest:
    return pay.ChargePaymentRequest(
        payment_id=str(uuid.uuid4()),
        order_id=str(uuid.uuid4()),
        user_id=USER,
        amount_minor=amount,
        currency="EUR",
    )


def _keys(step: str = "charge") -> tuple[Any, Any]:
    saga = str(uuid.uuid4())
    action = (("idempotency-key", saga_key(saga, step, Op.ACTION)),)
    compensation = (("idempotency-key", saga_key(saga, step, Op.COMPENSATION)),)
    return action, compensation


async def _balance(ledger: Ledger) -> int:
    return (await ledger.balances())[USER]


async def test_duplicate_action_applies_once(payments: TestServer, ledger: Ledger) -> None:
    """The same action sent twice answers the first reply and debits once."""
    stub = payments.stub(PaymentServiceStub)
    action, _ = _keys()
    request = _charge()
    first = await stub.ChargePayment(request, metadata=action)
    assert await stub.ChargePayment(request, metadata=action) == first
    assert await _balance(ledger) == START - 300
    assert len(await ledger.payments()) == 1


async def test_duplicate_compensation_applies_once(payments: TestServer, ledger: Ledger) -> None:
    """The same compensation sent twice credits once; the repeat answers the first reply."""
    stub = payments.stub(PaymentServiceStub)
    action, compensation = _keys()
    request = _charge()
    await stub.ChargePayment(request, metadata=action)
    refund = pay.RefundPaymentRequest(payment_id=request.payment_id, reason="saga compensated")
    first = await stub.RefundPayment(refund, metadata=compensation)
    again = await stub.RefundPayment(refund, metadata=compensation)
    assert first.refunded and again == first
    assert await _balance(ledger) == START
    assert (await ledger.payments())[request.payment_id][2] == pay.PAYMENT_STATUS_REFUNDED


async def test_compensation_without_action_is_a_no_op(payments: TestServer, ledger: Ledger) -> None:
    """A compensation whose action never arrived succeeds (refunded=false) and moves nothing."""
    stub = payments.stub(PaymentServiceStub)
    _, compensation = _keys()
    refund = pay.RefundPaymentRequest(payment_id=str(uuid.uuid4()))
    reply = await stub.RefundPayment(refund, metadata=compensation)
    assert not reply.refunded
    assert await _balance(ledger) == START
    assert await ledger.payments() == {}


async def test_action_after_its_compensation_is_refused(
    payments: TestServer, ledger: Ledger
) -> None:
    """An action arriving after its (null) compensation is FAILED_PRECONDITION and does nothing."""
    stub = payments.stub(PaymentServiceStub)
    action, compensation = _keys()
    request = _charge()
    refund = pay.RefundPaymentRequest(payment_id=request.payment_id)
    assert not (await stub.RefundPayment(refund, metadata=compensation)).refunded
    with pytest.raises(FailedPreconditionError) as caught:
        await stub.ChargePayment(request, metadata=action)
    assert caught.value.reason == "ACTION_AFTER_COMPENSATION"
    with pytest.raises(FailedPreconditionError):  # and again: still refused
        await stub.ChargePayment(request, metadata=action)
    assert await _balance(ledger) == START
    assert await ledger.payments() == {}


async def test_key_reused_for_another_request_is_refused(
    payments: TestServer, ledger: Ledger
) -> None:
    """One key names one request: another request under it is ALREADY_EXISTS, applied never."""
    stub = payments.stub(PaymentServiceStub)
    action, _ = _keys()
    await stub.ChargePayment(_charge(100), metadata=action)
    with pytest.raises(AlreadyExistsError) as caught:
        await stub.ChargePayment(_charge(200), metadata=action)
    assert caught.value.reason == "IDEMPOTENCY_KEY_REUSED"
    assert await _balance(ledger) == START - 100


async def test_missing_or_malformed_key_is_invalid_argument(payments: TestServer) -> None:
    """A step call without a key, or with a malformed saga key, is INVALID_ARGUMENT."""
    stub = payments.stub(PaymentServiceStub)
    with pytest.raises(InvalidArgumentError) as missing:
        await stub.ChargePayment(_charge())
    assert missing.value.reason == "IDEMPOTENCY_KEY_MISSING"
    with pytest.raises(InvalidArgumentError) as malformed:
        await stub.ChargePayment(_charge(), metadata=(("idempotency-key", "saga:x/undo"),))
    assert malformed.value.reason == "BAD_SAGA_KEY"


async def test_action_and_compensation_racing_leave_the_balance_whole(
    payments: TestServer, ledger: Ledger
) -> None:
    """Action and compensation of one step sent at once: whichever wins, no money moves."""
    stub = payments.stub(PaymentServiceStub)
    outcomes: list[str] = []
    for _ in range(10):
        action, compensation = _keys()
        request = _charge(50)
        refund = pay.RefundPaymentRequest(payment_id=request.payment_id)
        charged, refunded = await asyncio.gather(
            stub.ChargePayment(request, metadata=action),
            stub.RefundPayment(refund, metadata=compensation),
            return_exceptions=True,
        )
        assert isinstance(refunded, pay.RefundPaymentResponse)
        if isinstance(charged, FailedPreconditionError):  # compensation first: null, then hanging
            assert not refunded.refunded
            outcomes.append("null")
        else:  # action first, then undone
            assert isinstance(charged, pay.ChargePaymentResponse) and refunded.refunded
            outcomes.append("undone")
    assert await _balance(ledger) == START
    assert all(
        status == pay.PAYMENT_STATUS_REFUNDED for _, _, status in (await ledger.payments()).values()
    )
    assert len(outcomes) == 10


async def test_call_dropped_half_way_then_retried_applies_once(
    payments: TestServer, ledger: Ledger
) -> None:
    """A charge whose caller gave up (deadline) and retried with the same key debits once.

    The first call's 0.1 ms deadline passes before its answer can arrive, whether or not
    the server applied it (on a loaded machine grpc once delivered the answer first: then
    the retry is a plain repeat, which must debit once too)."""
    stub = payments.stub(PaymentServiceStub)
    action, _ = _keys()
    request = _charge(70)
    with contextlib.suppress(DeadlineExceededError):
        await stub.ChargePayment(request, metadata=action, timeout=0.0001)
    reply = await stub.ChargePayment(request, metadata=action)
    assert reply.payment.amount_minor == 70
    assert await _balance(ledger) == START - 70
    assert len(await ledger.payments()) == 1


def test_keys_parse_into_branch_and_direction() -> None:
    """Saga keys name the branch (saga/step) and direction; plain keys deduplicate only."""
    request = _charge()
    action = BarrierCall.of(saga_key("s1", "charge", Op.ACTION), request)
    compensation = BarrierCall.of(saga_key("s1", "charge", Op.COMPENSATION), request)
    assert action.branch == compensation.branch == "s1/charge"
    assert (action.op, compensation.op) == (Op.ACTION, Op.COMPENSATION)
    plain = BarrierCall.of("a-uuid", request)
    assert (plain.branch, plain.op) == ("a-uuid", Op.CALL)
    assert action.fingerprint == BarrierCall.of("k", request).fingerprint
    assert action.fingerprint != BarrierCall.of("k", _charge()).fingerprint


async def test_pruning_spares_sagas_in_flight(payments: TestServer, ledger: Ledger) -> None:
    """prune_finished deletes the rows of sagas whose newest row is past the cutoff only: an
    in-flight saga keeps its old null compensation, so its late action is still refused."""
    stub = payments.stub(PaymentServiceStub)
    clock = ledger.barrier.clock  # type: ignore[attr-defined]
    assert isinstance(clock, ManualClock)
    action, compensation = _keys()  # a saga charged and compensated at t0: finished
    done = _charge(100)
    await stub.ChargePayment(done, metadata=action)
    await stub.RefundPayment(
        pay.RefundPaymentRequest(payment_id=done.payment_id), metadata=compensation
    )
    saga = str(uuid.uuid4())  # in flight: a null compensation at t0, another step at t0+50min
    late = _charge(200)
    undo = (("idempotency-key", saga_key(saga, "charge", Op.COMPENSATION)),)
    await stub.RefundPayment(pay.RefundPaymentRequest(payment_id=late.payment_id), metadata=undo)
    clock.advance(50 * 60)
    fee = (("idempotency-key", saga_key(saga, "fee", Op.ACTION)),)
    await stub.ChargePayment(_charge(5), metadata=fee)
    clock.advance(20 * 60)
    cutoff = micros(clock.now() - timedelta(hours=1))
    assert await ledger.barrier_rows() == 5
    assert await ledger.prune_finished(cutoff) == 2
    assert await ledger.barrier_rows() == 3
    with pytest.raises(FailedPreconditionError) as refused:
        action_of_late = (("idempotency-key", saga_key(saga, "charge", Op.ACTION)),)
        await stub.ChargePayment(late, metadata=action_of_late)
    assert refused.value.reason == "ACTION_AFTER_COMPENSATION"
    assert await _balance(ledger) == START - 5
    assert await ledger.prune_finished(micros(clock.now() + timedelta(minutes=1))) == 3
    assert await ledger.barrier_rows() == 0
