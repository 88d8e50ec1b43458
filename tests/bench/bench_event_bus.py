"""Event bus throughput: the outbox relay to JetStream, and a StoreBus consumer group.

Same run, interleaved rounds, medians:

* `event_relay_jetstream`: `OutboxRelay.run_once()` moving N stored events to
  NATS JetStream (read_all pages of 256 from SQLite, envelope build, publish with
  `Nats-Msg-Id`, wait for every publish ack, save the cursor per batch) vs a raw
  nats-py loop publishing the same, pre-serialized envelopes with the same
  header in batches of 256 and waiting for the acks (no store read, no cursor).
  Each round publishes into a fresh stream (created before the clock starts).
* `event_group_sqlite`: a `StoreBus` group delivering and acking N events
  (durable checkpoint as it goes) vs a raw loop paging `store.read_all` over the
  same events (what a consumer without groups or acks would do).

Skipped with a note when NATS does not answer on 127.0.0.1:4222.
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
import uuid
from pathlib import Path

import nats

from framework.events.consumer_group import StoreBus
from framework.events.envelope import to_envelope
from framework.events.nats import MSG_ID_HEADER, JetStreamBus, JetStreamConfig, subject_for
from framework.events.relay import OutboxRelay, RelayConfig
from framework.events.sqlite import SqliteConfig, SqliteEventStore
from framework.events.store import NewEvent
from gen.events.v1.testing_pb2 import AmountDeposited
from tests.bench.harness import Sample, bench_line, interleave, median_cpu_us, median_rate, timed
from tests.events.account import account_types

ROUNDS = 5
EVENTS = 2000
BATCH = 256
NATS_URL = "nats://127.0.0.1:4222"


def _nats_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 4222), timeout=1.0):
            return True
    except OSError:
        return False


async def _fill(store: SqliteEventStore) -> None:
    for i in range(EVENTS // 100):
        events = [NewEvent.of(AmountDeposited(amount=j + 1)) for j in range(100)]
        await store.append(f"acc-{i}", events, 0, aggregate_type="Account")


async def _relay_bench(store: SqliteEventStore) -> None:
    stored = await store.read_all(0, EVENTS)
    raw_items = [
        (subject_for("bench", e), e.SerializeToString(), e.event_id)
        for e in (to_envelope(r) for r in stored)
    ]
    nc = await nats.connect(NATS_URL)
    js = nc.jetstream()
    made: list[str] = []

    async def fresh_stream() -> JetStreamConfig:
        config = JetStreamConfig(stream=f"BENCH_{uuid.uuid4().hex[:10]}", subject_prefix="bench")
        await js.add_stream(name=config.stream, subjects=["bench.>"], duplicate_window=120.0)
        made.append(config.stream)
        return config

    async def relay_round() -> Sample:
        config = await fresh_stream()
        bus = JetStreamBus(nc, config)
        relay = OutboxRelay(store, bus, RelayConfig(name=config.stream, batch_size=BATCH))
        sample = await timed(relay.run_once)
        await js.delete_stream(config.stream)
        return sample

    async def raw_round() -> Sample:
        config = await fresh_stream()

        async def run() -> int:
            for start in range(0, len(raw_items), BATCH):
                futures = [
                    await js.publish_async(
                        subject, data, stream=config.stream, headers={MSG_ID_HEADER: msg_id}
                    )
                    for subject, data, msg_id in raw_items[start : start + BATCH]
                ]
                await asyncio.gather(*futures)
            return len(raw_items)

        sample = await timed(run)
        await js.delete_stream(config.stream)
        return sample

    try:
        samples = await interleave(ROUNDS, relay=relay_round, raw=raw_round)
    finally:
        await nc.close()
    ours, raw = median_rate(samples["relay"]), median_rate(samples["raw"])
    print(
        f"relay {ours:.0f} ev/s ({median_cpu_us(samples['relay']):.0f} us cpu/ev), "
        f"raw JetStream {raw:.0f} ev/s ({median_cpu_us(samples['raw']):.0f} us cpu/ev)"
    )
    bench_line(
        "event_relay_jetstream",
        ours / raw,
        ours,
        "events/s",
        "raw nats-py publish_async with Nats-Msg-Id, batches of 256",
    )


async def _group_bench(store: SqliteEventStore) -> None:
    async def group_round() -> Sample:
        bus = StoreBus(store)
        sub = await bus.subscribe(f"g{uuid.uuid4().hex[:10]}")

        async def run() -> int:
            done = 0
            while done < EVENTS:
                for delivery in await sub.fetch(max_count=BATCH, timeout_s=5.0):
                    await delivery.ack()
                    done += 1
            return done

        sample = await timed(run)
        await bus.close()
        return sample

    async def raw_round() -> Sample:
        async def run() -> int:
            after, done = 0, 0
            while done < EVENTS:
                page = await store.read_all(after, BATCH)
                done += len(page)
                after = page[-1].position
            return done

        return await timed(run)

    samples = await interleave(ROUNDS, group=group_round, raw=raw_round)
    ours, raw = median_rate(samples["group"]), median_rate(samples["raw"])
    print(f"StoreBus group {ours:.0f} ev/s, raw read_all paging {raw:.0f} ev/s")
    bench_line("event_group_sqlite", ours / raw, ours, "events/s", "raw store.read_all paging")


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = await SqliteEventStore.open(
            SqliteConfig(path=str(Path(tmp) / "events.db")), account_types()
        )
        try:
            await _fill(store)
            await _group_bench(store)
            if _nats_up():
                await _relay_bench(store)
            else:
                print("NATS does not answer on 127.0.0.1:4222: event_relay_jetstream skipped")
        finally:
            await store.close()
