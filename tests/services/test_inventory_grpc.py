"""The inventory service through real gRPC with its real chain (auth, rate limit, validation)."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from framework.auth.policy import BearerToken
from framework.clock import ManualClock
from framework.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    UnauthenticatedError,
)
from framework.policies.idempotency import IdempotencyKeyPolicy
from framework.policy import Side
from framework.saga.barrier import Op, saga_key
from framework.testing import TestServer, serve
from gen.inventory.v1 import inventory_pb2 as pb
from gen.inventory.v1.inventory_pb2_grpc import InventoryServiceStub
from services.inventory.application import Inventory
from services.inventory.devauth import DevTokens
from services.inventory.domain import Line
from services.inventory.main import inventory_policies, store_check
from services.inventory.servicer import InventoryServicer
from services.inventory.store import SqliteInventoryStore

DEV_SECRET = secrets.token_urlsafe(32)  # this test's own HS256 secret

TOKENS = DevTokens(DEV_SECRET)
WRITE = TOKENS.mint("tester", ["inventory:read", "inventory:write"])
READ_ONLY = TOKENS.mint("reader", ["inventory:read"])


def _id() -> str:
    return str(uuid.uuid4())


def _key() -> tuple[tuple[str, str]]:
    return (("idempotency-key", _id()),)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[TestServer]:
    store = SqliteInventoryStore(str(tmp_path / "inventory.sqlite3"))
    servicer = InventoryServicer(Inventory(store))
    try:
        # the client half attaches a fresh idempotency key where the contract requires one
        client = [BearerToken(WRITE), IdempotencyKeyPolicy(Side.CLIENT)]
        async with serve(
            servicer, policies=inventory_policies(TOKENS), client_policies=client
        ) as t:
            yield t
    finally:
        await store.close()


async def _stocked(stub: InventoryServiceStub, **skus: int) -> None:
    for sku, quantity in skus.items():
        await stub.AddStock(pb.AddStockRequest(sku=sku, quantity=quantity), metadata=_key())


def _reserve(rid: str, oid: str, **lines: int) -> pb.ReserveStockRequest:
    return pb.ReserveStockRequest(
        reservation_id=rid,
        order_id=oid,
        lines=[pb.StockLine(sku=sku, quantity=q) for sku, q in lines.items()],
    )


async def test_reserve_and_release_move_units(harness: TestServer) -> None:
    """A reservation holds units of every line; its release gives them back."""
    stub = harness.stub(InventoryServiceStub)
    await _stocked(stub, A=5, B=3)
    rid = _id()
    reply = await stub.ReserveStock(_reserve(rid, _id(), A=2, B=3))
    assert {s.sku: s.available for s in reply.stocks} == {"A": 3, "B": 0}
    released = await stub.ReleaseStock(pb.ReleaseStockRequest(reservation_id=rid, reason="test"))
    assert released.released
    stock = (await stub.GetStock(pb.GetStockRequest(sku="B"))).stock
    assert (stock.on_hand, stock.reserved, stock.available) == (3, 0, 3)


async def test_short_line_reserves_nothing(harness: TestServer) -> None:
    """One short line refuses the whole reservation (FAILED_PRECONDITION); no line is held."""
    stub = harness.stub(InventoryServiceStub)
    await _stocked(stub, A=5, B=1)
    with pytest.raises(FailedPreconditionError) as caught:
        await stub.ReserveStock(_reserve(_id(), _id(), A=2, B=2))
    assert caught.value.reason == "INSUFFICIENT_STOCK"
    assert (await stub.GetStock(pb.GetStockRequest(sku="A"))).stock.reserved == 0


async def test_repeated_reserve_returns_the_original(harness: TestServer) -> None:
    """ReserveStock repeated (same key or reservation id) answers the first reply, holds once."""
    stub = harness.stub(InventoryServiceStub)
    await _stocked(stub, A=5)
    request = _reserve(_id(), _id(), A=2)
    key = _key()
    first = await stub.ReserveStock(request, metadata=key)
    assert await stub.ReserveStock(request, metadata=key) == first
    assert await stub.ReserveStock(request) == first  # another key, same reservation id
    assert (await stub.GetStock(pb.GetStockRequest(sku="A"))).stock.reserved == 2
    with pytest.raises(AlreadyExistsError) as caught:
        await stub.ReserveStock(_reserve(request.reservation_id, request.order_id, A=3))
    assert caught.value.reason == "RESERVATION_MISMATCH"
    with pytest.raises(AlreadyExistsError) as reused:
        await stub.ReserveStock(_reserve(_id(), _id(), A=1), metadata=key)
    assert reused.value.reason == "IDEMPOTENCY_KEY_REUSED"


async def test_release_twice_and_null_compensation(harness: TestServer) -> None:
    """Releasing twice, or releasing what was never reserved, succeeds with released=false."""
    stub = harness.stub(InventoryServiceStub)
    await _stocked(stub, A=5)
    rid = _id()
    await stub.ReserveStock(_reserve(rid, _id(), A=1))
    key = _key()
    release = pb.ReleaseStockRequest(reservation_id=rid)
    assert (await stub.ReleaseStock(release, metadata=key)).released
    assert (await stub.ReleaseStock(release, metadata=key)).released  # a replay: first answer
    assert not (await stub.ReleaseStock(release)).released  # a new key: nothing left to release
    unknown = await stub.ReleaseStock(pb.ReleaseStockRequest(reservation_id=_id()))
    assert not unknown.released
    assert (await stub.GetStock(pb.GetStockRequest(sku="A"))).stock.reserved == 0


async def test_hanging_reserve_after_release_is_refused(harness: TestServer) -> None:
    """A saga's ReserveStock arriving after its ReleaseStock is refused and holds nothing."""
    stub = harness.stub(InventoryServiceStub)
    await _stocked(stub, A=5)
    rid, saga = _id(), _id()
    compensation = (("idempotency-key", saga_key(saga, "reserve", Op.COMPENSATION)),)
    release = pb.ReleaseStockRequest(reservation_id=rid, reason="saga timed out")
    assert not (await stub.ReleaseStock(release, metadata=compensation)).released
    action = (("idempotency-key", saga_key(saga, "reserve", Op.ACTION)),)
    with pytest.raises(FailedPreconditionError) as caught:
        await stub.ReserveStock(_reserve(rid, _id(), A=1), metadata=action)
    assert caught.value.reason == "ACTION_AFTER_COMPENSATION"
    assert (await stub.GetStock(pb.GetStockRequest(sku="A"))).stock.reserved == 0


async def test_add_stock_is_applied_once_per_idempotency_key(harness: TestServer) -> None:
    """AddStock retried with the same idempotency key adds once; without a key it is refused."""
    stub = harness.stub(InventoryServiceStub)
    key = _key()
    await stub.AddStock(pb.AddStockRequest(sku="A", quantity=4), metadata=key)
    again = await stub.AddStock(pb.AddStockRequest(sku="A", quantity=4), metadata=key)
    assert again.stock.on_hand == 4
    assert (await stub.GetStock(pb.GetStockRequest(sku="A"))).stock.on_hand == 4
    keyless = InventoryServiceStub(harness.connect(policies=[BearerToken(WRITE)]))
    with pytest.raises(InvalidArgumentError) as caught:
        await keyless.AddStock(pb.AddStockRequest(sku="A", quantity=4))
    assert caught.value.reason == "IDEMPOTENCY_KEY_MISSING"
    with pytest.raises(AlreadyExistsError) as reused:
        await stub.AddStock(pb.AddStockRequest(sku="A", quantity=5), metadata=key)
    assert reused.value.reason == "IDEMPOTENCY_KEY_REUSED"


async def test_unknown_sku_is_not_found(harness: TestServer) -> None:
    """GetStock of a SKU never stocked is NOT_FOUND."""
    stub = harness.stub(InventoryServiceStub)
    with pytest.raises(NotFoundError):
        await stub.GetStock(pb.GetStockRequest(sku="NEVER"))


async def test_bad_request_lists_field_violations(harness: TestServer) -> None:
    """A malformed request is INVALID_ARGUMENT with one violation per bad field."""
    stub = harness.stub(InventoryServiceStub)
    bad = pb.ReserveStockRequest(reservation_id="not-a-uuid", order_id=_id())
    with pytest.raises(InvalidArgumentError) as caught:
        await stub.ReserveStock(bad)
    fields = {v.field for v in caught.value.violations}
    assert fields == {"reservation_id", "lines"}


async def test_missing_token_is_unauthenticated(harness: TestServer) -> None:
    """A call without a bearer token is UNAUTHENTICATED."""
    stub = InventoryServiceStub(harness.connect())
    with pytest.raises(UnauthenticatedError):
        await stub.GetStock(pb.GetStockRequest(sku="A"))


async def test_missing_scope_is_permission_denied(harness: TestServer) -> None:
    """A read-only token may read but not reserve."""
    stub = harness.stub(InventoryServiceStub)
    await _stocked(stub, A=1)
    reader = InventoryServiceStub(
        harness.connect(policies=[BearerToken(READ_ONLY), IdempotencyKeyPolicy(Side.CLIENT)])
    )
    assert (await reader.GetStock(pb.GetStockRequest(sku="A"))).stock.on_hand == 1
    with pytest.raises(PermissionDeniedError):
        await reader.ReserveStock(_reserve(_id(), _id(), A=1))


async def test_reservation_survives_a_restart(tmp_path: Path) -> None:
    """The SQLite file keeps reservations: a replay after reopening returns the original."""
    path = str(tmp_path / "inventory.sqlite3")
    rid, oid = _id(), _id()
    first_store = SqliteInventoryStore(path)
    inventory = Inventory(first_store)
    await inventory.add_stock("A", 5, "k1")
    first = await inventory.reserve_stock(rid, oid, [Line("A", 2)])
    await first_store.close()
    second_store = SqliteInventoryStore(path)
    try:
        again = await Inventory(second_store).reserve_stock(rid, oid, first.lines)
        assert again == first
        assert (await Inventory(second_store).get_stock("A")).reserved == 2
    finally:
        await second_store.close()


async def test_concurrent_reservations_never_oversell(harness: TestServer) -> None:
    """Twelve concurrent reservations of one unit against five: exactly five succeed."""
    stub = harness.stub(InventoryServiceStub)
    await _stocked(stub, A=5)
    results = await asyncio.gather(
        *(stub.ReserveStock(_reserve(_id(), _id(), A=1)) for _ in range(12)),
        return_exceptions=True,
    )
    assert sum(isinstance(r, pb.ReserveStockResponse) for r in results) == 5
    assert all(isinstance(r, pb.ReserveStockResponse | FailedPreconditionError) for r in results)
    stock = (await stub.GetStock(pb.GetStockRequest(sku="A"))).stock
    assert (stock.reserved, stock.available) == (5, 0)


async def test_add_stock_rate_limit_from_the_contract() -> None:
    """AddStock's contract limit (burst 100) refuses the 101st call with RESOURCE_EXHAUSTED."""
    store = SqliteInventoryStore(":memory:")
    policies = inventory_policies(TOKENS, clock=ManualClock())
    try:
        async with serve(
            InventoryServicer(Inventory(store)),
            policies=policies,
            client_policies=[BearerToken(WRITE)],
        ) as t:
            stub = t.stub(InventoryServiceStub)
            request = pb.AddStockRequest(sku="A", quantity=1)
            for _ in range(100):
                await stub.AddStock(request, metadata=_key())
            with pytest.raises(RateLimitedError) as caught:
                await stub.AddStock(request, metadata=_key())
            assert caught.value.retry_after_s is not None and caught.value.retry_after_s > 0
            assert (await stub.GetStock(pb.GetStockRequest(sku="A"))).stock.on_hand == 100
    finally:
        await store.close()


async def test_health_follows_the_store() -> None:
    """Standard health turns NOT_SERVING for the inventory service when its store fails."""
    store = SqliteInventoryStore(":memory:")
    async with serve(
        InventoryServicer(Inventory(store)),
        policies=inventory_policies(TOKENS),
        health_checks=[store_check(store)],
    ) as t:
        health = health_pb2_grpc.HealthStub(t.channel)
        ask = health_pb2.HealthCheckRequest(service="inventory.v1.InventoryService")
        assert (await health.Check(ask)).status == health_pb2.HealthCheckResponse.SERVING
        await store.close()
        await t.server.health.check_now()
        assert (await health.Check(ask)).status == health_pb2.HealthCheckResponse.NOT_SERVING
