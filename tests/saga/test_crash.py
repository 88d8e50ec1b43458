"""The orchestrator SIGKILLed at random points during 50 sagas, restarted: nothing stuck,
nothing applied twice, every unit of stock and every cent accounted for."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from framework.auth.policy import BearerToken
from framework.client import connect
from framework.errors import FrameworkError
from gen.payment.v1 import payment_pb2 as pay
from gen.saga.v1 import saga_pb2 as pb
from gen.saga.v1.saga_pb2_grpc import SagaServiceStub
from tests.saga.participants import an_order
from tests.saga.world import TOKENS, World

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 90.0  # imports on a loaded 2-core machine
FINISH_TIMEOUT_S = 180.0
STOCK = 1_000
BALANCE = 1_000_000
SAGAS = 50
KILLS = 8
DECLINED_PRICE = 113  # charges of multiples of it are declined (no other order's amount is)
OPERATOR = TOKENS.mint("operator", ["sagas:read", "sagas:write"])


@asynccontextmanager
async def _orchestrator(
    world: World, tmp_path: Path, run: int, kill_after_appends: int = 0
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    port_file = tmp_path / f"port-{run}"
    with (tmp_path / f"orchestrator-{run}.log").open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.saga.orchestrator_process",
            "--store",
            str(tmp_path / "sagas.db"),
            "--port-file",
            str(port_file),
            "--inventory",
            world.servers["inventory"].address,
            "--payment",
            world.payment_target,
            "--notification",
            world.servers["notification"].address,
            "--kill-after-appends",
            str(kill_after_appends),
            cwd=ROOT,
            env={**os.environ},
            stdout=log,
            stderr=log,
        )
        try:
            loop = asyncio.get_running_loop()
            end = loop.time() + START_TIMEOUT_S
            while not port_file.exists():
                if process.returncode is not None:
                    break  # killed itself before serving (kill_after_appends hit on resume)
                if loop.time() > end:
                    raise AssertionError(f"orchestrator {run} did not start in {START_TIMEOUT_S}s")
                try:
                    await asyncio.wait_for(process.wait(), 0.05)
                except TimeoutError:
                    pass
            target = f"127.0.0.1:{port_file.read_text()}" if port_file.exists() else ""
            yield process, target
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGKILL)
            await process.wait()


async def _start_all(target: str, orders: list[pb.StartSagaRequest]) -> int:
    """Send every StartSaga (idempotent); how many got an answer before the process died."""
    answered = 0
    async with connect(target, policies=[BearerToken(OPERATOR)]) as channel:
        stub = SagaServiceStub(channel)

        async def one(request: pb.StartSagaRequest) -> None:
            nonlocal answered
            try:
                await stub.StartSaga(request, timeout=10)
                answered += 1
            except FrameworkError:
                pass  # killed mid-call: sent again on the next run

        await asyncio.gather(*(one(r) for r in orders))
    return answered


@pytest.mark.slow
async def test_sigkill_at_random_points_loses_and_doubles_nothing(tmp_path: Path) -> None:
    """50 sagas, the orchestrator killed 8 times (random moments, or right after an append):
    every saga ends completed or compensated, and stock, balances and notifications add up."""
    rng = random.Random(20260114)
    users = [str(uuid.uuid4()) for _ in range(5)]
    orders = []
    for index in range(SAGAS):
        price = DECLINED_PRICE if index % 5 == 0 else 100  # 20% declined at the charge
        orders.append(an_order(users[index % 5], "WIDGET-1", rng.randint(1, 5), price))
    fail_notify = {o.order_id for i, o in enumerate(orders) if i % 10 == 3}  # fail at the pivot
    world = await World.open(
        tmp_path,
        stock=STOCK,
        users={u: BALANCE for u in users},
        decline=lambda r: r.amount_minor % DECLINED_PRICE == 0,
        fail_notify=lambda r: any(oid in r.body for oid in fail_notify),
    )
    requests = []
    for order in orders:
        packed = any_pb2.Any()
        packed.Pack(order)
        requests.append(
            # a deadline far beyond the test: restarts take seconds each on a loaded machine
            pb.StartSagaRequest(
                definition="order.confirm", input=packed, saga_id=order.order_id, deadline_s=3600
            )
        )
    try:
        wave = -(-SAGAS // KILLS)
        for run in range(KILLS):
            # each run starts the next wave (and re-sends the earlier ones: idempotent), so
            # every kill lands in the middle of work; odd runs die right after an append
            by_appends = rng.randint(3, 40) if run % 2 else 0
            async with _orchestrator(world, tmp_path, run, by_appends) as (process, target):
                if not target:
                    continue
                starting = asyncio.ensure_future(_start_all(target, requests[: wave * (run + 1)]))
                try:  # a random moment (the append-count kill may come first), then kill -9
                    await asyncio.wait_for(process.wait(), rng.uniform(0.05, 0.8))
                except TimeoutError:
                    # it may have killed itself (the append count) as the wait ran out
                    with contextlib.suppress(ProcessLookupError):
                        process.send_signal(signal.SIGKILL)
                await process.wait()
                await starting
        async with _orchestrator(world, tmp_path, KILLS) as (process, target):
            assert await _start_all(target, requests) == SAGAS  # the sagas lost before their
            # start was recorded are started now; the others answer created=false
            final = await _wait_all(target, [o.order_id for o in orders])
        reserved = await world.reserved()
        balances = await world.ledger.balances()
        payments = await world.ledger.payments()
        sent = await world.notifications.sent()
    finally:
        await world.close()

    statuses = {saga_id: saga.status for saga_id, saga in final.items()}
    assert set(statuses.values()) <= {pb.SAGA_STATUS_COMPLETED, pb.SAGA_STATUS_COMPENSATED}
    completed = [o for o in orders if statuses[o.order_id] == pb.SAGA_STATUS_COMPLETED]
    expected_completed = [
        o for o in orders if o.total_minor % DECLINED_PRICE != 0 and o.order_id not in fail_notify
    ]
    assert {o.order_id for o in completed} == {o.order_id for o in expected_completed}
    # stock: held exactly for the completed orders (nothing held twice, nothing leaked)
    assert reserved == sum(o.items[0].quantity for o in completed)
    # money: each customer paid exactly their completed orders
    for user in users:
        paid = sum(o.total_minor for o in completed if o.user_id == user)
        assert balances[user] == BALANCE - paid, user
    charged = [p for p in payments.values() if p[2] == pay.PAYMENT_STATUS_CHARGED]
    assert sorted(p[0] for p in charged) == sorted(o.order_id for o in completed)
    # the pivot: one notification per completed order, never two
    assert sorted(sent) == sorted(
        f"order {o.order_id} confirmed, {o.total_minor} charged" for o in completed
    )


async def _wait_all(target: str, saga_ids: list[str]) -> dict[str, pb.Saga]:
    """Poll GetSaga (bounded) until every saga has finished."""
    loop = asyncio.get_running_loop()
    end = loop.time() + FINISH_TIMEOUT_S
    finished: dict[str, pb.Saga] = {}
    async with connect(target, policies=[BearerToken(OPERATOR)]) as channel:
        stub = SagaServiceStub(channel)
        while len(finished) < len(saga_ids):
            for saga_id in saga_ids:
                if saga_id in finished:
                    continue
                saga = (await stub.GetSaga(pb.GetSagaRequest(saga_id=saga_id), timeout=10)).saga
                if saga.status in (
                    pb.SAGA_STATUS_COMPLETED,
                    pb.SAGA_STATUS_COMPENSATED,
                    pb.SAGA_STATUS_NEEDS_ATTENTION,
                ):
                    finished[saga_id] = saga
            if loop.time() > end:
                stuck = {s: pb.SagaStatus.Name(0) for s in saga_ids if s not in finished}
                raise AssertionError(f"sagas still running after {FINISH_TIMEOUT_S}s: {stuck}")
            await asyncio.sleep(0.1)  # polling a subprocess's state: bounded by FINISH_TIMEOUT_S
    return finished
