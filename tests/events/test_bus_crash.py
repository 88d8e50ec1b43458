"""A consumer process killed (SIGKILL) mid-stream: after restart every event is applied once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from framework.events.consumer import IdempotentHandler, consume
from framework.events.consumer_group import StoreBus
from framework.events.sqlite import SqliteTransaction
from framework.events.store import NewEvent
from gen.events.v1.envelope_pb2 import EventEnvelope
from gen.events.v1.testing_pb2 import AccountOpened, AmountDeposited
from tests.events.conftest import Backend

ROOT = Path(__file__).resolve().parents[2]

# Consumes group "ledger" with the idempotent handler; saves the group position
# after every 3rd ack; dies by SIGKILL right after applying the 7th event, before
# acknowledging it.
CHILD = """
import asyncio, os, signal, sys
from framework.events.consumer_group import StoreBus
from framework.events.sqlite import SqliteConfig, SqliteEventStore
from tests.events.account import account_types
from tests.events.test_bus_crash import ledger

async def main():
    store = await SqliteEventStore.open(SqliteConfig(path=sys.argv[1]), account_types())
    handler = ledger(store)
    bus = StoreBus(store)
    sub = await bus.subscribe("ledger")
    done = 0
    while True:
        for delivery in await sub.fetch(max_count=2, timeout_s=5.0):
            await handler(delivery.envelope)
            done += 1
            if done == 7:
                os.kill(os.getpid(), signal.SIGKILL)
            await delivery.ack()
            if done % 3 == 0:
                await bus.flush()

asyncio.run(main())
"""


def ledger(store: object) -> IdempotentHandler[SqliteTransaction]:
    """The handler under test: records each application in `applied` (no unique key)."""

    async def apply(tx: SqliteTransaction, envelope: EventEnvelope) -> None:
        await tx.execute("INSERT INTO applied VALUES (?)", (envelope.event_id,))

    return IdempotentHandler(store, "ledger", apply)  # type: ignore[arg-type]


async def test_killed_consumer_applies_each_event_once_after_restart(tmp_path: Path) -> None:
    """Killed after applying but before acking, the restarted consumer skips what it applied."""
    backend = Backend("sqlite", path=tmp_path / "events.db")
    store = await backend.open()
    events = [NewEvent.of(AccountOpened(owner="ann"))]
    events += [NewEvent.of(AmountDeposited(amount=i)) for i in range(1, 11)]
    await store.append("acc-1", events, 0, aggregate_type="Account")
    async with store.transaction() as tx:
        await tx.execute("CREATE TABLE applied (event_id TEXT NOT NULL)")
    handler = ledger(store)
    await handler.setup()

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = [sys.executable, "-c", CHILD, str(backend.path)]
    done = await asyncio.to_thread(subprocess.run, child, cwd=ROOT, env=env, timeout=60)
    assert done.returncode == -signal.SIGKILL
    assert await store.load_checkpoint("group:ledger") == 6

    seen: list[bool] = []

    async def counting(envelope: EventEnvelope) -> None:
        seen.append(await handler(envelope))

    bus = StoreBus(store)
    task = asyncio.create_task(consume(await bus.subscribe("ledger"), counting))
    for _ in range(500):  # bounded: at most ~10 s
        if bus.position("ledger") == 11:
            break
        await asyncio.sleep(0.02)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await bus.close()
    async with store.transaction() as tx:
        rows = await tx.fetchall("SELECT event_id, COUNT(*) FROM applied GROUP BY event_id")
    await backend.close()
    assert seen == [False, True, True, True, True]  # the 7th came again and was skipped
    assert len(rows) == 11
    assert all(count == 1 for _, count in rows)
