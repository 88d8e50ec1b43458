"""Projections: checkpoint moves with the read model, catch-up then live, rebuild from zero."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from framework.events.projection import ProjectionConfig, ProjectionRunner
from framework.events.store import NewEvent, RecordedEvent
from gen.events.v1.testing_pb2 import AccountOpened, AmountDeposited, AmountWithdrawn
from tests.events.conftest import Backend

DEPOSITED = "events.v1.testing.AmountDeposited"
WITHDRAWN = "events.v1.testing.AmountWithdrawn"


class Balances:
    """Read model: balance per account, in a table next to the events (either backend)."""

    def __init__(self, backend: Backend, name: str, fail_at: int = 0) -> None:
        self.name = name
        self.pg = backend.name == "postgres"
        prefix = f'"{backend.schema}".' if self.pg else ""
        self.table = f"{prefix}{name}"
        self.fail_at = fail_at  # raise when applying this position (0: never)

    def _sql(self, sql: str) -> str:
        if not self.pg:
            return sql
        for n in (1, 2):
            sql = sql.replace("?", f"${n}", 1)
        return sql

    async def _exec(self, tx: Any, sql: str, *args: Any) -> None:
        if self.pg:
            await tx.execute(self._sql(sql), *args)
        else:
            await tx.execute(sql, args)

    async def create(self, tx: Any) -> None:
        await self._exec(
            tx, f"CREATE TABLE IF NOT EXISTS {self.table} (id TEXT PRIMARY KEY, balance BIGINT)"
        )

    async def apply(self, tx: Any, event: RecordedEvent) -> None:
        if event.position == self.fail_at:
            raise RuntimeError(f"projection failed at position {event.position}")
        if event.type == DEPOSITED:
            delta = AmountDeposited.FromString(event.payload).amount
        elif event.type == WITHDRAWN:
            delta = -AmountWithdrawn.FromString(event.payload).amount
        else:
            return
        await self._exec(
            tx,
            f"INSERT INTO {self.table} (id, balance) VALUES (?, ?) ON CONFLICT (id)"
            f" DO UPDATE SET balance = {self.table}.balance + excluded.balance",
            event.stream_id,
            delta,
        )

    async def reset(self, tx: Any) -> None:
        await self._exec(tx, f"DELETE FROM {self.table}")

    async def rows(self, store: Any) -> dict[str, int]:
        async with store.transaction() as tx:
            sql = f"SELECT id, balance FROM {self.table} ORDER BY id"
            rows = await (tx.fetch(sql) if self.pg else tx.fetchall(sql))
        return {r[0]: r[1] for r in rows}


async def _history(store: Any, accounts: int, deposits: int) -> None:
    for a in range(accounts):
        events = [NewEvent.of(AccountOpened(owner=f"o{a}"))]
        events += [NewEvent.of(AmountDeposited(amount=a * 10 + d)) for d in range(deposits)]
        await store.append(f"acc-{a}", events, 0)
        await store.append(f"acc-{a}", [NewEvent.of(AmountWithdrawn(amount=1))], None)


async def _new(backend: Backend, store: Any, name: str, **kw: Any) -> tuple[Balances, Any]:
    projection = Balances(backend, name, **kw)
    async with store.transaction() as tx:
        await projection.create(tx)
    return projection, ProjectionRunner(store, projection, ProjectionConfig(batch_size=7))


async def test_live_projection_equals_rebuild_from_zero(backend: Backend, store: Any) -> None:
    """A projection followed live equals the same projection rebuilt from position 0."""
    await _history(store, accounts=3, deposits=4)  # backlog: caught up first
    projection, runner = await _new(backend, store, "balances_live")
    stop = asyncio.Event()
    live = asyncio.create_task(runner.run(stop))
    await _history_more(store)
    head = await store.head_position()
    for _ in range(500):  # bounded wait for the live runner to reach the head
        if runner.position >= head:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(live, 60)
    live_rows = await projection.rows(store)
    assert live_rows["acc-0"] == 0 + 1 + 2 + 3 - 1 + 100
    assert await runner.rebuild() > 0
    assert await projection.rows(store) == live_rows
    fresh, fresh_runner = await _new(backend, store, "balances_fresh")
    await fresh_runner.catch_up()
    assert await fresh.rows(store) == live_rows


async def _history_more(store: Any) -> None:
    for a in range(3):
        await store.append(f"acc-{a}", [NewEvent.of(AmountDeposited(amount=100))], None)


async def test_failed_batch_moves_neither_read_model_nor_checkpoint(
    backend: Backend, store: Any
) -> None:
    """An error mid-batch rolls back the read model and the checkpoint together."""
    await _history(store, accounts=2, deposits=3)
    projection, runner = await _new(backend, store, "balances_fail", fail_at=4)
    with pytest.raises(RuntimeError, match="position 4"):
        await runner.catch_up()
    assert await projection.rows(store) == {}
    assert await store.load_checkpoint("balances_fail") == 0
    projection.fail_at = 0
    await runner.catch_up()
    assert await projection.rows(store) == {"acc-0": 0 + 1 + 2 - 1, "acc-1": 10 + 11 + 12 - 1}
    assert await store.load_checkpoint("balances_fail") == await store.head_position()


async def test_replay_from_a_stale_position_is_idempotent(backend: Backend, store: Any) -> None:
    """A second runner starting at 0 in memory skips what the checkpoint says is applied."""
    await _history(store, accounts=2, deposits=2)
    projection, runner = await _new(backend, store, "balances_idem")
    await runner.catch_up()
    before = await projection.rows(store)
    again = ProjectionRunner(store, projection)
    assert await again.step() == 0  # read from position 0, applied nothing
    assert await projection.rows(store) == before


class BatchBalances(Balances):
    """Balances with `apply_batch`: one executemany per page; counts how it was fed."""

    def __init__(self, backend: Backend, name: str, fail_at: int = 0) -> None:
        super().__init__(backend, name, fail_at)
        self.pages: list[int] = []  # sizes of the pages given to apply_batch
        self.singles = 0  # events given to apply

    async def apply(self, tx: Any, event: RecordedEvent) -> None:
        self.singles += 1
        await super().apply(tx, event)

    async def apply_batch(self, tx: Any, events: Sequence[RecordedEvent]) -> None:
        self.pages.append(len(events))
        rows: list[tuple[str, int]] = []
        for event in events:
            if event.position == self.fail_at:
                raise RuntimeError(f"projection failed at position {event.position}")
            if event.type == DEPOSITED:
                rows.append((event.stream_id, AmountDeposited.FromString(event.payload).amount))
            elif event.type == WITHDRAWN:
                rows.append((event.stream_id, -AmountWithdrawn.FromString(event.payload).amount))
        sql = self._sql(
            f"INSERT INTO {self.table} (id, balance) VALUES (?, ?) ON CONFLICT (id)"
            f" DO UPDATE SET balance = {self.table}.balance + excluded.balance"
        )
        await tx.executemany(sql, rows)


async def test_catch_up_and_rebuild_apply_whole_pages(backend: Backend, store: Any) -> None:
    """A BatchProjection gets one apply_batch per page on catch-up and rebuild; same result."""
    await _history(store, accounts=4, deposits=5)  # 4 x (1 + 5 + 1) = 28 events
    plain, plain_runner = await _new(backend, store, "balances_plain")
    await plain_runner.catch_up()
    batched = BatchBalances(backend, "balances_batched")
    async with store.transaction() as tx:
        await batched.create(tx)
    runner = ProjectionRunner(store, batched, ProjectionConfig(batch_size=10), trace=False)
    assert await runner.catch_up() == 28
    caught_up = await batched.rows(store)
    assert await runner.rebuild() == 28
    assert batched.pages == [10, 10, 8, 10, 10, 8]
    assert batched.singles == 0
    assert await batched.rows(store) == caught_up == await plain.rows(store)
    assert await store.load_checkpoint("balances_batched") == await store.head_position()


async def test_live_steps_still_apply_event_by_event(backend: Backend, store: Any) -> None:
    """After catching up in pages, live appends go through apply() one at a time."""
    await _history(store, accounts=1, deposits=2)
    batched = BatchBalances(backend, "balances_live_batch")
    async with store.transaction() as tx:
        await batched.create(tx)
    runner = ProjectionRunner(store, batched, ProjectionConfig(idle_wait_s=0.05), trace=False)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    await runner.live.wait()
    await store.append("acc-0", [NewEvent.of(AmountDeposited(amount=100))], None)
    head = await store.head_position()
    for _ in range(500):  # bounded wait for the live step
        if runner.position >= head:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 60)
    assert batched.pages == [4]
    assert batched.singles == 1
    assert await batched.rows(store) == {"acc-0": 0 + 1 - 1 + 100}


async def test_a_failed_page_moves_neither_read_model_nor_checkpoint(
    backend: Backend, store: Any
) -> None:
    """apply_batch failing mid-rebuild keeps the pages before it and rolls its own back."""
    await _history(store, accounts=3, deposits=2)  # 12 events
    batched = BatchBalances(backend, "balances_batch_fail", fail_at=9)
    async with store.transaction() as tx:
        await batched.create(tx)
    runner = ProjectionRunner(store, batched, ProjectionConfig(batch_size=4), trace=False)
    with pytest.raises(RuntimeError, match="position 9"):
        await runner.rebuild()
    assert await store.load_checkpoint("balances_batch_fail") == 8
    assert await batched.rows(store) == {"acc-0": 0, "acc-1": 10 + 11 - 1}
    batched.fail_at = 0
    assert await runner.catch_up() == 4
    assert await batched.rows(store) == {"acc-0": 0, "acc-1": 20, "acc-2": 20 + 21 - 1}
