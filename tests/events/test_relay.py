"""Outbox relay: a process killed between append and publish loses and invents nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from framework.events.bus import Delivery
from framework.events.consumer import IdempotentHandler, consume
from framework.events.envelope import to_envelope
from framework.events.nats import JetStreamBus, JetStreamConfig
from framework.events.relay import OutboxRelay, RelayConfig
from framework.events.sqlite import SqliteTransaction
from framework.events.store import NewEvent
from gen.events.v1.envelope_pb2 import EventEnvelope
from gen.events.v1.testing_pb2 import AccountOpened, AmountDeposited
from tests.events.conftest import Backend

pytestmark = pytest.mark.nats

ROOT = Path(__file__).resolve().parents[2]

# Appends 6 events, then dies by SIGKILL: right after the append ("append"), or
# after the bus acknowledged the relay's first batch of 4 but before the relay
# saved its cursor ("publish").
CHILD = """
import asyncio, os, signal, sys
from framework.events.nats import JetStreamBus, JetStreamConfig
from framework.events.relay import OutboxRelay, RelayConfig
from framework.events.sqlite import SqliteConfig, SqliteEventStore
from framework.events.store import NewEvent
from framework.events.typeregistry import EventTypeRegistry
from gen.events.v1 import testing_pb2

mode, backend, where, schema, url, stream, prefix = sys.argv[1:8]

class DieAfterPublish:
    def __init__(self, bus):
        self.bus = bus
    async def publish(self, envelopes):
        await self.bus.publish(envelopes)
        os.kill(os.getpid(), signal.SIGKILL)

async def main():
    types = EventTypeRegistry.from_modules(testing_pb2)
    if backend == "sqlite":
        store = await SqliteEventStore.open(SqliteConfig(path=where), types)
    else:
        from framework.events.postgres import PostgresConfig, PostgresEventStore
        store = await PostgresEventStore.open(PostgresConfig(dsn=where, schema=schema), types)
    events = [NewEvent.of(testing_pb2.AccountOpened(owner="ann"))]
    events += [NewEvent.of(testing_pb2.AmountDeposited(amount=i)) for i in range(1, 6)]
    await store.append("acc-1", events, 0, aggregate_type="Account")
    if mode == "append":
        os.kill(os.getpid(), signal.SIGKILL)
    bus = await JetStreamBus.connect(url, JetStreamConfig(stream=stream, subject_prefix=prefix))
    await OutboxRelay(store, DieAfterPublish(bus), RelayConfig(batch_size=4)).run_once()

asyncio.run(main())
"""


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[JetStreamBus]:
    """A JetStream bus on a stream owned by this test, deleted afterwards."""
    tag = uuid.uuid4().hex[:12]
    config = JetStreamConfig(stream=f"R_{tag}", subject_prefix=f"r{tag}", ack_wait_s=0.5)
    bus = await JetStreamBus.connect(nats_url, config)
    try:
        yield bus
    finally:
        await bus.delete_stream()
        await bus.close()


def _run_child(mode: str, backend: Backend, url: str, bus: JetStreamBus) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    where = str(backend.path) if backend.name == "sqlite" else backend.dsn
    config = bus.config
    args = [mode, backend.name, where, backend.schema or "-", url]
    args += [config.stream, config.subject_prefix]
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *args], cwd=ROOT, env=env, timeout=300, check=False
    )
    return done.returncode


async def _published(bus: JetStreamBus, group: str, want: int) -> list[Delivery]:
    """Everything in the stream, through a fresh group (bounded)."""
    sub = await bus.subscribe(group)
    got: list[Delivery] = []
    for _ in range(50):
        batch = await sub.fetch(max_count=64, timeout_s=0.2)
        for delivery in batch:
            await delivery.ack()
        got += batch
        if len(got) >= want and not batch:
            break
    await sub.close()
    return got


@pytest.mark.parametrize("mode", ["append", "publish"])
async def test_relay_after_kill_publishes_exactly_what_was_stored(
    mode: str, backend: Backend, nats_url: str, bus: JetStreamBus
) -> None:
    """After SIGKILL between append and publish, a restarted relay publishes the stored events."""
    code = await asyncio.to_thread(_run_child, mode, backend, nats_url, bus)
    assert code == -signal.SIGKILL
    assert await bus.stream_messages() == (0 if mode == "append" else 4)
    store = await backend.open()
    relay = OutboxRelay(store, bus, RelayConfig(batch_size=4))
    before = await relay.cursor()
    published = await relay.run_once()
    stored = await store.read_all(0, 100)
    got = await _published(bus, "check", len(stored))
    assert len(stored) == 6
    assert await bus.stream_messages() == 6  # the 4 re-published ones were de-duplicated
    assert before == 0  # the dead relay never saved its cursor
    assert published == 6
    assert await relay.cursor() == 6
    assert [d.envelope for d in got] == [to_envelope(e) for e in stored]


async def test_group_applies_each_relayed_event_once(
    tmp_path: Path, nats_url: str, bus: JetStreamBus
) -> None:
    """A consumer crashing before its acks gets the events again and applies each once."""
    backend = Backend("sqlite", path=tmp_path / "events.db")
    store = await backend.open()
    events = [NewEvent.of(AccountOpened(owner="ann"))]
    events += [NewEvent.of(AmountDeposited(amount=i)) for i in range(1, 6)]
    await store.append("acc-1", events, 0, aggregate_type="Account")
    await OutboxRelay(store, bus).run_once()
    await OutboxRelay(store, bus, RelayConfig(name="again")).run_once()  # all de-duplicated
    async with store.transaction() as tx:
        await tx.execute("CREATE TABLE balance (stream_id TEXT PRIMARY KEY, total INTEGER)")
    applied: list[str] = []

    async def apply(tx: SqliteTransaction, envelope: EventEnvelope) -> None:
        applied.append(envelope.event_id)
        if envelope.type == AmountDeposited.DESCRIPTOR.full_name:
            amount = AmountDeposited.FromString(envelope.payload).amount
            await tx.execute(
                "INSERT INTO balance VALUES (?, ?) ON CONFLICT (stream_id)"
                " DO UPDATE SET total = total + excluded.total",
                (envelope.stream_id, amount),
            )

    handler = IdempotentHandler(store, "balance", apply)
    await handler.setup()
    crashed = await bus.subscribe("balance")
    for delivery in await crashed.fetch(max_count=3, timeout_s=2.0):
        await handler(delivery.envelope)  # applied, then "crash" before the ack
    await crashed.close()
    seen: list[bool] = []

    async def counting(envelope: EventEnvelope) -> None:
        seen.append(await handler(envelope))

    member = await bus.subscribe("balance")
    task = asyncio.create_task(consume(member, counting, fetch_timeout_s=0.2))
    for _ in range(300):  # bounded: at most ~15 s
        if len(seen) >= 6:
            break
        await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await member.close()
    async with store.transaction() as tx:
        total = await tx.fetchone("SELECT total FROM balance WHERE stream_id = 'acc-1'")
    await backend.close()
    assert sorted(seen) == [False] * 3 + [True] * 3  # 3 redelivered and skipped
    assert len(applied) == len(set(applied)) == 6
    assert total[0] == 1 + 2 + 3 + 4 + 5
