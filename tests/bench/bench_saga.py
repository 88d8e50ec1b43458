"""3-step sagas/s against the same 3 RPCs called one after another, bare.

A subprocess (pinned to core 1) serves the three participants of the order saga
on the framework's barrier: inventory (the real service, SQLite), payment
(SQLite ledger) and notification (SQLite), with no policies.  This process
(core 0) runs, interleaved, rounds of:

* `saga`: `SagaOrchestrator.run_saga` of the 3-step order saga (reserve, charge,
  notify), its log in a SQLite event store (WAL, synchronous=FULL): 4 durable
  appends per saga, 3 participant calls, waiting for the outcome;
* `bare`: ReserveStock, ChargePayment, SendNotification sent one after the
  other through the same channels (each with its own idempotency key, so the
  participants do the same work, barrier included).

Both with the same concurrency (CONCURRENCY callers in a closed loop).  The
BENCH line is saga/s over bare-sequences/s; CPU per saga and per sequence is
this (orchestrator / caller) process's only.  With PostgreSQL reachable on
127.0.0.1 the saga log on PostgreSQL is measured too, for information.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from framework.client import connect
from framework.events.sqlite import SqliteConfig, SqliteEventStore
from framework.saga import OrchestratorConfig, Participants, SagaOrchestrator, saga_types
from gen.inventory.v1 import inventory_pb2 as inv
from gen.inventory.v1.inventory_pb2_grpc import InventoryServiceStub
from gen.notification.v1 import notification_pb2 as notif
from gen.notification.v1.notification_pb2_grpc import NotificationServiceStub
from gen.payment.v1 import payment_pb2 as pay
from gen.payment.v1.payment_pb2_grpc import PaymentServiceStub
from tests.bench.harness import (
    Sample,
    bench_line,
    closed_loop,
    interleave,
    latency_us,
    median_cpu_us,
    median_rate,
    pin_to_cpu,
)
from tests.saga.participants import an_order, order_saga

ROUNDS = 5
SAGAS_PER_ROUND = 600
CONCURRENCY = 16
USER = "6f1c1a52-3c1e-4d1b-9a53-2a7d0f6a0b11"


async def _serve() -> None:
    """Subprocess: the three participants; print their addresses; run until stdin closes."""
    from framework.config import ServerConfig
    from framework.server import Server
    from services.inventory.application import Inventory
    from services.inventory.servicer import InventoryServicer
    from services.inventory.store import SqliteInventoryStore
    from tests.saga.participants import NotificationServicer, PaymentServicer, SqliteLedger

    pin_to_cpu(1)
    with tempfile.TemporaryDirectory(prefix="bench-saga-") as tmp:
        store = SqliteInventoryStore(str(Path(tmp) / "inventory.db"))
        inventory = Inventory(store)
        await inventory.add_stock("WIDGET-1", 10_000_000, "seed")
        ledger = SqliteLedger(str(Path(tmp) / "ledger.db"))
        await ledger.open_account(USER, 10**15)
        notifications = NotificationServicer(str(Path(tmp) / "notify.db"), lambda _: False)
        servers = []
        for servicer in (InventoryServicer(inventory), PaymentServicer(ledger), notifications):
            # no policies at all: the bench compares the orchestrator with bare calls
            config = ServerConfig(name="bench", grace_s=0, reflection=False, insecure_dev=True)
            server = Server(config)
            server.add(servicer)
            await server.start()
            servers.append(server)
        print(" ".join(s.address for s in servers), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        for server in servers:
            await server.stop(0)
        await store.close()
        await ledger.close()
        await notifications.close()


def _key() -> tuple[tuple[str, str]]:
    return (("idempotency-key", str(uuid.uuid4())),)


async def _bare(channels: dict[str, Any]) -> None:
    """The same three calls, sent one after the other, no orchestrator."""
    order = an_order(USER, "WIDGET-1", 1, 100)
    await InventoryServiceStub(channels["inventory"]).ReserveStock(
        inv.ReserveStockRequest(
            reservation_id=str(uuid.uuid4()),
            order_id=order.order_id,
            lines=[inv.StockLine(sku="WIDGET-1", quantity=1)],
        ),
        metadata=_key(),
    )
    charged = await PaymentServiceStub(channels["payment"]).ChargePayment(
        pay.ChargePaymentRequest(
            payment_id=str(uuid.uuid4()),
            order_id=order.order_id,
            user_id=USER,
            amount_minor=100,
            currency="EUR",
        ),
        metadata=_key(),
    )
    await NotificationServiceStub(channels["notification"]).SendNotification(
        notif.SendNotificationRequest(
            user_id=USER,
            channel=notif.CHANNEL_EMAIL,
            subject="Order confirmed",
            body=f"order {order.order_id} confirmed, {charged.payment.amount_minor} charged",
        ),
        metadata=_key(),
    )


def _postgres_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1.0):
            return True
    except OSError:
        return False


async def _postgres_store() -> tuple[Any, str]:
    from framework.events.postgres import PostgresConfig, PostgresEventStore

    dsn = os.environ.get("TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
    schema = f"bench_sagas_{uuid.uuid4().hex[:8]}"
    return await PostgresEventStore.open(PostgresConfig(dsn=dsn, schema=schema), saga_types()), (
        schema
    )


async def main() -> None:
    pin_to_cpu(0)
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.bench.bench_saga",
        "serve",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None and child.stdin is not None
    line = await asyncio.wait_for(child.stdout.readline(), 60)
    inventory, payment, notification = line.decode().split()
    channels = {
        "inventory": connect(inventory),
        "payment": connect(payment),
        "notification": connect(notification),
    }
    participants = Participants(
        {
            "inventory.v1.InventoryService": channels["inventory"],
            "payment.v1.PaymentService": channels["payment"],
            "notification.v1.NotificationService": channels["notification"],
        }
    )
    definition = order_saga()
    with tempfile.TemporaryDirectory(prefix="bench-saga-log-") as tmp:
        store = await SqliteEventStore.open(
            SqliteConfig(path=str(Path(tmp) / "sagas.db")), saga_types()
        )
        orchestrator = SagaOrchestrator(
            store, [definition], participants, config=OrchestratorConfig()
        )
        await orchestrator.start()

        async def one_saga(on: SagaOrchestrator) -> None:
            saga = await on.run_saga("order.confirm", an_order(USER, "WIDGET-1", 1, 100))
            assert saga.status == 3, saga  # SAGA_STATUS_COMPLETED

        async def saga_round() -> Sample:
            return await closed_loop(
                lambda: one_saga(orchestrator), concurrency=CONCURRENCY, total=SAGAS_PER_ROUND
            )

        async def bare_round() -> Sample:
            return await closed_loop(
                lambda: _bare(channels), concurrency=CONCURRENCY, total=SAGAS_PER_ROUND
            )

        for _ in range(30):  # warm up: connections, caches, the index table
            await one_saga(orchestrator)
            await _bare(channels)
        samples = await interleave(ROUNDS, saga=saga_round, bare=bare_round)
        await orchestrator.close()
        await store.close()

        pg: list[Sample] = []
        if _postgres_up():
            pg_store, schema = await _postgres_store()
            pg_orchestrator = SagaOrchestrator(pg_store, [definition], participants)
            await pg_orchestrator.start()
            for _ in range(30):
                await one_saga(pg_orchestrator)
            for _ in range(3):
                pg.append(
                    await closed_loop(
                        lambda: one_saga(pg_orchestrator),
                        concurrency=CONCURRENCY,
                        total=SAGAS_PER_ROUND,
                    )
                )
            await pg_orchestrator.close()
            await pg_store.pool.execute(f'DROP SCHEMA "{schema}" CASCADE')
            await pg_store.close()

    child.stdin.close()
    await asyncio.wait_for(child.wait(), 30)
    for channel in channels.values():
        await channel.close()

    saga_rate, bare_rate = median_rate(samples["saga"]), median_rate(samples["bare"])
    print(
        f"saga (SQLite log): {saga_rate:.0f} sagas/s, "
        f"{median_cpu_us(samples['saga']):.0f} us CPU/saga in the orchestrator, "
        f"p50 {latency_us(samples['saga'], 0.5) / 1000:.1f} ms, "
        f"p99 {latency_us(samples['saga'], 0.99) / 1000:.1f} ms"
    )
    print(
        f"bare (3 sequential RPCs): {bare_rate:.0f} sequences/s, "
        f"{median_cpu_us(samples['bare']):.0f} us CPU/sequence in the caller, "
        f"p50 {latency_us(samples['bare'], 0.5) / 1000:.1f} ms, "
        f"p99 {latency_us(samples['bare'], 0.99) / 1000:.1f} ms"
    )
    if pg:
        print(
            f"saga (PostgreSQL log, information): {median_rate(pg):.0f} sagas/s, "
            f"{median_cpu_us(pg):.0f} us CPU/saga, p50 {latency_us(pg, 0.5) / 1000:.1f} ms"
        )
    print(f"concurrency {CONCURRENCY}, {SAGAS_PER_ROUND} per round, {ROUNDS} rounds interleaved")
    bench_line(
        "saga_3step",
        saga_rate / bare_rate,
        saga_rate,
        "sagas/s",
        "3 sequential bare RPCs/s (same participants, same channels)",
    )


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        asyncio.run(_serve())
