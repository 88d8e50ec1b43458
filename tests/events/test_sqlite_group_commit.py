"""SQLite group commit: concurrent appends share transactions, each still all-or-nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

from framework.errors import ConflictError
from framework.events.sqlite import SqliteConfig, SqliteEventStore
from framework.events.store import NewEvent
from gen.events.v1.testing_pb2 import AmountDeposited
from tests.events.account import account_types


def deposits(n: int) -> list[NewEvent]:
    return [NewEvent.of(AmountDeposited(amount=i + 1)) for i in range(n)]


async def test_concurrent_appends_commit_in_call_order(tmp_path: Path) -> None:
    """50 concurrent appends through one store all land, positions in call order, no gaps."""
    store = await SqliteEventStore.open(SqliteConfig(str(tmp_path / "e.db")), account_types())
    try:
        results = await asyncio.gather(
            *(store.append(f"s-{i}", deposits(1 + i % 3), 0) for i in range(50))
        )
        positions = [p for r in results for p in r.positions]
        assert positions == list(range(1, len(positions) + 1))
        assert [e.position for e in await store.read_all(0, 1000)] == positions
    finally:
        await store.close()


async def test_conflict_in_a_group_fails_alone(tmp_path: Path) -> None:
    """In one group, a stale append raises ConflictError while the others commit."""
    store = await SqliteEventStore.open(SqliteConfig(str(tmp_path / "e.db")), account_types())
    try:
        await store.append("taken", deposits(2), 0)
        outcomes = await asyncio.gather(
            store.append("a", deposits(3), 0),
            store.append("taken", deposits(5), 0),  # exists: UNIQUE refuses, savepoint undone
            store.append("taken", deposits(1), 1),  # stale expected version
            store.append("b", deposits(2), 0),
            return_exceptions=True,
        )
        assert [type(o).__name__ for o in outcomes] == [
            "AppendResult",
            "ConflictError",
            "ConflictError",
            "AppendResult",
        ]
        assert await store.stream_version("taken") == 2
        assert await store.stream_version("a") == 3 and await store.stream_version("b") == 2
        assert isinstance(outcomes[2], ConflictError)
        assert outcomes[2].metadata["actual_version"] == "2"
    finally:
        await store.close()


async def test_projection_transaction_runs_beside_appends(tmp_path: Path) -> None:
    """A transaction on the second connection commits its rows while appends go on."""
    store = await SqliteEventStore.open(SqliteConfig(str(tmp_path / "e.db")), account_types())
    try:
        async with store.transaction() as tx:
            await tx.execute("CREATE TABLE IF NOT EXISTS seen (n INTEGER)")
            await tx.executemany("INSERT INTO seen (n) VALUES (?)", [(1,), (2,)])
        appended = await store.append("a", deposits(1), 0)
        async with store.transaction() as tx:
            assert await tx.fetchone("SELECT COUNT(*) FROM seen") == (2,)
        assert appended.positions == (1,)
    finally:
        await store.close()
