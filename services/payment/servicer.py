"""gRPC edge of the payment service: proto <-> application, nothing else."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from google.protobuf import timestamp_pb2

from framework.auth.policy import current_principal
from framework.saga.barrier import current_key
from gen.payment.v1 import payment_pb2 as pb
from gen.payment.v1 import payment_pb2_grpc
from services.payment.application import Payments
from services.payment.domain import Caller, ChargeRequest, Payment, PaymentStatus

__all__ = ["PaymentServicer", "payment_message"]

_STATUS = {
    PaymentStatus.CHARGED: pb.PAYMENT_STATUS_CHARGED,
    PaymentStatus.REFUNDED: pb.PAYMENT_STATUS_REFUNDED,
    PaymentStatus.FAILED: pb.PAYMENT_STATUS_FAILED,
}


def _timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def payment_message(p: Payment) -> pb.Payment:
    return pb.Payment(
        payment_id=p.payment_id,
        order_id=p.order_id,
        user_id=p.user_id,
        amount_minor=p.amount_minor,
        currency=p.currency,
        status=_STATUS[p.status],
        reason=p.reason,
        created_at=_timestamp(p.created_at),
        updated_at=_timestamp(p.updated_at),
    )


class PaymentServicer(payment_pb2_grpc.PaymentServiceServicer):
    def __init__(self, payments: Payments) -> None:
        self.payments = payments

    async def ChargePayment(
        self, request: pb.ChargePaymentRequest, context: Any
    ) -> pb.ChargePaymentResponse:
        payment = await self.payments.charge(
            ChargeRequest(
                request.payment_id,
                request.order_id,
                request.user_id,
                request.amount_minor,
                request.currency,
            ),
            current_key(),
        )
        return pb.ChargePaymentResponse(payment=payment_message(payment))

    async def RefundPayment(
        self, request: pb.RefundPaymentRequest, context: Any
    ) -> pb.RefundPaymentResponse:
        payment, refunded = await self.payments.refund(
            request.payment_id, request.reason, current_key()
        )
        if payment is None:  # nothing was ever charged under this id
            return pb.RefundPaymentResponse(payment=pb.Payment(payment_id=request.payment_id))
        return pb.RefundPaymentResponse(payment=payment_message(payment), refunded=refunded)

    async def GetPayment(
        self, request: pb.GetPaymentRequest, context: Any
    ) -> pb.GetPaymentResponse:
        principal = current_principal()
        caller = Caller(principal.subject, principal.scopes) if principal else Caller("")
        payment = await self.payments.get(caller, request.payment_id)
        return pb.GetPaymentResponse(payment=payment_message(payment))
