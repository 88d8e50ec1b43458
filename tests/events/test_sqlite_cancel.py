"""SQLite `transaction()` under cancellation: a caller that gives up leaves nothing locked."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from framework.events.sqlite import SqliteConfig, SqliteEventStore
from framework.events.store import NewEvent
from gen.events.v1.testing_pb2 import AccountOpened, AmountDeposited
from tests.events.account import account_types


async def _open(path: Path) -> SqliteEventStore:
    return await SqliteEventStore.open(
        SqliteConfig(path=str(path), busy_timeout_s=2.0), account_types()
    )


async def _prepare(store: SqliteEventStore) -> None:
    async with store.transaction() as tx:  # opens the transaction connection
        await tx.execute("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, text TEXT)")


async def test_cancel_while_begin_waits_for_the_lock_leaves_no_transaction(tmp_path: Path) -> None:
    """A transaction() cancelled while BEGIN waits for another writer leaves nothing open."""
    store = await _open(tmp_path / "events.db")
    try:
        await _prepare(store)
        other = sqlite3.connect(str(tmp_path / "events.db"), isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock

        async def body() -> None:
            async with store.transaction() as tx:
                await tx.execute("INSERT INTO notes (text) VALUES ('never')")

        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):  # BEGIN IMMEDIATE is queued before this fires
                await body()
        other.execute("ROLLBACK")  # the lock is free: the orphaned BEGIN now succeeds
        other.close()
        # The store must not stay inside a transaction nobody owns.
        result = await store.append("acc-1", [NewEvent.of(AccountOpened(owner="a"))], 0)
        async with store.transaction() as tx:
            await tx.execute("INSERT INTO notes (text) VALUES ('after')")
        async with store.transaction() as tx:
            notes = await tx.fetchall("SELECT text FROM notes ORDER BY id")
    finally:
        await store.close()
    assert result.version == 1
    assert notes == [("after",)]


async def test_cancel_inside_the_body_rolls_back_and_frees_the_store(tmp_path: Path) -> None:
    """A transaction() cancelled mid-body rolls its statements back; appends go on."""
    store = await _open(tmp_path / "events.db")
    try:
        await _prepare(store)
        entered = asyncio.Event()

        async def body() -> None:
            async with store.transaction() as tx:
                await tx.execute("INSERT INTO notes (text) VALUES ('half')")
                entered.set()
                await asyncio.Event().wait()  # until cancelled

        task = asyncio.create_task(body())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await store.append("acc-1", [NewEvent.of(AccountOpened(owner="a"))], 0)
        await store.append("acc-1", [NewEvent.of(AmountDeposited(amount=1))], 1)
        async with store.transaction() as tx:
            notes = await tx.fetchall("SELECT text FROM notes")
    finally:
        await store.close()
    assert notes == []
    assert [e.version for e in await _read(tmp_path)] == [1, 2]


async def _read(path: Path) -> list[object]:
    store = await _open(path / "events.db")
    try:
        return list(await store.read_stream("acc-1"))
    finally:
        await store.close()
