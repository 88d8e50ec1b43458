"""The payment service through real gRPC: saga-step barrier rules, declines, two replicas."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from framework.auth.policy import BearerToken
from framework.client import connect
from framework.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    NotFoundError,
    PermissionDeniedError,
)
from gen.payment.v1 import payment_pb2 as pb
from gen.payment.v1.payment_pb2_grpc import PaymentServiceStub
from services.payment.application import PaymentConfig
from services.payment.main import PaymentService, build
from tests.services.kit import Backend, Keys, runtime_config

LIMIT = 100_00


def _id() -> str:
    return str(uuid.uuid4())


def _key() -> tuple[tuple[str, str]]:
    return (("idempotency-key", _id()),)


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
    """Null compensation: refunded=false and a tombstone; the hanging charge is refused."""
    stub = _stub(replicas[0], keys)
    payment_id = _id()
    reply = await stub.RefundPayment(
        pb.RefundPaymentRequest(payment_id=payment_id, reason="saga gave up"), metadata=_key()
    )
    assert not reply.refunded
    with pytest.raises(FailedPreconditionError) as hanging:
        await stub.ChargePayment(_charge(payment_id), metadata=_key())
    assert hanging.value.reason == "PAYMENT_CANCELLED"
    assert "CHARGED" not in await replicas[0].payments.store.totals()
    assert await replicas[0].payments.store.ledger_balance(payment_id) == 0
    with pytest.raises(NotFoundError):
        await stub.GetPayment(pb.GetPaymentRequest(payment_id=payment_id))


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
