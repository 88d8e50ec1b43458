"""Idempotency keys the contract requires: refused without, attached by the client half."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from framework.errors import InvalidArgumentError
from framework.policies.idempotency import IdempotencyKeyPolicy, current_idempotency_key
from framework.policy import Call, Method, Side
from framework.testing import serve
from gen.inventory.v1 import inventory_pb2, inventory_pb2_grpc


class Recorder(inventory_pb2_grpc.InventoryServiceServicer):
    """Remembers the key each ReleaseStock call carried."""

    def __init__(self) -> None:
        self.keys: list[str | None] = []

    async def ReleaseStock(
        self, request: inventory_pb2.ReleaseStockRequest, context: Any
    ) -> inventory_pb2.ReleaseStockResponse:
        self.keys.append(current_idempotency_key())
        return inventory_pb2.ReleaseStockResponse(reservation_id=request.reservation_id)


async def test_a_call_without_the_key_is_refused_and_one_with_it_reaches_the_handler() -> None:
    """Without a key INVALID_ARGUMENT names the missing metadata; the caller's key, or a
    fresh UUID attached by the client half, reaches the handler."""
    servicer = Recorder()
    async with serve(servicer, policies=[IdempotencyKeyPolicy()]) as t:
        stub = t.stub(inventory_pb2_grpc.InventoryServiceStub)
        request = inventory_pb2.ReleaseStockRequest(reservation_id="r1")
        with pytest.raises(InvalidArgumentError) as refused:
            await stub.ReleaseStock(request)
        await stub.ReleaseStock(request, metadata=(("idempotency-key", "k-1"),))
        keyed = inventory_pb2_grpc.InventoryServiceStub(
            t.connect(policies=[IdempotencyKeyPolicy(Side.CLIENT)])
        )
        await keyed.ReleaseStock(request)
    assert [v.field for v in refused.value.violations] == ["idempotency-key"]
    assert "ReleaseStock" in refused.value.message
    assert servicer.keys[0] == "k-1"
    assert servicer.keys[1] is not None
    assert str(uuid.UUID(servicer.keys[1])) == servicer.keys[1]
    assert len(servicer.keys) == 2


def test_methods_without_the_option_are_not_touched() -> None:
    """GetStock does not require a key: the client half does not bind to it and the
    server half lets a call without one through."""
    method = Method.resolve("/inventory.v1.InventoryService/GetStock")
    assert IdempotencyKeyPolicy(Side.CLIENT).bind(method) is None
    server_enter = IdempotencyKeyPolicy().bind(method)
    assert server_enter is not None
    assert server_enter(Call(method, Side.SERVER, metadata=())) is None
