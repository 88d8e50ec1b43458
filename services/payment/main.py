"""Composition root of the payment service.

    python -m services.payment.main

Environment: the runtime's `SERVICE_*` (see `framework.system.runtime`), plus
`PAYMENT_FAILURE_RATE` (0..1, random declines for chaos runs; default 0) and
`PAYMENT_DECLINE_ABOVE_MINOR` (amounts above it are declined; 0 = no limit), and the test
flag `PAYMENT_BUG_REFUND_TWICE=1`: a deliberate bug (each refund entered twice in the
ledger) that the chaos invariants must catch; never set it otherwise.
Several replicas may share one database; the saga barrier's rows live in it too
(`saga_barrier`), pruned after `SERVICE_BARRIER_HORIZON_S` (`framework.system.barrier`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from framework.clock import Clock
from framework.events.typeregistry import EventTypeRegistry
from framework.health import Check
from framework.saga.retention import BarrierPruner
from framework.server import Server
from framework.system.barrier import retention_from_env
from framework.system.database import ServiceDatabase
from framework.system.runtime import RuntimeConfig, ServiceRuntime
from gen.payment.v1 import events_pb2
from services.payment.application import PaymentConfig, Payments
from services.payment.servicer import PaymentServicer
from services.payment.store import SqlPaymentStore

__all__ = ["SERVICE", "PaymentService", "build", "config_from_env", "main"]

logger = logging.getLogger(__name__)

SERVICE = "payment.v1.PaymentService"


def config_from_env(env: Mapping[str, str]) -> PaymentConfig:
    try:
        return PaymentConfig(
            failure_rate=float(env.get("PAYMENT_FAILURE_RATE") or 0),
            decline_above_minor=int(env.get("PAYMENT_DECLINE_ABOVE_MINOR") or 0),
        )
    except ValueError as error:
        raise ValueError(f"bad PAYMENT_* setting: {error}") from None


@dataclass(frozen=True, slots=True)
class PaymentService:
    server: Server
    payments: Payments
    db: ServiceDatabase
    pruner: BarrierPruner


async def build(
    config: RuntimeConfig, payment: PaymentConfig | None = None, *, clock: Clock | None = None
) -> PaymentService:
    runtime = ServiceRuntime(config)
    db = await runtime.open_database(EventTypeRegistry.from_modules(events_pb2))
    refund_twice = config.extra.get("PAYMENT_BUG_REFUND_TWICE", "") == "1"
    if refund_twice:
        logger.warning("PAYMENT_BUG_REFUND_TWICE=1: refunds are entered twice (a chaos test flag)")
    store = SqlPaymentStore(db, refund_entries=2 if refund_twice else 1, clock=clock)
    await store.setup()
    payments = Payments(store, payment or config_from_env(config.extra), clock=clock)
    pruner = store.barrier.pruner(retention_from_env(config.extra))
    server = runtime.server(
        health_checks=[Check("database", db.ping, interval_s=5.0, timeout_s=2.0)],
        hooks=[pruner],  # stopped before the database closes
        closing=[db],
    )
    server.add(PaymentServicer(payments))
    runtime.register(server, SERVICE)
    return PaymentService(server, payments, db, pruner)


async def run(config: RuntimeConfig) -> None:
    service = await build(config)
    await service.server.serve()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(run(RuntimeConfig.from_env("payment")))


if __name__ == "__main__":
    main()
