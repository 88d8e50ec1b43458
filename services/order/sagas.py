"""`Confirmations` on the saga orchestrator (`saga.v1.SagaService`, found in the registry)."""

from __future__ import annotations

import asyncio
from typing import Any

from google.protobuf import any_pb2

from framework.errors import NotFoundError
from gen.order.v1 import saga_pb2
from gen.saga.v1 import saga_pb2 as spb
from gen.saga.v1.saga_pb2_grpc import SagaServiceStub
from services.order import confirmation
from services.order.application import SagaOutcome, SagaState

__all__ = ["SagaConfirmations"]

_STATES = {
    spb.SAGA_STATUS_COMPLETED: SagaState.COMPLETED,
    spb.SAGA_STATUS_COMPENSATED: SagaState.COMPENSATED,
    spb.SAGA_STATUS_NEEDS_ATTENTION: SagaState.NEEDS_ATTENTION,
}


def _outcome(saga: spb.Saga) -> SagaOutcome:
    return SagaOutcome(_STATES.get(saga.status, SagaState.RUNNING), saga.error)


class SagaConfirmations:
    def __init__(self, channel: Any, *, poll_s: float = 0.05, poll_max_s: float = 0.5) -> None:
        self.stub = SagaServiceStub(channel)
        self.poll_s = poll_s
        self.poll_max_s = poll_max_s

    async def start(self, saga_id: str, order: saga_pb2.OrderConfirmation) -> None:
        packed = any_pb2.Any()
        packed.Pack(order)
        await self.stub.StartSaga(
            spb.StartSagaRequest(definition=confirmation.DEFINITION, input=packed, saga_id=saga_id),
            metadata=(("idempotency-key", f"start:{saga_id}"),),
        )

    async def outcome(self, saga_id: str) -> SagaOutcome:
        try:
            reply = await self.stub.GetSaga(spb.GetSagaRequest(saga_id=saga_id))
        except NotFoundError:
            return SagaOutcome(SagaState.MISSING)
        return _outcome(reply.saga)

    async def wait(self, saga_id: str, timeout_s: float) -> SagaOutcome:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        delay = self.poll_s
        while True:
            outcome = await self.outcome(saga_id)
            if outcome.final or loop.time() + delay >= deadline:
                return outcome
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.poll_max_s)
