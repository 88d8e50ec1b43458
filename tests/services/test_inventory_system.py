"""The inventory as a system process, on SQLite and PostgreSQL, through real gRPC.

`build_in_system` opens the service's own database (`SERVICE_STORE`): a SQLite file
or its PostgreSQL schema, with the saga barrier in it.  Two replicas share one
database here, as `replicas = 2` would run them: the barrier and the row locks keep
stock exact when they race.
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
from framework.errors import FailedPreconditionError, NotFoundError, UnavailableError
from framework.saga import Op, saga_key
from gen.inventory.v1 import inventory_pb2 as pb
from gen.inventory.v1.inventory_pb2_grpc import InventoryServiceStub
from services.inventory.main import InventoryService, build_in_system
from tests.services.kit import Backend, Keys, cut_waiting_on, drop_schemas, poll, runtime_config

SCOPES = ["inventory:read", "inventory:write"]


def _id() -> str:
    return str(uuid.uuid4())


def _key() -> tuple[tuple[str, str]]:
    return (("idempotency-key", _id()),)


def _saga_keys(step: str = "reserve") -> tuple[tuple[tuple[str, str]], tuple[tuple[str, str]]]:
    saga = _id()
    return (
        (("idempotency-key", saga_key(saga, step, Op.ACTION)),),
        (("idempotency-key", saga_key(saga, step, Op.COMPENSATION)),),
    )


def _reserve(rid: str, **lines: int) -> pb.ReserveStockRequest:
    return pb.ReserveStockRequest(
        reservation_id=rid,
        order_id=str(uuid.uuid5(uuid.NAMESPACE_URL, rid)),
        lines=[pb.StockLine(sku=sku, quantity=q) for sku, q in lines.items()],
    )


async def _start(keys: Keys, backend: Backend, **extra: str) -> InventoryService:
    service = await build_in_system(runtime_config("inventory", keys, backend, **extra))
    await service.server.start()
    return service


def _stub(service: InventoryService, keys: Keys) -> InventoryServiceStub:
    token = keys.token("service:sagas", SCOPES)
    return InventoryServiceStub(connect(service.server.address, policies=[BearerToken(token)]))


@pytest.fixture
async def replicas(keys: Keys, backend: Backend) -> AsyncIterator[list[InventoryService]]:
    """Two inventory servers on one database (the first seeds A=5, B=3)."""
    started = [await _start(keys, backend, INVENTORY_SEED="A=5,B=3")]
    started.append(await _start(keys, backend))
    try:
        yield started
    finally:
        for service in started:
            await service.server.stop(0)


async def _stock(stub: InventoryServiceStub, sku: str) -> tuple[int, int]:
    stock = (await stub.GetStock(pb.GetStockRequest(sku=sku))).stock
    return stock.on_hand, stock.reserved


async def test_seeded_on_the_system_database(
    replicas: list[InventoryService], keys: Keys, backend: Backend
) -> None:
    """The seed lands in the service's own database (SQLite file or PostgreSQL schema)."""
    stub = _stub(replicas[1], keys)
    assert await _stock(stub, "A") == (5, 0)
    assert replicas[0].store.db.postgres == (backend.name == "postgres")


async def test_reservations_racing_on_two_replicas_never_oversell(
    replicas: list[InventoryService], keys: Keys
) -> None:
    """Twelve reservations of A and B at once over two replicas: exactly three fit, none twice."""
    stubs = [_stub(s, keys) for s in replicas]
    results = await asyncio.gather(
        *(stubs[i % 2].ReserveStock(_reserve(_id(), A=1, B=1), metadata=_key()) for i in range(12)),
        return_exceptions=True,
    )
    won = [r for r in results if isinstance(r, pb.ReserveStockResponse)]
    assert len(won) == 3
    assert all(isinstance(r, pb.ReserveStockResponse | FailedPreconditionError) for r in results)
    assert await _stock(stubs[0], "A") == (5, 3)
    assert await _stock(stubs[1], "B") == (3, 3)


async def test_first_stock_of_a_sku_added_on_two_replicas_at_once_counts_both(
    replicas: list[InventoryService], keys: Keys
) -> None:
    """Ten first AddStocks of a new SKU racing over two replicas: every unit is counted."""
    stubs = [_stub(s, keys) for s in replicas]
    sku = f"NEW-{_id()[:8].upper()}"
    await asyncio.gather(
        *(
            stubs[i % 2].AddStock(pb.AddStockRequest(sku=sku, quantity=2), metadata=_key())
            for i in range(10)
        )
    )
    assert await _stock(stubs[0], sku) == (20, 0)


async def test_one_saga_reserve_repeated_on_two_replicas_holds_once(
    replicas: list[InventoryService], keys: Keys
) -> None:
    """Eight copies of one saga action over two replicas: the same reply, units held once."""
    stubs = [_stub(s, keys) for s in replicas]
    action, _ = _saga_keys()
    request = _reserve(_id(), A=2)
    replies = await asyncio.gather(
        *(stubs[i % 2].ReserveStock(request, metadata=action) for i in range(8))
    )
    assert len({r.SerializeToString() for r in replies}) == 1
    assert await _stock(stubs[0], "A") == (5, 2)


async def test_release_before_reserve_refuses_the_late_reserve(
    replicas: list[InventoryService], keys: Keys
) -> None:
    """Null compensation on one replica; the hanging action is refused on the other."""
    first, second = (_stub(s, keys) for s in replicas)
    action, compensation = _saga_keys()
    rid = _id()
    released = await first.ReleaseStock(
        pb.ReleaseStockRequest(reservation_id=rid), metadata=compensation
    )
    assert not released.released
    with pytest.raises(FailedPreconditionError) as late:
        await second.ReserveStock(_reserve(rid, A=1), metadata=action)
    assert late.value.reason == "ACTION_AFTER_COMPENSATION"
    assert await _stock(first, "A") == (5, 0)


async def test_reserve_and_release_racing_on_two_replicas_leave_stock_whole(
    replicas: list[InventoryService], keys: Keys
) -> None:
    """A reserve and its release sent at once to different replicas: nothing stays held."""
    first, second = (_stub(s, keys) for s in replicas)
    for _ in range(6):
        action, compensation = _saga_keys()
        rid = _id()
        reserved, released = await asyncio.gather(
            first.ReserveStock(_reserve(rid, A=1), metadata=action),
            second.ReleaseStock(pb.ReleaseStockRequest(reservation_id=rid), metadata=compensation),
            return_exceptions=True,
        )
        assert isinstance(released, pb.ReleaseStockResponse)
        if isinstance(reserved, FailedPreconditionError):
            assert reserved.reason == "ACTION_AFTER_COMPENSATION" and not released.released
        else:
            assert isinstance(reserved, pb.ReserveStockResponse) and released.released
        assert await _stock(first, "A") == (5, 0)


async def test_pruning_spares_an_in_flight_saga(keys: Keys, backend: Backend) -> None:
    """Inventory prunes finished sagas only: a quiet in-flight saga's late reserve is refused."""
    clock = ManualClock(datetime(2026, 3, 1, tzinfo=UTC))
    env = {
        "INVENTORY_SEED": "A=5",
        "SERVICE_BARRIER_HORIZON_S": "3600",
        "SERVICE_BARRIER_PRUNE_INTERVAL_S": "1e9",
    }
    service = await build_in_system(runtime_config("inventory", keys, backend, **env), clock=clock)
    await service.server.start()
    try:
        stub = _stub(service, keys)
        barrier = service.store.barrier
        await poll(lambda: _seeded(stub))  # the seed's AddStock: a plain key, its own "saga"
        saga = _id()
        rid = _id()
        undo = (("idempotency-key", saga_key(saga, "reserve", Op.COMPENSATION)),)
        await stub.ReleaseStock(pb.ReleaseStockRequest(reservation_id=rid), metadata=undo)
        clock.advance(50 * 60)
        other = (("idempotency-key", saga_key(saga, "reserve-more", Op.ACTION)),)
        await stub.ReserveStock(_reserve(_id(), A=1), metadata=other)
        clock.advance(20 * 60)
        assert await service.pruner.prune_once() == 1  # the seed's row, finished 70 min ago
        with pytest.raises(FailedPreconditionError) as late:
            action = (("idempotency-key", saga_key(saga, "reserve", Op.ACTION)),)
            await stub.ReserveStock(_reserve(rid, A=1), metadata=action)
        assert late.value.reason == "ACTION_AFTER_COMPENSATION"
        assert await barrier.count() == 3
        assert await _stock(stub, "A") == (5, 1)
    finally:
        await service.server.stop(0)


async def _seeded(stub: InventoryServiceStub) -> bool | None:
    try:
        return True if (await _stock(stub, "A"))[0] == 5 else None
    except NotFoundError:  # until the seed hook ran
        return None


async def test_a_restart_after_the_seed_was_pruned_adds_nothing(
    keys: Keys, backend: Backend
) -> None:
    """The seed stocks a SKU once: restarted after its key was pruned, it does not add again."""
    clock = ManualClock(datetime(2026, 3, 1, tzinfo=UTC))
    env = {"INVENTORY_SEED": "A=5", "SERVICE_BARRIER_PRUNE_INTERVAL_S": "1e9"}
    config = runtime_config("inventory", keys, backend, **env)
    for restart in range(2):
        service = await build_in_system(config, clock=clock)
        await service.server.start()
        try:
            stub = _stub(service, keys)
            await poll(lambda: _seeded(stub))  # noqa: B023 - awaited within this iteration
            assert await _stock(stub, "A") == (5, 0)
            clock.advance(30 * 86400)
            assert await service.pruner.prune_once() == (1 if restart == 0 else 0)
        finally:
            await service.server.stop(0)


@pytest.mark.postgres
async def test_a_reserve_cut_mid_transaction_is_unavailable_and_its_retry_holds_once(
    keys: Keys, tmp_path: Path, postgres_dsn: str
) -> None:
    """PostgreSQL connection killed after the barrier row, waiting for the stock row lock:
    UNAVAILABLE and nothing kept; the retry with the same key (other replica) holds once."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    backend = Backend("postgres", tmp_path, postgres_dsn, prefix)
    started = [await _start(keys, backend, INVENTORY_SEED="A=5")]
    started.append(await _start(keys, backend))
    try:
        first, second = (_stub(s, keys) for s in started)
        await poll(lambda: _seeded(first))
        action, _ = _saga_keys()
        request = _reserve(_id(), A=2)
        calls: list[asyncio.Future[pb.ReserveStockResponse]] = []

        async def reserve() -> None:
            calls.append(asyncio.ensure_future(first.ReserveStock(request, metadata=action)))
            await asyncio.wait([calls[0]])

        schema = backend.store("inventory")[1]
        barrier = started[0].store.barrier
        rows_before = await barrier.count()
        assert await cut_waiting_on(postgres_dsn, schema, "stock", reserve) >= 1
        with pytest.raises(UnavailableError):
            await calls[0]
        assert await barrier.count() == rows_before  # the barrier row went with the transaction
        reply = await second.ReserveStock(request, metadata=action)
        again = await first.ReserveStock(request, metadata=action)
        assert reply == again
        assert await _stock(first, "A") == (5, 2)
        assert await barrier.count() == rows_before + 1
    finally:
        for service in started:
            await service.server.stop(0)
        await drop_schemas(postgres_dsn, prefix)
